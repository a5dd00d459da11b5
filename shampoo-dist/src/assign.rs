//! Which rank computes which block: greedy longest-processing-time (LPT)
//! over a cost model of each block's work.
//!
//! The cost of a block of shape `d_1 x ... x d_k` with `n = prod d_i`
//! elements, per step, in multiply-adds:
//!
//! - statistics: `n * d_i` per preconditioned dimension (the Gram product
//!   `G_(i) G_(i)^T`);
//! - preconditioning: `n * d_i` per preconditioned dimension (the mode
//!   product with `X_i`);
//! - root inverse, amortised: `ROOT_WORK * d_i^3 / precondition_frequency`
//!   per preconditioned dimension (an eigendecomposition costs about ten
//!   times a `d^3` matrix product);
//! - elementwise work (grafting, momentum, update): `ELEMENTWISE * n`.
//!
//! Blocks are sorted by decreasing cost (ties: ascending block id) and each
//! goes to the rank with the least total cost so far (ties: the lowest
//! rank). Costs are integers, so the assignment is the same on every rank
//! and every platform.

use shampoo_core::ShampooConfig;
use shampoo_core::layout::Layout;

/// Work of an eigendecomposition relative to `d^3`.
pub const ROOT_WORK: u64 = 10;
/// Elementwise multiply-adds per element and step.
pub const ELEMENTWISE: u64 = 8;

/// Estimated per-step cost of every block, in multiply-adds, from a layout
/// that owns all blocks (its groups list each block's preconditioned
/// dimensions).
pub fn block_costs(full: &Layout, config: &ShampooConfig) -> Vec<u64> {
    let freq = config.precondition_frequency.max(1);
    let mut costs: Vec<u64> = full
        .blocks
        .iter()
        .map(|b| ELEMENTWISE * b.numel() as u64)
        .collect();
    for g in &full.groups {
        let n = g.numel as u64;
        let per_block: u64 = g
            .factors
            .iter()
            .map(|f| {
                let d = f.size as u64;
                2 * n * d + (ROOT_WORK * d * d * d).div_ceil(freq)
            })
            .sum();
        for &id in &g.blocks {
            costs[id] += per_block;
        }
    }
    costs
}

/// The owner of every block among `ranks` ranks (LPT, deterministic).
pub fn assign_blocks(costs: &[u64], ranks: usize) -> Vec<usize> {
    let ranks = ranks.max(1);
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].cmp(&costs[a]).then(a.cmp(&b)));
    let mut load = vec![0u64; ranks];
    let mut owner = vec![0usize; costs.len()];
    for id in order {
        let r = (0..ranks)
            .min_by_key(|&r| (load[r], r))
            .expect("at least one rank");
        load[r] += costs[id];
        owner[id] = r;
    }
    owner
}

/// Where every rank's directions travel in the all-gather: each rank's
/// slot holds its own blocks' directions in its layout's order, slots are
/// padded to the longest, rounded up to a multiple of 4 elements (so that a
/// slot of 16-bit values is a whole number of f32 and f64 elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    /// Elements per slot.
    pub len: usize,
    /// Offset of every block in its owner's slot.
    pub offsets: Vec<usize>,
}

/// The slots of the assignment `owner` over `ranks` ranks.
pub fn slots(
    shapes: &[Vec<usize>],
    config: &ShampooConfig,
    owner: &[usize],
    ranks: usize,
) -> shampoo_core::Result<Slots> {
    let mut len = 0;
    let mut offsets = vec![0usize; owner.len()];
    for r in 0..ranks {
        let l = Layout::new(shapes, config, &|id| owner[id] == r)?;
        len = len.max(l.direction_len);
        for (id, off) in l.direction_offsets().into_iter().enumerate() {
            if let Some(off) = off {
                offsets[id] = off;
            }
        }
    }
    Ok(Slots {
        len: len.next_multiple_of(4),
        offsets,
    })
}

/// Total cost per rank of an assignment.
pub fn loads(costs: &[u64], owner: &[usize], ranks: usize) -> Vec<u64> {
    let mut load = vec![0u64; ranks];
    for (&c, &r) in costs.iter().zip(owner) {
        load[r] += c;
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpt_puts_the_largest_blocks_on_distinct_ranks_and_balances_the_rest() {
        let costs = [5, 9, 2, 9, 4, 1];
        let owner = assign_blocks(&costs, 3);
        // Order: 1(9)->r0, 3(9)->r1, 0(5)->r2, 4(4)->r2 (5 < 9), 2(2)->r0
        // (9,9,9: lowest), 5(1)->r1.
        assert_eq!(owner, vec![2, 0, 0, 1, 2, 1]);
        assert_eq!(loads(&costs, &owner, 3), vec![11, 10, 9]);
    }

    #[test]
    fn more_ranks_than_blocks_leaves_ranks_empty() {
        assert_eq!(assign_blocks(&[3, 3], 4), vec![0, 1]);
        assert_eq!(assign_blocks(&[], 2), Vec::<usize>::new());
    }
}
