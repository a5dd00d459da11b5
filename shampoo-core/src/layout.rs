//! Layout: every parameter's blocks, and the groups of same-shape blocks that
//! a backend processes as one batch.
//!
//! Blocks have global ids (parameter order, then row-major block order) that
//! are the same in every process, so that distributed ranks agree on them
//! without communicating. A layout may *own* only some blocks (the rest are
//! computed by other ranks); groups and state cover owned blocks only.

use crate::blocking::{BlockSpec, block_parameter_min_order};
use crate::config::{Preconditioner, ShampooConfig};
use crate::strided::{ParamShape, Strided};
use crate::{Error, Result};

/// One preconditioned dimension of a group's blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorSpec {
    /// Which block dimension.
    pub dim: usize,
    /// Its size: the factor is `size x size`.
    pub size: usize,
    /// Inverse exponent `e` (the root is `X = A^-e`).
    pub exponent: f64,
}

/// Blocks of one shape, processed together.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Block shape.
    pub dims: Vec<usize>,
    /// Elements per block.
    pub numel: usize,
    /// Global ids of the group's blocks, ascending.
    pub blocks: Vec<usize>,
    /// Preconditioned dimensions (exponent != 0).
    pub factors: Vec<FactorSpec>,
    /// Offset of the group's first element in the owned-directions buffer.
    pub direction_offset: usize,
}

impl Group {
    /// Number of blocks.
    pub fn count(&self) -> usize {
        self.blocks.len()
    }
    /// Elements of all blocks.
    pub fn len(&self) -> usize {
        self.count() * self.numel
    }
    /// Whether the group has no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// A parameter as the optimizer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// Shape as given.
    pub shape: Vec<usize>,
    /// Number of elements.
    pub numel: usize,
    /// Global ids of its blocks (a contiguous range).
    pub blocks: std::ops::Range<usize>,
}

/// Blocks, groups and the owned-directions buffer layout.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Parameters, in the order given.
    pub params: Vec<ParamInfo>,
    /// All blocks of all parameters (owned or not).
    pub blocks: Vec<BlockSpec>,
    /// Groups of owned blocks, ordered by their first block.
    pub groups: Vec<Group>,
    /// For every block: `(group, slot)` if owned.
    pub slots: Vec<Option<(usize, usize)>>,
    /// Elements in the owned-directions buffer.
    pub direction_len: usize,
}

impl Layout {
    /// Builds the layout of `shapes` under `config`, owning the blocks for
    /// which `owned(block_id)` is true.
    /// Parameters given with strides ([`StridedShape`](crate::strided::StridedShape))
    /// are blocked on their logical order; their blocks address memory
    /// through the strides.
    pub fn new<S: ParamShape>(
        shapes: &[S],
        config: &ShampooConfig,
        owned: &dyn Fn(usize) -> bool,
    ) -> Result<Layout> {
        let max = config.max_preconditioner_dim;
        // Spectral descent keeps at least two dimensions (the published
        // target_parameter_dimensionality = 2), and needs exactly two.
        let spectral = matches!(
            config.preconditioner,
            Preconditioner::SpectralDescent { .. }
        );
        let min_order = if spectral { 2 } else { 1 };
        let mut params = Vec::with_capacity(shapes.len());
        let mut blocks = Vec::new();
        for (p, given) in shapes.iter().enumerate() {
            let shape = given.dims();
            let memory = match given.strides() {
                Some(st) => Strided::new(&format!("parameter {p}"), shape, st)?,
                None => None,
            };
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::shape(format!("parameter {p}: shape {shape:?} overflows")))?;
            let start = blocks.len();
            let mine = block_parameter_min_order(p, shape, max, min_order, memory);
            if spectral && let Some(b) = mine.iter().find(|b| b.order() != 2) {
                return Err(Error::config(format!(
                    "spectral_descent needs every block to be 2-D after merging, but parameter {p} of shape {shape:?} gives {}-D blocks ({:?}): use another preconditioner for it (a separate optimizer)",
                    b.order(),
                    b.merged
                )));
            }
            blocks.extend(mine);
            params.push(ParamInfo {
                shape: shape.to_vec(),
                numel,
                blocks: start..blocks.len(),
            });
        }
        let precondition = config.start_step().is_some();
        let mut groups: Vec<Group> = Vec::new();
        let mut slots = vec![None; blocks.len()];
        for (id, b) in blocks.iter().enumerate() {
            if !owned(id) {
                continue;
            }
            let g = match groups.iter().position(|g| g.dims == b.dims) {
                Some(g) => g,
                None => {
                    let order = b.dims.len();
                    let factors = if precondition {
                        (0..order)
                            .map(|dim| FactorSpec {
                                dim,
                                size: b.dims[dim],
                                exponent: config.inverse_exponent(order, dim),
                            })
                            .filter(|f| f.exponent != 0.0)
                            .collect()
                    } else {
                        Vec::new()
                    };
                    groups.push(Group {
                        dims: b.dims.clone(),
                        numel: b.numel(),
                        blocks: Vec::new(),
                        factors,
                        direction_offset: 0,
                    });
                    groups.len() - 1
                }
            };
            slots[id] = Some((g, groups[g].blocks.len()));
            groups[g].blocks.push(id);
        }
        let mut off = 0;
        for g in &mut groups {
            g.direction_offset = off;
            off += g.len();
        }
        Ok(Layout {
            params,
            blocks,
            groups,
            slots,
            direction_len: off,
        })
    }

    /// Offsets of every owned block's direction in the owned-directions
    /// buffer, by global block id (`None` for blocks owned elsewhere).
    pub fn direction_offsets(&self) -> Vec<Option<usize>> {
        self.slots
            .iter()
            .map(|s| {
                s.map(|(g, slot)| {
                    let g = &self.groups[g];
                    g.direction_offset + slot * g.numel
                })
            })
            .collect()
    }

    /// Total number of parameter elements.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.numel).sum()
    }
}
