//! Root-inverse telemetry: per block and factor, how often the root
//! inverse failed, needed the float64 retry, or kept the previous root.
//!
//! The counters are incremented where the failure rules are applied
//! ([`super::root_inverse`]) and count since the optimizer was built (they
//! are not part of checkpoints). Reading them costs nothing on the device:
//! they live in host memory.

use super::Shampoo;
use crate::backend::Backend;

/// Outcome counts of one factor's root inverses (or of several, summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RootInverseCounters {
    /// Eigendecompositions that failed, after the float64 retry where
    /// there is one (each is also a kept previous root, unless it was the
    /// failure that ended the run).
    pub failures: u64,
    /// Eigendecompositions that succeeded only on the float64 retry.
    pub f64_retries: u64,
    /// Root inverses that kept the previous root after a failure.
    pub kept_previous: u64,
}

impl RootInverseCounters {
    /// Whether nothing was counted.
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &RootInverseCounters) {
        self.failures += other.failures;
        self.f64_retries += other.f64_retries;
        self.kept_previous += other.kept_previous;
    }
}

/// The counters of one factor of one block.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockRootInverseStats {
    /// Global block id.
    pub block: usize,
    /// Index of the block's parameter.
    pub param: usize,
    /// Block shape (after merging).
    pub shape: Vec<usize>,
    /// The factor's dimension.
    pub dim: usize,
    /// Its counts.
    pub counters: RootInverseCounters,
}

impl<B: Backend> Shampoo<B> {
    /// Root-inverse counters of every factor of every owned block that has
    /// any (blocks without events are left out), by block id then dimension.
    pub fn root_inverse_stats(&self) -> Vec<BlockRootInverseStats> {
        let mut out = Vec::new();
        for (g, spec) in self.groups.iter().zip(&self.layout.groups) {
            for f in &g.factors {
                for (slot, c) in f.counters.iter().enumerate() {
                    if c.is_zero() {
                        continue;
                    }
                    let block = spec.blocks[slot];
                    out.push(BlockRootInverseStats {
                        block,
                        param: self.layout.blocks[block].param,
                        shape: spec.dims.clone(),
                        dim: f.spec.dim,
                        counters: *c,
                    });
                }
            }
        }
        out.sort_by_key(|s| (s.block, s.dim));
        out
    }

    /// The counters of every owned block, summed.
    pub fn root_inverse_totals(&self) -> RootInverseCounters {
        let mut total = RootInverseCounters::default();
        for g in &self.groups {
            for f in &g.factors {
                f.counters.iter().for_each(|c| total.add(c));
            }
        }
        total
    }
}
