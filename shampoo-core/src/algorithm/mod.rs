//! The Shampoo step, written once over [`Backend`].
//!
//! One step, per block (see `docs/architecture.md` for the full math):
//!
//! 0. blocks whose parameter has no gradient are skipped (their state and
//!    parameter stay untouched; the step counter still advances);
//! 1. L2 weight decay: `G <- G + wd W` ([`statistics`]);
//! 2. factor statistics `L_k <- beta2 L_k + (1 - beta2) G_(k) G_(k)^T`
//!    ([`statistics`]);
//! 3. on root-inverse steps, `X_k = (L_k / bc2 + eps I)^(-e_k)` by eigh or
//!    coupled Newton, or the eigenbasis for eigenvalue-corrected Shampoo
//!    ([`root_inverse`]);
//! 4. grafting accumulator and filtered gradient `Gf` ([`direction`]);
//! 5. `P = Gf x_1 X_1 ... x_k X_k`, grafted to the grafting method's norm
//!    ([`direction`]);
//! 6. decoupled weight decay, 7. momentum, 8. `W <- W - lr P`.
//!
//! Steps 1-7 are "computing directions" and can run on a subset of blocks
//! (a distributed rank's own); step 8 applies directions from a packed
//! buffer, which is how ranks share their work.

mod direction;
mod root_inverse;
pub(crate) mod state;
mod statistics;
mod telemetry;

use std::time::{Duration, Instant};

use crate::backend::{Backend, ScatterJob, TableEntry, ViewMutOps, ViewOps};
use crate::config::ShampooConfig;
use crate::layout::Layout;
use crate::schedule::StepScalars;
use crate::{DType, Error, Result};
use state::GroupState;
pub use telemetry::{BlockRootInverseStats, RootInverseCounters};

/// Wall-clock time of each phase of the last step (measured only when
/// profiling is on, since it synchronises the device after each phase).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    /// Gathering blocks and factor statistics.
    pub statistics: Duration,
    /// Root inverses (zero on steps without).
    pub root_inverse: Duration,
    /// Grafting, filtering and preconditioning.
    pub precondition: Duration,
    /// Final direction and the parameter update.
    pub update: Duration,
}

impl PhaseTimes {
    /// Sum of all phases.
    pub fn total(&self) -> Duration {
        self.statistics + self.root_inverse + self.precondition + self.update
    }
}

/// The Shampoo optimizer for one parameter group on one backend.
pub struct Shampoo<B: Backend> {
    pub(crate) config: ShampooConfig,
    pub(crate) backend: B,
    pub(crate) layout: Layout,
    pub(crate) dtype: DType,
    pub(crate) step: u64,
    pub(crate) groups: Vec<GroupState<B>>,
    pub(crate) directions: B::Buffer,
    /// Per parameter: its owned blocks' geometry in the owned-directions
    /// buffer (used by [`Shampoo::step`]).
    local_apply: Vec<B::BlockTable>,
    profile: bool,
    times: PhaseTimes,
}

impl<B: Backend> Shampoo<B> {
    /// Builds an optimizer for parameters of the given shapes and dtype.
    pub fn new(
        config: ShampooConfig,
        shapes: &[Vec<usize>],
        dtype: DType,
        backend: B,
    ) -> Result<Self> {
        Self::with_owned_blocks(config, shapes, dtype, backend, &|_| true)
    }

    /// Builds an optimizer that computes directions only for the blocks for
    /// which `owned(block_id)` is true (a distributed rank's share). State is
    /// allocated for owned blocks only.
    pub fn with_owned_blocks(
        config: ShampooConfig,
        shapes: &[Vec<usize>],
        dtype: DType,
        backend: B,
        owned: &dyn Fn(usize) -> bool,
    ) -> Result<Self> {
        config.validate()?;
        let layout = Layout::new(shapes, &config, owned)?;
        let groups = state::allocate_groups(&backend, &config, &layout, dtype)?;
        let directions = backend.alloc(dtype, layout.direction_len)?;
        let offsets = layout.direction_offsets();
        let local_apply = Self::build_apply_tables(&backend, &layout, &offsets)?;
        tracing::debug!(
            backend = %backend.name(),
            params = layout.params.len(),
            blocks = layout.blocks.len(),
            groups = layout.groups.len(),
            "shampoo optimizer built"
        );
        Ok(Shampoo {
            config,
            backend,
            layout,
            dtype,
            step: 0,
            groups,
            directions,
            local_apply,
            profile: false,
            times: PhaseTimes::default(),
        })
    }

    fn build_apply_tables(
        backend: &B,
        layout: &Layout,
        offsets: &[Option<usize>],
    ) -> Result<Vec<B::BlockTable>> {
        layout
            .params
            .iter()
            .map(|p| {
                let entries = p
                    .blocks
                    .clone()
                    .filter_map(|id| {
                        offsets[id].map(|off| TableEntry {
                            block: layout.blocks[id].clone(),
                            packed_offset: off,
                        })
                    })
                    .collect();
                backend.block_table(entries)
            })
            .collect()
    }

    /// Per-parameter tables for applying directions packed at `offsets`
    /// (indexed by global block id; blocks with `None` are not applied).
    pub fn apply_tables(&self, offsets: &[Option<usize>]) -> Result<Vec<B::BlockTable>> {
        if offsets.len() != self.layout.blocks.len() {
            return Err(Error::shape(format!(
                "{} block offsets for {} blocks",
                offsets.len(),
                self.layout.blocks.len()
            )));
        }
        Self::build_apply_tables(&self.backend, &self.layout, offsets)
    }

    /// The configuration.
    pub fn config(&self) -> &ShampooConfig {
        &self.config
    }
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// Blocks and groups.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// Parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }
    /// Sets the learning rate (for schedules); takes effect next step.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::config(format!(
                "lr must be finite and >= 0, got {lr}"
            )));
        }
        self.config.lr = lr;
        Ok(())
    }
    /// Turns per-phase timing on (synchronises after every phase).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on;
    }
    /// Phase times of the last step (zero unless profiling).
    pub fn phase_times(&self) -> PhaseTimes {
        self.times
    }
    /// The owned blocks' directions (`-lr * P`) of the last step, packed in
    /// group order ([`Layout::direction_offsets`]).
    pub fn directions(&self) -> B::View<'_> {
        self.backend.view(&self.directions)
    }
    /// Whether the next step recomputes root inverses.
    pub fn next_step_has_root_inverse(&self) -> bool {
        StepScalars::new(&self.config, self.step + 1).root_inverse
    }

    /// One optimizer step on all parameters: `W <- W - lr * P`.
    ///
    /// `grads[i]` is `None` when parameter `i` has no gradient this step.
    pub fn step(
        &mut self,
        params: &mut [B::ViewMut<'_>],
        grads: &[Option<B::View<'_>>],
    ) -> Result<()> {
        {
            let views: Vec<B::View<'_>> = params.iter().map(|p| self.backend.as_view(p)).collect();
            let grads: Vec<Option<B::View<'_>>> = grads.iter().map(|g| g.map(B::shorten)).collect();
            self.compute_directions(&views, &grads)?;
        }
        let t = Instant::now();
        let source = self.backend.view(&self.directions);
        apply_packed(&self.backend, &self.local_apply, params, source)?;
        self.finish_phase(t, |p, d| p.update += d)?;
        Ok(())
    }

    /// Steps 1-7 for the owned blocks: writes `-lr * P` of every owned block
    /// into [`Shampoo::directions`]. Blocks without a gradient get `-0.0`,
    /// which leaves their parameter bit for bit unchanged when added.
    pub fn compute_directions<'s>(
        &mut self,
        params: &[B::View<'s>],
        grads: &[Option<B::View<'s>>],
    ) -> Result<()> {
        self.check_inputs(params, grads)?;
        self.step += 1;
        self.times = PhaseTimes::default();
        let sc = StepScalars::new(&self.config, self.step);
        let _span = tracing::debug_span!("shampoo_step", t = sc.t).entered();
        self.mark_active(grads);

        let t = Instant::now();
        {
            let _s = tracing::debug_span!("statistics").entered();
            statistics::gather(self, params, grads)?;
            statistics::update_factors(self)?;
        }
        self.finish_phase(t, |p, d| p.statistics += d)?;

        if sc.root_inverse {
            let t = Instant::now();
            let _s = tracing::debug_span!("root_inverse").entered();
            root_inverse::compute(self, &sc)?;
            drop(_s);
            self.finish_phase(t, |p, d| p.root_inverse += d)?;
        }

        let t = Instant::now();
        {
            let _s = tracing::debug_span!("precondition").entered();
            direction::gradient_statistics(self, &sc)?;
            direction::precondition(self, &sc)?;
        }
        self.finish_phase(t, |p, d| p.precondition += d)?;

        let t = Instant::now();
        {
            let _s = tracing::debug_span!("update").entered();
            direction::finish(self, &sc)?;
        }
        self.finish_phase(t, |p, d| p.update += d)?;
        Ok(())
    }

    /// Step 8 for packed directions of any blocks: `W += source` through
    /// `tables` (from [`Shampoo::apply_tables`]).
    pub fn apply_directions(
        &mut self,
        params: &mut [B::ViewMut<'_>],
        source: B::View<'_>,
        tables: &[B::BlockTable],
    ) -> Result<()> {
        if params.len() != self.layout.params.len() || tables.len() != params.len() {
            return Err(Error::shape(format!(
                "{} parameters and {} tables for an optimizer of {} parameters",
                params.len(),
                tables.len(),
                self.layout.params.len()
            )));
        }
        let t = Instant::now();
        apply_packed(&self.backend, tables, params, source)?;
        self.finish_phase(t, |p, d| p.update += d)
    }

    fn finish_phase(
        &mut self,
        t: Instant,
        add: impl FnOnce(&mut PhaseTimes, Duration),
    ) -> Result<()> {
        if self.profile {
            self.backend.synchronize()?;
            add(&mut self.times, t.elapsed());
        }
        Ok(())
    }

    fn check_inputs(&self, params: &[B::View<'_>], grads: &[Option<B::View<'_>>]) -> Result<()> {
        let n = self.layout.params.len();
        if params.len() != n || grads.len() != n {
            return Err(Error::shape(format!(
                "expected {n} parameters and gradients, got {} and {}",
                params.len(),
                grads.len()
            )));
        }
        for (i, info) in self.layout.params.iter().enumerate() {
            let p = &params[i];
            if p.dtype() != self.dtype {
                return Err(Error::DType {
                    what: format!("parameter {i}"),
                    found: p.dtype(),
                    expected: self.dtype,
                });
            }
            if p.len() != info.numel {
                return Err(Error::shape(format!(
                    "parameter {i} has {} elements, its shape {:?} has {}",
                    p.len(),
                    info.shape,
                    info.numel
                )));
            }
            if let Some(g) = &grads[i] {
                if g.dtype() != self.dtype {
                    return Err(Error::DType {
                        what: format!("gradient {i}"),
                        found: g.dtype(),
                        expected: self.dtype,
                    });
                }
                if g.len() != info.numel {
                    return Err(Error::shape(format!(
                        "gradient {i} has {} elements, parameter shape {:?} has {}",
                        g.len(),
                        info.shape,
                        info.numel
                    )));
                }
            }
        }
        Ok(())
    }

    /// Records which blocks of each group have a gradient this step.
    fn mark_active(&mut self, grads: &[Option<B::View<'_>>]) {
        for (gi, g) in self.groups.iter_mut().enumerate() {
            let blocks = &self.layout.groups[gi].blocks;
            let has = |id: &usize| grads[self.layout.blocks[*id].param].is_some();
            if blocks.iter().all(has) {
                g.active = None;
                g.any_active = true;
            } else {
                let sel = g.active.get_or_insert_with(Vec::new);
                sel.clear();
                sel.extend(
                    blocks
                        .iter()
                        .enumerate()
                        .filter(|(_, id)| has(id))
                        .map(|(s, _)| s as u32),
                );
                g.any_active = !sel.is_empty();
            }
        }
    }
}

/// `W += packed` for every parameter through its table.
fn apply_packed<B: Backend>(
    backend: &B,
    tables: &[B::BlockTable],
    params: &mut [B::ViewMut<'_>],
    source: B::View<'_>,
) -> Result<()> {
    let mut jobs: Vec<ScatterJob<'_, B>> = params
        .iter_mut()
        .zip(tables)
        .filter(|(p, _)| !p.is_empty())
        .map(|(p, table)| ScatterJob {
            table,
            source: B::shorten(source),
            dst: backend.reborrow(p),
            add: true,
        })
        .collect();
    backend.scatter(&mut jobs)
}
