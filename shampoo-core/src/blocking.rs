//! Blocking: how a parameter tensor is cut into preconditioned blocks.
//!
//! 1. **Merge.** A shape with a zero dimension becomes `(0,)`. Otherwise
//!    size-1 dimensions are dropped (all gone: `(1,)`, so a scalar is a
//!    1-element vector). Walking from the last dimension to the first, the
//!    next dimension is multiplied into the current merged one while the
//!    product stays `<= max_preconditioner_dim`; otherwise it starts a new
//!    merged dimension.
//! 2. **Split.** Every merged dimension is cut into chunks of
//!    `max_preconditioner_dim` (the last chunk is the remainder); every
//!    combination of chunks is a block, in row-major order of chunk indices.
//!
//! Merged dimensions are contiguous groups of the original (row-major)
//! dimensions, so a row-major parameter's memory is its merged tensor's
//! memory and a block is a hyper-rectangle of it. A parameter stored in
//! another order (channels-last) is blocked the same way, on its logical
//! order; its blocks carry the map to memory ([`crate::strided`]). A parameter with no elements has no
//! blocks: there is nothing to precondition.

use std::sync::Arc;

use crate::strided::Strided;

/// Merges a parameter's dimensions (step 1 above).
pub fn merge_dims(shape: &[usize], max_dim: usize) -> Vec<usize> {
    merge_dims_min_order(shape, max_dim, 1)
}

/// Merges a parameter's dimensions but stops merging where the result
/// would have fewer than `min_order` dimensions (spectral descent keeps 2:
/// the published `target_parameter_dimensionality`): with `n` dimensions
/// after squeezing, the `i`-th step of the walk (`i = 1 .. n - 1`) merges
/// only if `(merged dimensions so far) + (n - i) > min_order` as well.
pub fn merge_dims_min_order(shape: &[usize], max_dim: usize, min_order: usize) -> Vec<usize> {
    if shape.contains(&0) {
        return vec![0];
    }
    let kept: Vec<usize> = shape.iter().copied().filter(|&d| d != 1).collect();
    if kept.is_empty() {
        return vec![1];
    }
    let n = kept.len();
    let mut merged = Vec::with_capacity(n);
    let mut current = kept[n - 1];
    for (i, &d) in kept[..n - 1].iter().rev().enumerate() {
        // Dimensions of the result if this one merges: those done, the
        // current one, and the n - 1 - (i + 1) still to come.
        let room = merged.len() + 1 + (n - 2 - i) >= min_order;
        match current.checked_mul(d) {
            Some(p) if p <= max_dim && room => current = p,
            _ => {
                merged.push(current);
                current = d;
            }
        }
    }
    merged.push(current);
    merged.reverse();
    merged
}

/// One block of one parameter: a hyper-rectangle of its merged tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpec {
    /// Index of the parameter this block belongs to.
    pub param: usize,
    /// The parameter's merged shape.
    pub merged: Vec<usize>,
    /// First index of the block along each merged dimension.
    pub start: Vec<usize>,
    /// The block's shape (its order is the number of merged dimensions).
    pub dims: Vec<usize>,
    /// Where the parameter's elements are in memory when not in row-major
    /// order (a channels-last weight); `None` for row-major.
    pub memory: Option<Arc<Strided>>,
}

impl BlockSpec {
    /// Elements of the parameter's memory (one past the largest offset any
    /// of its blocks touches).
    pub fn param_numel(&self) -> usize {
        self.merged.iter().product()
    }

    /// Like [`BlockSpec::for_each_run`], in the parameter's memory: calls
    /// `f(memory_offset, block_offset, len, step)` for runs whose elements
    /// are `step` apart in memory (1 for row-major parameters).
    pub fn for_each_memory_run(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        match &self.memory {
            None => self.for_each_run(|src, dst, len| f(src, dst, len, 1)),
            Some(m) => self.for_each_run(|src, dst, len| {
                let mut done = 0;
                m.for_each_run(src, len, |off, n, step| {
                    f(off, dst + done, n, step);
                    done += n;
                });
            }),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Order of the block (number of dimensions after merging).
    pub fn order(&self) -> usize {
        self.dims.len()
    }

    /// Calls `f(src_offset, dst_offset, len)` for every contiguous run of the
    /// block: `src_offset` into the parameter's memory, `dst_offset` into the
    /// block's own row-major memory.
    pub fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let k = self.dims.len();
        let run = self.dims[k - 1];
        if run == 0 {
            return;
        }
        // Row-major strides of the parameter's merged tensor.
        let mut strides = vec![1usize; k];
        for i in (0..k - 1).rev() {
            strides[i] = strides[i + 1] * self.merged[i + 1];
        }
        let base: usize = self.start.iter().zip(&strides).map(|(s, st)| s * st).sum();
        let outer: usize = self.dims[..k - 1].iter().product();
        let mut idx = vec![0usize; k.saturating_sub(1)];
        for r in 0..outer {
            let off: usize = idx.iter().zip(&strides).map(|(i, st)| i * st).sum();
            f(base + off, r * run, run);
            // Advance the multi-index over the leading dims.
            for d in (0..k - 1).rev() {
                idx[d] += 1;
                if idx[d] < self.dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}

/// Cuts one parameter into blocks (merge, then split).
pub fn block_parameter(param: usize, shape: &[usize], max_dim: usize) -> Vec<BlockSpec> {
    block_parameter_min_order(param, shape, max_dim, 1, None)
}

/// [`block_parameter`] with [`merge_dims_min_order`], for a parameter
/// stored as `memory` says (`None`: row-major).
pub fn block_parameter_min_order(
    param: usize,
    shape: &[usize],
    max_dim: usize,
    min_order: usize,
    memory: Option<Strided>,
) -> Vec<BlockSpec> {
    let merged = merge_dims_min_order(shape, max_dim, min_order);
    if merged.contains(&0) {
        return Vec::new();
    }
    // Chunks per merged dimension: (start, len).
    let chunks: Vec<Vec<(usize, usize)>> = merged
        .iter()
        .map(|&d| {
            (0..d.div_ceil(max_dim))
                .map(|c| {
                    let s = c * max_dim;
                    (s, max_dim.min(d - s))
                })
                .collect()
        })
        .collect();
    let memory = memory.map(Arc::new);
    let total: usize = chunks.iter().map(Vec::len).product();
    let mut blocks = Vec::with_capacity(total);
    let mut idx = vec![0usize; merged.len()];
    for _ in 0..total {
        blocks.push(BlockSpec {
            param,
            merged: merged.clone(),
            start: idx.iter().zip(&chunks).map(|(&i, c)| c[i].0).collect(),
            dims: idx.iter().zip(&chunks).map(|(&i, c)| c[i].1).collect(),
            memory: memory.clone(),
        });
        for d in (0..merged.len()).rev() {
            idx[d] += 1;
            if idx[d] < chunks[d].len() {
                break;
            }
            idx[d] = 0;
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_examples_from_the_spec() {
        assert_eq!(merge_dims(&[6, 4], 1024), vec![24]);
        assert_eq!(merge_dims(&[64, 3, 7, 7], 1024), vec![64, 147]);
        assert_eq!(merge_dims(&[5, 3, 1000, 2], 1024), vec![15, 1000, 2]);
    }

    #[test]
    fn spectral_merging_keeps_two_dimensions() {
        assert_eq!(merge_dims_min_order(&[6, 5], 1024, 2), vec![6, 5]);
        assert_eq!(merge_dims_min_order(&[3, 4, 5], 1024, 2), vec![3, 20]);
        assert_eq!(merge_dims_min_order(&[2, 3, 4], 8, 2), vec![6, 4]);
        assert_eq!(merge_dims_min_order(&[2, 3, 4, 5], 1024, 2), vec![2, 60]);
        assert_eq!(merge_dims_min_order(&[7], 1024, 2), vec![7], "stays 1-D");
        assert_eq!(merge_dims_min_order(&[6, 4], 1024, 1), vec![24]);
    }

    #[test]
    fn merge_squeezes_and_handles_degenerate_shapes() {
        assert_eq!(merge_dims(&[], 8), vec![1], "0-D scalar is a 1-vector");
        assert_eq!(merge_dims(&[1, 1, 1], 8), vec![1]);
        assert_eq!(merge_dims(&[1, 5, 1, 7, 1], 8), vec![5, 7]);
        assert_eq!(merge_dims(&[1, 5, 1, 7, 1], 35), vec![35]);
        assert_eq!(merge_dims(&[3, 0, 4], 8), vec![0]);
        assert_eq!(merge_dims(&[0], 8), vec![0]);
        assert_eq!(merge_dims(&[1], 8), vec![1]);
        // A dimension larger than the limit stays whole (split later).
        assert_eq!(merge_dims(&[3000], 1024), vec![3000]);
        assert_eq!(merge_dims(&[2, 3000], 1024), vec![2, 3000]);
        // Greedy walk: 2*3=6 <= 8, then 6*5 > 8 starts a new dim.
        assert_eq!(merge_dims(&[5, 3, 2], 8), vec![5, 6]);
        assert_eq!(merge_dims(&[2, 2, 2, 2], 8), vec![2, 8]);
        assert_eq!(merge_dims(&[2, 2, 2, 2], 1), vec![2, 2, 2, 2]);
    }

    #[test]
    fn split_into_chunks_row_major() {
        let b = block_parameter(0, &[10, 7], 4);
        let dims: Vec<_> = b.iter().map(|b| b.dims.clone()).collect();
        assert_eq!(
            dims,
            vec![
                vec![4, 4],
                vec![4, 3],
                vec![4, 4],
                vec![4, 3],
                vec![2, 4],
                vec![2, 3]
            ]
        );
        assert_eq!(b[3].start, vec![4, 4]);
        assert_eq!(b.iter().map(BlockSpec::numel).sum::<usize>(), 70);
        // 1-D split with a remainder.
        let b = block_parameter(1, &[9], 4);
        assert_eq!(
            b.iter()
                .map(|b| (b.start[0], b.dims[0]))
                .collect::<Vec<_>>(),
            vec![(0, 4), (4, 4), (8, 1)]
        );
        // (2,3,5) with 4: 5 stays, 3*5 > 4 so 3 stays, 2*3 > 4: (2,3,5),
        // then the 5 splits into 4 + 1.
        let b = block_parameter(2, &[2, 3, 5], 4);
        assert_eq!(b[0].merged, vec![2, 3, 5]);
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].dims, vec![2, 3, 1]);
    }

    #[test]
    fn zero_size_parameters_have_no_blocks() {
        assert!(block_parameter(0, &[3, 0, 4], 8).is_empty());
        assert!(block_parameter(0, &[0], 8).is_empty());
    }

    #[test]
    fn blocks_tile_the_parameter_exactly_once() {
        let shapes: &[&[usize]] = &[
            &[],
            &[1],
            &[17],
            &[5, 5],
            &[10, 7],
            &[3, 3, 3],
            &[2, 3, 5],
            &[128, 64, 3, 3],
            &[64, 3, 7, 7],
            &[5, 3, 1000, 2],
            &[1, 9, 1, 13],
            &[31, 1, 2, 17],
        ];
        for max in [1usize, 2, 3, 4, 7, 8, 16, 100, 1024] {
            for shape in shapes {
                let n: usize = shape.iter().product();
                let mut seen = vec![0u8; n];
                let blocks = block_parameter(0, shape, max);
                for b in &blocks {
                    assert!(b.dims.iter().all(|&d| d >= 1 && d <= max.max(1)) || max == 0);
                    let mut covered = 0;
                    b.for_each_run(|src, dst, len| {
                        assert_eq!(dst, covered, "runs come in block order");
                        covered += len;
                        for s in &mut seen[src..src + len] {
                            *s += 1;
                        }
                    });
                    assert_eq!(covered, b.numel());
                }
                assert!(
                    seen.iter().all(|&s| s == 1),
                    "shape {shape:?} max {max}: every element in exactly one block"
                );
            }
        }
    }
}
