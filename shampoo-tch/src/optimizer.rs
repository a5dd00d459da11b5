//! [`Shampoo`]: the optimizer object a `tch` training loop holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shampoo_core::strided::StridedShape;
use shampoo_core::{DType, HostView, HostViewMut, ShampooConfig};
use shampoo_dist::{Collectives, Communicator, DistOptions, SingleProcess};
use tch::nn::{VarStore, Variables};
use tch::{COptimizer, Device, Kind, Tensor};

use crate::dist::name_presence;
use crate::engine::{self, Engine, EngineOptions};
use crate::vars::{self, Var};
use crate::{Error, Result};

/// Where the time of the last [`Shampoo::step`] went, and what it moved,
/// summed over groups. On a GPU the times are those of queueing the work,
/// which runs asynchronously.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTimings {
    /// Averaging gradients across ranks (zero on one process).
    pub all_reduce: Duration,
    /// Computing this rank's directions (and, replicated, updating the
    /// parameters).
    pub optimizer: Duration,
    /// Sharing directions across ranks and applying them (zero when
    /// replicated).
    pub all_gather: Duration,
    /// Bytes the all-gathers of the step produced on this rank (every
    /// rank's directions, in the communication dtype; zero when
    /// replicated).
    pub gathered_bytes: usize,
}

/// A set of variables of one group optimized together by one engine.
///
/// A group starts with one segment; variables added to the `VarStore` later
/// form a new segment, so the state of the earlier ones carries over.
pub(crate) struct Segment {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    /// The variables' element strides (canonical, `vars::memory_strides`)
    /// the engine reads and writes them through.
    pub strides: Vec<Vec<usize>>,
    pub dtype: DType,
    pub device: Device,
    pub engine: Box<dyn Engine>,
}

impl Segment {
    /// An engine error, with a gradient present on some ranks only named by
    /// its variable.
    fn err(&self, e: Error) -> Error {
        match e {
            Error::Dist(d) => name_presence(d, &self.names),
            e => e,
        }
    }
}

/// One `VarStore` group: its config and its segments.
pub(crate) struct Group {
    pub config: ShampooConfig,
    pub segments: Vec<Segment>,
}

/// Shampoo over the trainable variables of a [`VarStore`], used like tch's
/// `nn::Optimizer`.
///
/// Parameters and gradients are read and written in place through their
/// data pointers (dense tensors of `f32` or `f64` on the CPU, or on a
/// CUDA device with feature `cuda`); nothing is copied, and on a GPU the
/// work is queued on libtorch's stream (see [`ShampooBuilder::cuda_stream`]). The variables are read from the `VarStore` at every step, by
/// name, so variables created after the optimizer are picked up. Each
/// `VarStore` group (`vs.root().set_group(g)`) has its own config and its
/// own optimizer state.
pub struct Shampoo {
    pub(crate) variables: Arc<Mutex<Variables>>,
    pub(crate) default: ShampooConfig,
    pub(crate) configs: BTreeMap<usize, ShampooConfig>,
    pub(crate) groups: BTreeMap<usize, Group>,
    pub(crate) engine_opts: EngineOptions,
    /// The ranks (`None`: one process).
    pub(crate) collectives: Option<Collectives>,
    pub(crate) dist_opts: DistOptions,
    /// The gradients were averaged already (by a clip).
    grads_reduced: bool,
    zeroer: COptimizer,
    zeroer_vars: usize,
    timings: StepTimings,
}

/// Builds a [`Shampoo`] with per-group configs (see [`Shampoo::builder`]).
pub struct ShampooBuilder {
    variables: Arc<Mutex<Variables>>,
    default: ShampooConfig,
    configs: BTreeMap<usize, ShampooConfig>,
    engine_opts: EngineOptions,
    comm: Option<Arc<dyn Communicator>>,
    collectives: Option<Collectives>,
    dist_opts: DistOptions,
    #[cfg(feature = "nccl")]
    nccl: Option<Arc<shampoo_dist::collective::nccl::NcclCollective>>,
}

impl ShampooBuilder {
    /// Config for a `VarStore` group (tch's `vs.root().set_group(g)`), for
    /// example Adam grafting only (`"start_preconditioning_step": "never"`)
    /// for biases and norms. Groups without a config of their own use the
    /// default.
    pub fn group(mut self, group: usize, config: ShampooConfig) -> Self {
        self.configs.insert(group, config);
        self
    }

    /// Worker threads of each group's CPU backend (0, the default: one per
    /// core, or `SHAMPOO_THREADS` when set).
    pub fn threads(mut self, threads: usize) -> Self {
        self.engine_opts.threads = threads;
        self
    }

    /// Queue the work of CUDA groups on `stream` (a `CUstream`, e.g. the
    /// current stream of code that trains on a stream of its own) instead of
    /// the legacy default stream, which is libtorch's current stream unless
    /// the caller changed it. Work queued on the same stream is ordered
    /// without synchronisation; with any other non-blocking stream the
    /// caller must synchronise before [`Shampoo::step`].
    ///
    /// # Safety
    ///
    /// `stream` must be a valid stream of the primary context of the device
    /// the variables are on, and outlive the optimizer.
    #[cfg(feature = "cuda")]
    pub unsafe fn cuda_stream(mut self, stream: *mut std::ffi::c_void) -> Self {
        self.engine_opts.cuda_stream = Some(stream as usize);
        self
    }

    /// Data-parallel over the ranks of a host communicator: every step
    /// averages the gradients across the ranks, each rank computes the
    /// directions of its own share of the blocks, and one all-gather shares
    /// them (`shampoo_dist::DistributedShampoo`, one per segment, all on
    /// this communicator). CPU variables communicate through it directly,
    /// CUDA variables through it staged through host memory, unless the
    /// builder also has NCCL ([`ShampooBuilder::nccl`]). Every rank must
    /// build the optimizer over the same variables and call the same methods
    /// in the same order.
    pub fn communicator(mut self, comm: Arc<dyn Communicator>) -> Self {
        self.comm = Some(comm);
        self
    }

    /// Data-parallel over `collectives` (a host communicator and, for GPU
    /// ranks, NCCL): as [`ShampooBuilder::communicator`], with the device
    /// collective chosen by the caller.
    pub fn collectives(mut self, collectives: Collectives) -> Self {
        self.collectives = Some(collectives);
        self
    }

    /// Data-parallel without sharding: every step averages the gradients
    /// across ranks, then every rank computes the directions of every block,
    /// so no directions are exchanged (`DistOptions::replicated`). An
    /// explicit choice, never a fallback: by default blocks are spread over
    /// the ranks, on the CPU and on GPUs. Results are those of sharding with
    /// full-precision communication (bitwise on the CPU).
    pub fn replicated(mut self, on: bool) -> Self {
        self.engine_opts.replicated = on;
        self
    }

    /// Communicate CUDA memory with this NCCL collective (on the device, on
    /// the backend's stream) instead of staging it through the host. Used
    /// with [`ShampooBuilder::communicator`], whose ranks it must have
    /// (checked by `build`); CPU groups keep the host communicator.
    #[cfg(feature = "nccl")]
    pub fn nccl(mut self, nccl: Arc<shampoo_dist::collective::nccl::NcclCollective>) -> Self {
        self.nccl = Some(nccl);
        self
    }

    /// Options of the distributed step (communication dtype, ...); used
    /// with [`ShampooBuilder::communicator`].
    pub fn dist_options(mut self, opts: DistOptions) -> Self {
        self.dist_opts = opts;
        self
    }

    /// Validates the configs and builds the optimizer over the variables
    /// the `VarStore` holds now (later ones are picked up at each step).
    pub fn build(#[allow(unused_mut)] mut self) -> Result<Shampoo> {
        self.default.validate()?;
        for (&group, c) in &self.configs {
            c.validate().map_err(|e| Error::Group {
                group,
                reason: e.to_string(),
            })?;
        }
        let collectives = match (self.collectives, self.comm) {
            (Some(_), Some(_)) => {
                return Err(Error::Options(
                    "give the ranks either as `communicator` or as `collectives`, not both".into(),
                ));
            }
            (Some(c), None) => Some(c),
            (None, Some(comm)) => {
                #[cfg(feature = "nccl")]
                if let Some(nccl) = self.nccl.take() {
                    Some(
                        Collectives::with_nccl(comm, nccl)
                            .map_err(|e| Error::Options(e.to_string()))?,
                    )
                } else {
                    Some(Collectives::host(comm))
                }
                #[cfg(not(feature = "nccl"))]
                Some(Collectives::host(comm))
            }
            (None, None) => None,
        };
        #[cfg(feature = "nccl")]
        if self.nccl.is_some() {
            return Err(Error::Options(
                "an NCCL communicator needs a host communicator too (`communicator`)".into(),
            ));
        }
        let zeroer = COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false)?;
        let mut opt = Shampoo {
            variables: self.variables,
            default: self.default,
            configs: self.configs,
            groups: BTreeMap::new(),
            engine_opts: self.engine_opts,
            collectives,
            dist_opts: self.dist_opts,
            grads_reduced: false,
            zeroer,
            zeroer_vars: 0,
            timings: StepTimings::default(),
        };
        opt.track_new_variables()?;
        opt.sync()?;
        Ok(opt)
    }
}

impl Shampoo {
    /// One group: every trainable variable of `vs` with `config`.
    pub fn new(vs: &VarStore, config: ShampooConfig) -> Result<Shampoo> {
        Self::builder(vs, config).build()
    }

    /// A builder with `default` for every group, refined per group with
    /// [`ShampooBuilder::group`].
    pub fn builder(vs: &VarStore, default: ShampooConfig) -> ShampooBuilder {
        ShampooBuilder {
            variables: vs.variables_.clone(),
            default,
            configs: BTreeMap::new(),
            engine_opts: EngineOptions::default(),
            comm: None,
            collectives: None,
            dist_opts: DistOptions::default(),
            #[cfg(feature = "nccl")]
            nccl: None,
        }
    }

    /// The config a group uses (its own, else the default).
    pub fn config(&self, group: usize) -> &ShampooConfig {
        self.configs.get(&group).unwrap_or(&self.default)
    }

    /// The groups that hold variables now or have a config of their own.
    pub fn groups(&self) -> Vec<usize> {
        let mut g: Vec<usize> = self
            .groups
            .keys()
            .chain(self.configs.keys())
            .copied()
            .collect();
        g.sort_unstable();
        g.dedup();
        g
    }

    /// Steps taken by the oldest segment of `group` (`None` for a group
    /// without variables).
    pub fn step_count(&self, group: usize) -> Option<u64> {
        let seg = self.groups.get(&group)?.segments.first()?;
        Some(seg.engine.step_count())
    }

    /// The host communicator of a data-parallel optimizer.
    pub fn communicator(&self) -> Option<&Arc<dyn Communicator>> {
        self.collectives.as_ref().map(Collectives::communicator)
    }

    /// The collectives of a data-parallel optimizer.
    pub fn collectives(&self) -> Option<&Collectives> {
        self.collectives.as_ref()
    }

    /// Bytes of optimizer state this rank holds (on the variables'
    /// devices), over every group: about `1/W` of the whole when sharded.
    pub fn state_bytes(&self) -> usize {
        self.groups
            .values()
            .flat_map(|g| &g.segments)
            .map(|s| s.engine.state_bytes())
            .sum()
    }

    /// Resets every gradient to undefined, as tch's `nn::Optimizer` does
    /// (libtorch's `zero_grad` with `set_to_none`): a variable that takes
    /// no part in the next backward pass has no gradient and is skipped.
    pub fn zero_grad(&mut self) {
        self.grads_reduced = false;
        if let Err(e) = self.track_new_variables() {
            tracing::warn!("zero_grad: cannot track new variables: {e}");
        }
        if let Err(e) = self.zeroer.zero_grad() {
            tracing::warn!("zero_grad failed: {e}");
        }
    }

    /// Adds variables created since the last call to the libtorch optimizer
    /// used for `zero_grad`.
    fn track_new_variables(&mut self) -> Result<()> {
        let v = self.variables.lock().map_err(|_| Error::Group {
            group: 0,
            reason: "the VarStore's lock is poisoned (a thread panicked while holding it)".into(),
        })?;
        for var in &v.trainable_variables[self.zeroer_vars.min(v.trainable_variables.len())..] {
            self.zeroer.add_parameters(&var.tensor, 0)?;
        }
        self.zeroer_vars = v.trainable_variables.len();
        Ok(())
    }

    /// Runs `loss.backward()` after resetting the gradients, then steps.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }

    /// As [`Shampoo::backward_step`], clamping every gradient value to
    /// `[-max, max]` ([`Shampoo::clip_grad_value`]) before stepping, as
    /// tch's `backward_step_clip`.
    pub fn backward_step_clip(&mut self, loss: &Tensor, max: f64) -> Result<()> {
        self.zero_grad();
        loss.f_backward()?;
        self.clip_grad_value(max)?;
        self.step()
    }

    /// As [`Shampoo::backward_step`], clipping the gradients' total L2 norm
    /// to `max_norm` ([`Shampoo::clip_grad_norm`]) before stepping, as tch's
    /// `backward_step_clip_norm`.
    pub fn backward_step_clip_norm(&mut self, loss: &Tensor, max_norm: f64) -> Result<()> {
        self.zero_grad();
        loss.f_backward()?;
        self.clip_grad_norm(max_norm)?;
        self.step()
    }

    /// Clamps every gradient value to `[-max, max]` (tch's
    /// `clip_grad_value`, `torch.nn.utils.clip_grad_value_`).
    ///
    /// Data-parallel, it first averages the gradients across ranks (the
    /// next step does not average them again), so every rank clips the same
    /// averaged gradients, as one process would. On an error nothing is
    /// clipped.
    pub fn clip_grad_value(&mut self, max: f64) -> Result<()> {
        if !max.is_finite() || max < 0.0 {
            return Err(Error::Options(format!(
                "clip_grad_value: max must be finite and >= 0, got {max}"
            )));
        }
        let _guard = tch::no_grad_guard();
        let grads = self.gradients_to_clip()?;
        for (_, g, _) in &grads {
            let _clamped = g.shallow_clone().f_clamp_(-max, max)?;
        }
        Ok(())
    }

    /// Every gradient, averaged over the ranks first (once per step), each
    /// with its variable's name and dtype, checked to share no memory.
    fn gradients_to_clip(&mut self) -> Result<Vec<(String, Tensor, DType)>> {
        if self.collectives.is_some() && !self.grads_reduced {
            self.reduce_gradients()?;
        }
        let groups = vars::read_groups(&self.variables)?;
        let mut grads = Vec::new();
        for v in groups.values().flatten() {
            if let Some(g) = vars::gradient(v)? {
                grads.push((v.name.clone(), g, v.dtype));
            }
        }
        let list: Vec<(&str, &Tensor, DType)> =
            grads.iter().map(|(n, g, d)| (n.as_str(), g, *d)).collect();
        vars::check_disjoint(&list)?;
        Ok(grads)
    }

    /// Scales every gradient by `max_norm / (norm + 1e-6)` when that is
    /// below one, `norm` being the L2 norm of all gradients together (as
    /// `torch.nn.utils.clip_grad_norm_`); returns `norm`, before clipping.
    ///
    /// Data-parallel, it first averages the gradients across ranks (the
    /// next step does not average them again), so every rank clips the same
    /// averaged gradients, as one process would.
    ///
    /// The norm is accumulated in `f64`; the factor is applied in the
    /// gradients' dtype. On an error (a variable that cannot be used, see
    /// [`Shampoo::step`]; a failed all-reduce) nothing is scaled.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        if !max_norm.is_finite() || max_norm < 0.0 {
            return Err(Error::Options(format!(
                "clip_grad_norm: max_norm must be finite and >= 0, got {max_norm}"
            )));
        }
        let _guard = tch::no_grad_guard();
        let grads = self.gradients_to_clip()?;
        // Host gradients are summed here in f64; device gradients by
        // libtorch on their device (in f64), read back once per device.
        let mut sum = 0.0f64;
        let mut device_sums: Vec<(Device, Tensor)> = Vec::new();
        for (_, g, d) in &grads {
            if g.device() != Device::Cpu {
                let s = g.f_to_kind(Kind::Double)?.f_square()?.f_sum(Kind::Double)?;
                device_sums.push((g.device(), s));
                continue;
            }
            // SAFETY: checked CPU dense tensors, disjoint, held alive by
            // `grads`; only read here.
            match unsafe { vars::view(g, *d) } {
                HostView::F32(s) => sum += s.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>(),
                HostView::F64(s) => sum += s.iter().map(|&x| x * x).sum::<f64>(),
            }
        }
        while let Some(&(device, _)) = device_sums.first() {
            let (on, rest): (Vec<_>, Vec<_>) =
                device_sums.into_iter().partition(|(d, _)| *d == device);
            let on: Vec<Tensor> = on.into_iter().map(|(_, t)| t).collect();
            sum += Tensor::f_stack(&on, 0)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
            device_sums = rest;
        }
        let norm = sum.sqrt();
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for (_, g, d) in &grads {
                if g.device() != Device::Cpu {
                    // libtorch rounds the factor to the gradient's dtype, as
                    // the host path does.
                    let _scaled = g.shallow_clone().f_mul_scalar_(coef)?;
                    continue;
                }
                // SAFETY: as above; each gradient is viewed once at a time.
                match unsafe { vars::view_mut(g, *d) } {
                    HostViewMut::F32(s) => {
                        let c = coef as f32;
                        s.iter_mut().for_each(|x| *x *= c);
                    }
                    HostViewMut::F64(s) => s.iter_mut().for_each(|x| *x *= coef),
                }
            }
        }
        Ok(norm)
    }

    /// Sets the learning rate of every group (takes effect next step).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.default.lr = lr;
        for c in self.configs.values_mut() {
            c.lr = lr;
        }
        for g in self.groups.values_mut() {
            g.config.lr = lr;
            for s in &mut g.segments {
                s.engine.set_lr(lr)?;
            }
        }
        Ok(())
    }

    /// Sets the learning rate of one group (takes effect next step).
    pub fn set_lr_group(&mut self, group: usize, lr: f64) -> Result<()> {
        check_lr(lr)?;
        if !self.groups.contains_key(&group) && !self.configs.contains_key(&group) {
            return Err(Error::Group {
                group,
                reason: format!("no such group (groups: {:?})", self.groups()),
            });
        }
        let mut config = self.config(group).clone();
        config.lr = lr;
        self.configs.insert(group, config);
        if let Some(g) = self.groups.get_mut(&group) {
            g.config.lr = lr;
            for s in &mut g.segments {
                s.engine.set_lr(lr)?;
            }
        }
        Ok(())
    }

    /// Timings of the last step.
    pub fn timings(&self) -> StepTimings {
        self.timings
    }

    /// Reads the variables and brings the groups' segments up to date:
    /// new variables form a new segment; a group whose variables changed
    /// shape or dtype, or disappeared, starts over with fresh state.
    pub(crate) fn sync(&mut self) -> Result<BTreeMap<usize, Vec<Var>>> {
        let current = vars::read_groups(&self.variables)?;
        for (&gid, vars) in &current {
            if let Some(other) = vars.iter().find(|v| v.dtype != vars[0].dtype) {
                return Err(Error::Group {
                    group: gid,
                    reason: format!(
                        "mixes {} variable {:?} and {} variable {:?}; put variables of different dtypes in different groups",
                        vars[0].dtype, vars[0].name, other.dtype, other.name
                    ),
                });
            }
            if let Some(other) = vars.iter().find(|v| v.device != vars[0].device) {
                return Err(Error::Group {
                    group: gid,
                    reason: format!(
                        "mixes variable {:?} on {} and variable {:?} on {}; put variables of different devices in different groups",
                        vars[0].name,
                        vars::device_name(vars[0].device),
                        other.name,
                        vars::device_name(other.device)
                    ),
                });
            }
        }
        for gid in self.groups.keys().copied().collect::<Vec<_>>() {
            if !current.contains_key(&gid) {
                tracing::warn!(
                    group = gid,
                    "group has no trainable variables any more; its state is dropped"
                );
                self.groups.remove(&gid);
            }
        }
        for (&gid, vars) in &current {
            let config = self.config(gid).clone();
            let group = self.groups.entry(gid).or_insert_with(|| Group {
                config,
                segments: Vec::new(),
            });
            let by_name: HashMap<&str, &Var> = vars.iter().map(|v| (v.name.as_str(), v)).collect();
            let mut known: HashSet<&str> = HashSet::new();
            let mut stale = false;
            for seg in &group.segments {
                for ((name, shape), strides) in seg.names.iter().zip(&seg.shapes).zip(&seg.strides)
                {
                    match by_name.get(name.as_str()) {
                        Some(v)
                            if v.shape == *shape
                                && v.dtype == seg.dtype
                                && v.device == seg.device =>
                        {
                            if v.strides != *strides {
                                // The state is kept in logical order and
                                // would survive, but the engine addresses
                                // the old layout: refuse rather than drop it.
                                return Err(Error::variable(
                                    &v.name,
                                    format!(
                                        "changed its memory layout (strides {:?}, were {strides:?}) since the optimizer was built; convert variables (channels-last or not) before building it, or save and load the optimizer around the change",
                                        v.strides
                                    ),
                                ));
                            }
                            known.insert(v.name.as_str());
                        }
                        _ => stale = true,
                    }
                }
            }
            if stale {
                tracing::warn!(
                    group = gid,
                    "variables of the group changed shape, dtype or device, or disappeared; its optimizer state starts over"
                );
                group.segments.clear();
                known.clear();
            }
            let new: Vec<&Var> = vars
                .iter()
                .filter(|v| !known.contains(v.name.as_str()))
                .collect();
            if !new.is_empty() {
                if !group.segments.is_empty() {
                    tracing::info!(
                        group = gid,
                        count = new.len(),
                        "new variables picked up; their optimizer state starts fresh"
                    );
                }
                let names = new.iter().map(|v| v.name.clone()).collect();
                let shapes = new.iter().map(|v| v.shape.clone()).collect();
                let strides = new.iter().map(|v| v.strides.clone()).collect();
                let seg = new_segment(
                    &group.config,
                    names,
                    (shapes, strides),
                    (new[0].dtype, new[0].device),
                    &self.engine_opts,
                    self.collectives.as_ref(),
                    &self.dist_opts,
                )?;
                group.segments.push(seg);
            }
        }
        Ok(current)
    }

    /// One optimizer step over every group, with the gradients libtorch
    /// accumulated since the last [`Shampoo::zero_grad`]. Variables without
    /// a gradient are skipped (their values and state stay as they are).
    ///
    /// Every trainable variable and gradient must be a tensor of `f32` or
    /// `f64`, dense (row-major or channels-last), on the CPU (or a CUDA device, with feature
    /// `cuda`; all variables of a group on one device, each gradient on its
    /// variable's), not sharing memory with another one;
    /// otherwise this is an [`Error::Variable`] naming it, and nothing is
    /// updated. A numerical error of one group (`shampoo_core`'s
    /// `NonFinite`, ...) is returned as soon as it happens; groups stepped
    /// before it keep their update. Data-parallel, a variable with a
    /// gradient on some ranks only is an [`Error::Variable`] naming it and
    /// the step, from that step (CPU variables, host-staged GPU variables)
    /// or from the next one (GPU variables with NCCL, whose counts are read
    /// back without waiting for the GPU; [`Shampoo::flush`] checks the
    /// last step's).
    pub fn step(&mut self) -> Result<()> {
        let reduced = std::mem::take(&mut self.grads_reduced);
        self.step_inner(reduced)
    }

    /// Checks what the last step left outstanding: with NCCL, the gradient
    /// presence counts that are read back a step late (call it after the
    /// last step; [`Shampoo::save`] does).
    pub fn flush(&mut self) -> Result<()> {
        for group in self.groups.values_mut() {
            for seg in &mut group.segments {
                seg.engine.flush().map_err(|e| seg.err(e))?;
            }
        }
        Ok(())
    }

    /// Averages the gradients of every group across ranks, in place.
    fn reduce_gradients(&mut self) -> Result<()> {
        let current = self.sync()?;
        let grads = gradients(&current)?;
        check_all_disjoint(&current, &grads)?;
        let mut timings = StepTimings::default();
        for (gid, group) in &mut self.groups {
            let index = name_index(&current[gid]);
            let gs = &grads[gid];
            for seg in &mut group.segments {
                let g: Vec<Option<&Tensor>> = seg
                    .names
                    .iter()
                    .map(|n| gs[index[n.as_str()]].as_ref())
                    .collect();
                let t = Instant::now();
                seg.engine.reduce(&g, seg.dtype).map_err(|e| seg.err(e))?;
                timings.all_reduce += t.elapsed();
            }
        }
        self.grads_reduced = true;
        self.timings = timings;
        Ok(())
    }

    /// Iterate averaging's evaluation view, as the published optimizer's
    /// `eval()`: the variables of every group configured with
    /// `iterate_averaging` take the averaged sequence (the others are left
    /// alone). Evaluate the model, then call [`Shampoo::train`] before the
    /// next step (a step in eval mode is an error). Collective on several
    /// ranks; does nothing when already in eval mode.
    pub fn eval(&mut self) -> Result<()> {
        self.switch_mode(true)
    }

    /// Back to the train-mode sequence after [`Shampoo::eval`], as the
    /// published `train()`. Collective on several ranks; does nothing when
    /// already in train mode.
    pub fn train(&mut self) -> Result<()> {
        self.switch_mode(false)
    }

    /// Whether every group's variables hold its train-mode sequence (see
    /// [`Shampoo::eval`]).
    pub fn is_train_mode(&self) -> bool {
        self.groups
            .values()
            .flat_map(|g| &g.segments)
            .all(|s| s.engine.is_train_mode())
    }

    fn switch_mode(&mut self, to_eval: bool) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let current = self.sync()?;
        let none: BTreeMap<usize, Vec<Option<Tensor>>> = current
            .iter()
            .map(|(&gid, vars)| (gid, vars.iter().map(|_| None).collect()))
            .collect();
        check_all_disjoint(&current, &none)?;
        for (gid, group) in &mut self.groups {
            let vars = &current[gid];
            let index = name_index(vars);
            for seg in &mut group.segments {
                let idx: Vec<usize> = seg.names.iter().map(|n| index[n.as_str()]).collect();
                let params: Vec<&Tensor> = idx.iter().map(|&i| &vars[i].tensor).collect();
                seg.engine.switch_mode(&params, seg.dtype, to_eval)?;
            }
        }
        Ok(())
    }

    fn step_inner(&mut self, reduced: bool) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let current = self.sync()?;
        let grads = gradients(&current)?;
        check_all_disjoint(&current, &grads)?;

        // The all-reduce time of a clip before this step.
        let mut timings = StepTimings {
            all_reduce: if reduced {
                self.timings.all_reduce
            } else {
                Duration::ZERO
            },
            ..StepTimings::default()
        };
        for (gid, group) in &mut self.groups {
            let vars = &current[gid];
            let index = name_index(vars);
            let gs = &grads[gid];
            for seg in &mut group.segments {
                let idx: Vec<usize> = seg.names.iter().map(|n| index[n.as_str()]).collect();
                // Checked (device, dense layout, dtype) and disjoint tensors,
                // kept alive by `current` and `grads`.
                let params: Vec<&Tensor> = idx.iter().map(|&i| &vars[i].tensor).collect();
                let g: Vec<Option<&Tensor>> = idx.iter().map(|&i| gs[i].as_ref()).collect();
                seg.engine
                    .step(&params, &g, seg.dtype, reduced)
                    .map_err(|e| seg.err(e))?;
                let t = seg.engine.times();
                if !reduced {
                    timings.all_reduce += t.reduce;
                }
                timings.optimizer += t.optimizer;
                timings.all_gather += t.all_gather + t.apply;
                timings.gathered_bytes += seg.engine.gather_bytes();
            }
        }
        self.timings = timings;
        Ok(())
    }
}

/// A fresh engine for one segment of variables of `dtype` on `device`
/// (collective when `collectives` is set): sharded over the ranks unless
/// `engine_opts.replicated`; one process is a world of one, replicated.
pub(crate) fn new_segment(
    config: &ShampooConfig,
    names: Vec<String>,
    (shapes, strides): (Vec<Vec<usize>>, Vec<Vec<usize>>),
    (dtype, device): (DType, Device),
    engine_opts: &EngineOptions,
    collectives: Option<&Collectives>,
    opts: &DistOptions,
) -> Result<Segment> {
    let (collectives, opts) = match collectives {
        None => (
            Collectives::host(Arc::new(SingleProcess)),
            DistOptions::replicated(),
        ),
        Some(c) if engine_opts.replicated => (
            c.clone(),
            DistOptions {
                num_trainers_per_group: Some(1),
                ..opts.clone()
            },
        ),
        Some(c) => (c.clone(), opts.clone()),
    };
    let given: Vec<StridedShape> = shapes
        .iter()
        .zip(&strides)
        .map(|(d, s)| StridedShape {
            dims: d.clone(),
            strides: s.clone(),
        })
        .collect();
    let engine = engine::build(
        config,
        &given,
        (dtype, device),
        engine_opts,
        &collectives,
        &opts,
    )?;
    Ok(Segment {
        names,
        shapes,
        strides,
        dtype,
        device,
        engine,
    })
}

fn check_lr(lr: f64) -> Result<()> {
    if !lr.is_finite() || lr < 0.0 {
        return Err(
            shampoo_core::Error::Config(format!("lr must be finite and >= 0, got {lr}")).into(),
        );
    }
    Ok(())
}

/// The gradient of every variable of every group (`None`: undefined).
fn gradients(current: &BTreeMap<usize, Vec<Var>>) -> Result<BTreeMap<usize, Vec<Option<Tensor>>>> {
    current
        .iter()
        .map(|(&gid, vars)| {
            Ok((
                gid,
                vars.iter()
                    .map(vars::gradient)
                    .collect::<Result<Vec<_>>>()?,
            ))
        })
        .collect()
}

/// Errors when any two variables or gradients share memory.
fn check_all_disjoint(
    current: &BTreeMap<usize, Vec<Var>>,
    grads: &BTreeMap<usize, Vec<Option<Tensor>>>,
) -> Result<()> {
    let mut all: Vec<(&str, &Tensor, DType)> = Vec::new();
    for (gid, vars) in current {
        for (v, g) in vars.iter().zip(&grads[gid]) {
            all.push((&v.name, &v.tensor, v.dtype));
            if let Some(g) = g {
                all.push((&v.name, g, v.dtype));
            }
        }
    }
    vars::check_disjoint(&all)
}

/// Position of each variable by name.
fn name_index(vars: &[Var]) -> HashMap<&str, usize> {
    vars.iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect()
}
