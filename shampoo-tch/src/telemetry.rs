//! Root-inverse telemetry of every group, by variable name.

use shampoo_core::BlockRootInverseStats;

use crate::Shampoo;

/// The root-inverse counters of one factor of one block of a variable
/// (`shampoo_core`'s per-block telemetry, with the variable's name).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VariableRootInverseStats {
    /// `VarStore` group.
    pub group: usize,
    /// Name of the block's variable.
    pub variable: String,
    /// The block (numbered within its segment), its factor and its counts.
    #[serde(flatten)]
    pub stats: BlockRootInverseStats,
}

impl Shampoo {
    /// Root-inverse counters (failures, float64 retries, kept previous
    /// roots) of every factor with any, since the optimizer was built or
    /// loaded, for the blocks whose state this rank writes to checkpoints:
    /// all of them on one process, its own blocks when sharded, all of
    /// them on rank 0 only when replicated. A sum over the ranks thus
    /// counts every block once.
    pub fn root_inverse_stats(&self) -> Vec<VariableRootInverseStats> {
        let mut out = Vec::new();
        for (&group, g) in &self.groups {
            for seg in &g.segments {
                let stats = seg.engine.root_inverse_stats();
                out.extend(stats.into_iter().map(|stats| VariableRootInverseStats {
                    group,
                    variable: seg.names[stats.param].clone(),
                    stats,
                }));
            }
        }
        out
    }
}
