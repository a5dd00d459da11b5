//! The Shampoo step, written once over [`Backend`].
//!
//! One step, per block (see `docs/architecture.md` for the full math):
//!
//! 0. blocks whose parameter has no gradient are skipped (their state and
//!    parameter stay untouched; the step counter still advances);
//! 1. L2 weight decay: `G <- G + wd W` ([`statistics`]);
//! 2. factor statistics `L_k <- beta2 L_k + (1 - beta2) G_(k) G_(k)^T`
//!    ([`statistics`]);
//! 3. on root-inverse steps, `X_k = (L_k / bc2 + eps I)^(-e_k)` by eigh,
//!    coupled Newton or the coupled higher-order method, the eigenpairs of
//!    eigendecomposed Shampoo, or the eigenbasis for eigenvalue-corrected
//!    Shampoo ([`root_inverse`]);
//! 4. grafting accumulator and filtered gradient `Gf` ([`direction`]);
//! 5. `P = Gf x_1 X_1 ... x_k X_k` (or SOAP's eigenvalue-corrected
//!    direction, or [`orthogonalize`]d or sign descent's), grafted to the
//!    grafting method's norm ([`direction`]);
//! 6. weight decay, 7. momentum, 8. `W <- W - lr P`; with iterate
//!    averaging, its increment instead ([`averaging`]).
//!
//! Steps 1-7 are "computing directions" and can run on a subset of blocks
//! (a distributed rank's own); step 8 applies directions from a packed
//! buffer, which is how ranks share their work.

mod averaging;
mod chain;
mod direction;
mod orthogonalize;
mod root_inverse;
pub(crate) mod state;
mod statistics;
mod telemetry;

use std::time::{Duration, Instant};

use crate::backend::{Backend, Op, ScatterJob, TableEntry, ViewMutOps, ViewOps};
use crate::config::{
    Amortized, Eigendecomposition, Grafting, Orthogonalization, Preconditioner,
    RankDeficientStability, RootInverse, ShampooConfig,
};
use crate::layout::Layout;
use crate::schedule::{AveragingScalars, StepScalars};
use crate::strided::ParamShape;
use crate::{DType, Error, Result};
pub(crate) use averaging::Averaging;
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
    /// The learning rate the optimizer was built with (the peak that the
    /// corrected and independent weight decays divide by).
    pub(crate) peak_lr: f64,
    /// Iterate averaging's per-group scalars and mode.
    pub(crate) averaging: Averaging,
    pub(crate) groups: Vec<GroupState<B>>,
    pub(crate) directions: B::Buffer,
    /// Per parameter: its owned blocks' geometry in the owned-directions
    /// buffer (used by [`Shampoo::step`]).
    local_apply: Vec<B::BlockTable>,
    /// Operand precision of the root iterations' products being queued:
    /// the configured one, and full precision for the batched Newton
    /// iteration's final refinement steps.
    pub(crate) root_products: crate::backend::Precision,
    profile: bool,
    times: PhaseTimes,
}

impl<B: Backend> Shampoo<B> {
    /// Builds an optimizer for parameters of the given shapes and dtype.
    /// A shape with strides ([`crate::strided::StridedShape`]: a
    /// channels-last weight) is read and written in place through them;
    /// its gradients must have the same strides.
    pub fn new<S: ParamShape>(
        config: ShampooConfig,
        shapes: &[S],
        dtype: DType,
        backend: B,
    ) -> Result<Self> {
        Self::with_owned_blocks(config, shapes, dtype, backend, &|_| true)
    }

    /// Builds an optimizer that computes directions only for the blocks for
    /// which `owned(block_id)` is true (a distributed rank's share). State is
    /// allocated for owned blocks only.
    pub fn with_owned_blocks<S: ParamShape>(
        config: ShampooConfig,
        shapes: &[S],
        dtype: DType,
        backend: B,
        owned: &dyn Fn(usize) -> bool,
    ) -> Result<Self> {
        config.validate()?;
        let fdtype = config.factor_dtype_for(dtype);
        for (what, p) in [
            ("preconditioning", config.preconditioning_precision()),
            ("root_iteration", config.root_precision()),
        ] {
            if p == crate::backend::Precision::Bf16 && (dtype == DType::F64 || fdtype == DType::F64)
            {
                return Err(Error::config(format!(
                    "precision.{what} bf16 needs float32 parameters and factors (these are {dtype} and {fdtype})"
                )));
            }
        }
        let layout = Layout::new(shapes, &config, owned)?;
        if let Some((op, feature)) = required_ops(&config)
            .into_iter()
            .find(|(op, _)| !backend.supports(*op))
        {
            return Err(Error::Unsupported {
                backend: backend.name(),
                feature: feature.to_string(),
                op: format!("{op:?}"),
            });
        }
        if matches!(
            config.amortized(),
            Amortized::RootInverse(RootInverse::CoupledHigherOrder { .. })
        ) {
            root_inverse::check_higher_order_roots(&layout)?;
        }
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
        let mut opt = Shampoo {
            peak_lr: config.lr,
            root_products: config.root_precision(),
            config,
            backend,
            layout,
            dtype,
            step: 0,
            averaging: Averaging::default(),
            groups,
            directions,
            local_apply,
            profile: false,
            times: PhaseTimes::default(),
        };
        // Eigendecomposed Shampoo's roots from its initial eigenpairs.
        root_inverse::form_all_roots(&mut opt)?;
        Ok(opt)
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
    /// The learning rate the optimizer was built with: the peak learning
    /// rate of the `corrected` and `independent` weight decays.
    pub fn peak_lr(&self) -> f64 {
        self.peak_lr
    }
    /// Whether the parameters hold the train-mode sequence (always, without
    /// iterate averaging); see [`Shampoo::eval`].
    pub fn is_train_mode(&self) -> bool {
        self.averaging.train_mode
    }
    /// Sets the learning rate (for schedules); takes effect next step. The
    /// peak learning rate ([`Shampoo::peak_lr`]) stays the one the optimizer
    /// was built with.
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
        StepScalars::new(&self.config, self.step + 1, self.peak_lr).root_inverse
    }

    /// Iterate averaging's evaluation view, the published `eval()`: replaces
    /// the parameters (the train-mode sequence `y`, where gradients are
    /// taken) by the averaged sequence `x = y + (1 - 1/mu_y)(Z - y)`.
    /// Steps are refused until [`Shampoo::train`]. Does nothing without
    /// iterate averaging or when already in eval mode.
    pub fn eval(&mut self, params: &mut [B::ViewMut<'_>]) -> Result<()> {
        self.switch_mode(params, true)
    }

    /// Back to training, the published `train()`: replaces the averaged
    /// sequence `x` in the parameters by `y = x + (1 - mu_y)(Z - x)`. Does
    /// nothing without iterate averaging or when already in train mode.
    pub fn train(&mut self, params: &mut [B::ViewMut<'_>]) -> Result<()> {
        self.switch_mode(params, false)
    }

    fn switch_mode(&mut self, params: &mut [B::ViewMut<'_>], to_eval: bool) -> Result<()> {
        let apply = {
            let views: Vec<B::View<'_>> = params.iter().map(|p| self.backend.as_view(p)).collect();
            self.compute_mode_switch(&views, to_eval)?
        };
        if apply {
            let source = self.backend.view(&self.directions);
            apply_packed(&self.backend, &self.local_apply, params, source)?;
        }
        Ok(())
    }

    /// The owned blocks' part of [`Shampoo::eval`] (`to_eval`) or
    /// [`Shampoo::train`]: writes each owned block's parameter increment
    /// into [`Shampoo::directions`] and switches the mode. Returns whether
    /// there is anything to apply (all processes of a distributed optimizer
    /// return the same); the caller then applies the directions like a
    /// step's.
    pub fn compute_mode_switch(&mut self, params: &[B::View<'_>], to_eval: bool) -> Result<bool> {
        let Some(avg) = self.config.iterate_averaging else {
            return Ok(false);
        };
        if self.averaging.train_mode != to_eval {
            return Ok(false);
        }
        self.check_params(params)?;
        self.averaging.train_mode = !to_eval;
        if self.step == 0 {
            // Z is initialized at the first step: until then x = y.
            return Ok(false);
        }
        averaging::switch_increments(self, params, AveragingScalars::switch(&avg, to_eval))?;
        Ok(true)
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
        self.backend.phase("apply");
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
        if !self.averaging.train_mode {
            return Err(averaging::eval_mode_error());
        }
        if self.step == 0 && self.config.iterate_averaging.is_some() {
            averaging::initialize(self, params)?;
        }
        self.step += 1;
        self.times = PhaseTimes::default();
        let mut sc = StepScalars::new(&self.config, self.step, self.peak_lr);
        if let Some(avg) = &self.config.iterate_averaging {
            sc.averaging = Some(AveragingScalars::step(
                avg,
                sc.lr,
                &mut self.averaging.lr_sum,
                sc.decay,
            ));
        }
        let _span = tracing::debug_span!("shampoo_step", t = sc.t).entered();
        self.mark_active(grads);

        let t = Instant::now();
        {
            let _s = tracing::debug_span!("statistics").entered();
            self.backend.phase("statistics");
            statistics::gather(self, params, grads)?;
            statistics::update_factors(self)?;
        }
        self.finish_phase(t, |p, d| p.statistics += d)?;

        if sc.root_inverse {
            let t = Instant::now();
            let _s = tracing::debug_span!("root_inverse").entered();
            self.backend.phase("root_inverse");
            root_inverse::compute(self, &sc)?;
            drop(_s);
            self.finish_phase(t, |p, d| p.root_inverse += d)?;
        }

        let t = Instant::now();
        {
            let _s = tracing::debug_span!("precondition").entered();
            self.backend.phase("precondition");
            direction::gradient_statistics(self, &sc)?;
            direction::precondition(self, &sc)?;
        }
        self.finish_phase(t, |p, d| p.precondition += d)?;

        let t = Instant::now();
        {
            let _s = tracing::debug_span!("update").entered();
            self.backend.phase("update");
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
        self.backend.phase("apply");
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

    fn check_params(&self, params: &[B::View<'_>]) -> Result<()> {
        let n = self.layout.params.len();
        if params.len() != n {
            return Err(Error::shape(format!(
                "expected {n} parameters, got {}",
                params.len()
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
        self.check_params(params)?;
        for (i, info) in self.layout.params.iter().enumerate() {
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

/// The operations a backend must provide beyond the required ones, with the
/// configured feature that needs each (checked at construction).
fn required_ops(config: &ShampooConfig) -> Vec<(Op, &'static str)> {
    let mut ops = Vec::new();
    let eigen = |ops: &mut Vec<(Op, &'static str)>, e: Eigendecomposition| match e {
        Eigendecomposition::Eigh { tolerance: 0.0, .. } => {}
        Eigendecomposition::Eigh { .. } => {
            ops.push((Op::OffDiagonalRatio, "the adaptive eigenbasis update"));
            ops.push((Op::Eigenpairs, "the adaptive eigenbasis update"));
        }
        Eigendecomposition::Qr { .. } => {
            ops.push((Op::Qr, "the QR eigendecomposition"));
            ops.push((Op::OffDiagonalRatio, "the QR eigendecomposition"));
            ops.push((Op::Eigenpairs, "the QR eigendecomposition"));
        }
    };
    match config.amortized() {
        Amortized::RootInverse(RootInverse::CoupledHigherOrder { .. }) => {
            ops.push((Op::CoupledInit, "the coupled higher-order root inverse"));
            ops.push((Op::TraceReductions, "the coupled higher-order root inverse"));
            ops.push((Op::RidgeMaps, "the coupled higher-order root inverse"));
        }
        Amortized::Eigenpairs(e) | Amortized::Eigenbasis(e) => eigen(&mut ops, e),
        _ => {}
    }
    match config.rank_deficient_stability() {
        RankDeficientStability::Perturbation {
            perturb_before_computation: true,
        } => {}
        RankDeficientStability::Perturbation { .. } => {
            ops.push((Op::EigenRules, "perturb_before_computation = false"));
        }
        RankDeficientStability::PseudoInverse { .. } => {
            ops.push((Op::EigenRules, "the pseudo-inverse"));
        }
    }
    if let Some(o) = config.shampoo_options() {
        if o.trace_scaling.is_some() {
            ops.push((Op::TraceReductions, "trace scaling"));
            ops.push((Op::RidgeMaps, "trace scaling"));
        }
        if o.drop_weighting_factor && config.is_eigenvalue_corrected() {
            ops.push((
                Op::EigenvalueOptions,
                "drop_weighting_factor_on_gsquare with eigenvalue_corrected",
            ));
        }
    }
    if let Preconditioner::EigenvalueCorrected {
        inverse_exponent_override,
        ..
    } = &config.preconditioner
        && !inverse_exponent_override.is_empty()
    {
        ops.push((
            Op::EigenvalueOptions,
            "eigenvalue_corrected's inverse_exponent_override",
        ));
    }
    if config.betas[0] != 0.0 && config.beta3() != config.betas[0] {
        ops.push((Op::FilterOptions, "beta3 != betas[0]"));
    }
    if let Some(
        Grafting::Rmsprop {
            drop_weighting_factor_on_gsquare: true,
            ..
        }
        | Grafting::Adam {
            drop_weighting_factor_on_gsquare: true,
            ..
        },
    ) = config.grafting
    {
        ops.push((
            Op::FilterOptions,
            "drop_weighting_factor_on_gsquare in grafting",
        ));
    }
    match config.preconditioner {
        Preconditioner::SpectralDescent {
            orthogonalization: Orthogonalization::NewtonSchulz { .. },
        } => ops.push((Op::DirectionMaps, "spectral descent (Newton-Schulz)")),
        Preconditioner::SpectralDescent {
            orthogonalization: Orthogonalization::Svd { .. },
        } => {
            ops.push((Op::Orthogonalize, "spectral descent by SVD"));
            ops.push((Op::DirectionMaps, "spectral descent by SVD"));
        }
        Preconditioner::SignDescent => ops.push((Op::DirectionMaps, "sign descent")),
        _ => {}
    }
    if config.iterate_averaging.is_some() {
        ops.push((Op::AveragingMaps, "iterate averaging"));
    }
    ops
}
