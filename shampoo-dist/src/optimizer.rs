//! [`DistributedShampoo`]: one parameter group's Shampoo, its blocks spread
//! over the ranks of a communicator.
//!
//! A step:
//!
//! 1. gradients are averaged over ranks by one flat all-reduce
//!    ([`DistributedShampoo::reduce_gradients`]);
//! 2. each rank computes the search directions `-lr * P` of its own blocks
//!    (steps 1-7 of the algorithm, [`Shampoo::compute_directions`]) into its
//!    slot of a preallocated flat buffer;
//! 3. one all-gather of the slots, in the communication dtype;
//! 4. every rank adds all blocks' directions to its parameters (step 8).
//!
//! With `communicate_params`, step 4 becomes: each rank updates its own
//! blocks, and the all-gather carries the updated parameter blocks (in the
//! parameters' dtype), which every rank copies into place.
//!
//! With `num_trainers_per_group = G`, ranks form `world / G` groups of `G`
//! consecutive ranks; each group spreads all blocks over its own ranks, so a
//! block's state lives on one rank per group.
//!
//! Block results do not depend on which other blocks a rank owns, and
//! gradients are averaged in rank order, so with full-precision
//! communication every rank ends with bitwise the parameters of one process
//! that averages the same gradients with
//! [`mean_in_rank_order`](crate::mean_in_rank_order).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shampoo_core::layout::Layout;
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Shampoo, ShampooConfig};

use crate::assign::{assign_blocks, block_costs};
use crate::codec;
use crate::comm::{CommDType, Communicator};
use crate::{Error, Result};

/// Options of the distributed step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DistOptions {
    /// Element type of the direction all-gather (default: full precision).
    pub comm_dtype: CommDType,
    /// All-gather updated parameter blocks instead of directions.
    pub communicate_params: bool,
    /// Ranks per group that together cover all blocks (`None`: the whole
    /// world). Must divide the world size.
    pub num_trainers_per_group: Option<usize>,
}

/// Wall-clock time of each part of the last step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DistTimes {
    /// Gradient all-reduce (including copying into and out of the bucket).
    pub reduce: Duration,
    /// Computing this rank's own blocks' directions.
    pub optimizer: Duration,
    /// The all-gather (including encoding and decoding).
    pub all_gather: Duration,
    /// Adding the directions (or copying the parameters) into place.
    pub apply: Duration,
}

impl DistTimes {
    /// Sum of all parts.
    pub fn total(&self) -> Duration {
        self.reduce + self.optimizer + self.all_gather + self.apply
    }
}

/// What every rank must agree on; exchanged at construction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Fingerprint {
    world: usize,
    shapes: Vec<Vec<usize>>,
    dtype: String,
    config: serde_json::Value,
    comm_dtype: String,
    communicate_params: bool,
    trainers_per_group: usize,
}

/// Host memory of the parameters' dtype.
#[derive(Debug, Clone)]
pub(crate) enum HostVec {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl HostVec {
    fn zeros(dtype: DType, n: usize) -> HostVec {
        match dtype {
            DType::F32 => HostVec::F32(vec![0.0; n]),
            DType::F64 => HostVec::F64(vec![0.0; n]),
        }
    }
    fn view(&self) -> HostView<'_> {
        match self {
            HostVec::F32(v) => HostView::F32(v),
            HostVec::F64(v) => HostView::F64(v),
        }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            HostVec::F32(v) => bytemuck::cast_slice_mut(v),
            HostVec::F64(v) => bytemuck::cast_slice_mut(v),
        }
    }
}

/// Data-parallel Shampoo for one parameter group (several groups: several
/// of these sharing one communicator), over the CPU backend.
pub struct DistributedShampoo {
    inner: Shampoo<CpuBackend>,
    comm: Arc<dyn Communicator>,
    opts: DistOptions,
    shapes: Vec<Vec<usize>>,
    /// Ranks per group (`G`).
    group_size: usize,
    /// First world rank of this rank's group.
    group_base: usize,
    /// Owner of every block, as a rank inside a group (`0..G`).
    owner: Vec<usize>,
    owned: Vec<usize>,
    /// Offset of every block in the gathered buffer (this group's slots).
    gathered_offsets: Vec<usize>,
    /// Offset of every owned block in this rank's own slot.
    local_offsets: Vec<Option<usize>>,
    /// Apply tables over the gathered buffer (all blocks).
    tables: Vec<shampoo_core::backend::cpu::CpuBlockTable>,
    /// Apply tables over the own-directions buffer (own blocks only).
    own_tables: Vec<shampoo_core::backend::cpu::CpuBlockTable>,
    /// Outgoing slot, in wire format.
    send: Vec<u8>,
    /// Incoming slots of all ranks, in wire format (16-bit communication).
    recv16: Vec<u16>,
    /// Incoming slots of all ranks, decoded (full precision).
    gathered: HostVec,
    /// Gradient bucket: all parameters' elements, then one presence flag
    /// per parameter.
    bucket: HostVec,
    times: DistTimes,
    state_bytes: usize,
}

impl DistributedShampoo {
    /// Builds this rank's share of the optimizer for parameters of `shapes`.
    ///
    /// Collective: every rank must call it; ranks exchange a fingerprint of
    /// shapes, dtype, config and options, and any difference is the same
    /// [`Error::Fingerprint`] on every rank.
    pub fn new(
        config: ShampooConfig,
        shapes: &[Vec<usize>],
        dtype: DType,
        backend: CpuBackend,
        comm: Arc<dyn Communicator>,
        opts: DistOptions,
    ) -> Result<Self> {
        config.validate()?;
        let world = comm.world_size();
        let rank = comm.rank();
        let g = opts.num_trainers_per_group.unwrap_or(world);
        if g == 0 || !world.is_multiple_of(g) {
            return Err(Error::invalid(format!(
                "num_trainers_per_group = {g} does not divide the world size {world}"
            )));
        }
        let fp = Fingerprint {
            world,
            shapes: shapes.to_vec(),
            dtype: dtype.name().into(),
            config: serde_json::to_value(&config)
                .map_err(|e| Error::invalid(format!("config: {e}")))?,
            comm_dtype: opts.comm_dtype.name().into(),
            communicate_params: opts.communicate_params,
            trainers_per_group: g,
        };
        check_fingerprints(comm.as_ref(), &fp)?;

        let full = Layout::new(shapes, &config, &|_| true)?;
        let costs = block_costs(&full, &config);
        let owner = assign_blocks(&costs, g);
        let local_rank = rank % g;
        let group_base = rank - local_rank;
        // Every group rank's own-directions layout: slot sizes and offsets.
        let mut slot_len = 0;
        let mut offsets_in_slot = vec![0usize; owner.len()];
        for r in 0..g {
            let l = Layout::new(shapes, &config, &|id| owner[id] == r)?;
            slot_len = slot_len.max(l.direction_len);
            for (id, off) in l.direction_offsets().into_iter().enumerate() {
                if let Some(off) = off {
                    offsets_in_slot[id] = off;
                }
            }
        }
        let inner = Shampoo::with_owned_blocks(config, shapes, dtype, backend, &|id| {
            owner[id] == local_rank
        })?;
        let local_offsets = inner.layout().direction_offsets();
        let owned: Vec<usize> = (0..owner.len())
            .filter(|&id| owner[id] == local_rank)
            .collect();
        let gathered_offsets: Vec<usize> = owner
            .iter()
            .zip(&offsets_in_slot)
            .map(|(&o, &off)| o * slot_len + off)
            .collect();
        let tables = inner.apply_tables(
            &gathered_offsets
                .iter()
                .map(|&o| Some(o))
                .collect::<Vec<_>>(),
        )?;
        let own_tables = inner.apply_tables(&local_offsets)?;
        let wire = if opts.communicate_params {
            dtype.size()
        } else {
            opts.comm_dtype.wire_size(dtype)
        };
        let sixteen = wire == 2;
        let numel = full.numel();
        let state_bytes = state_bytes(&inner);
        tracing::debug!(
            rank,
            world,
            owned = owned.len(),
            blocks = owner.len(),
            slot_len,
            "distributed shampoo built"
        );
        Ok(DistributedShampoo {
            comm,
            shapes: shapes.to_vec(),
            group_size: g,
            group_base,
            send: vec![0u8; slot_len * wire],
            recv16: if sixteen {
                vec![0u16; g * slot_len]
            } else {
                Vec::new()
            },
            gathered: HostVec::zeros(dtype, g * slot_len),
            bucket: HostVec::zeros(dtype, numel + shapes.len()),
            opts,
            owner,
            owned,
            gathered_offsets,
            local_offsets,
            tables,
            own_tables,
            inner,
            times: DistTimes::default(),
            state_bytes,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    /// The communicator.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }
    /// Global ids of the blocks this rank computes, ascending.
    pub fn owned_blocks(&self) -> &[usize] {
        &self.owned
    }
    /// Owner of every block, as a rank inside this rank's group.
    pub fn assignment(&self) -> &[usize] {
        &self.owner
    }
    /// Ranks per group (`num_trainers_per_group`, or the world size).
    pub fn trainers_per_group(&self) -> usize {
        self.group_size
    }
    /// The single-process optimizer that holds this rank's blocks.
    pub fn local(&self) -> &Shampoo<CpuBackend> {
        &self.inner
    }
    /// Root-inverse telemetry of the blocks whose state this rank writes
    /// to checkpoints: its own blocks on the first group's ranks, none on
    /// the other groups' ranks (their blocks are copies), so that a sum
    /// over the ranks counts every block once.
    pub fn root_inverse_stats(&self) -> Vec<shampoo_core::BlockRootInverseStats> {
        if self.comm.rank() < self.group_size {
            self.inner.root_inverse_stats()
        } else {
            Vec::new()
        }
    }
    /// The options.
    pub fn options(&self) -> &DistOptions {
        &self.opts
    }
    /// Parameter shapes.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }
    /// Times of the last step.
    pub fn times(&self) -> DistTimes {
        self.times
    }
    /// Sets the learning rate (takes effect next step).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        Ok(self.inner.set_lr(lr)?)
    }
    /// Bytes of persistent optimizer state on this rank (what its checkpoint
    /// file holds: factors, roots, failure counters, grafting, filtered
    /// gradient, momentum, corrected second moments).
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }
    /// Bytes one rank receives from other ranks per step, independent of
    /// how the transport moves them: the gradient all-reduce buffer (all
    /// elements plus one flag per parameter, counted once) and the slots of
    /// the other ranks of its group. Zero for a world of one.
    pub fn comm_bytes_per_step(&self) -> usize {
        let world = self.world_size();
        if world == 1 {
            return 0;
        }
        let elem = self.inner.dtype().size();
        (self.inner.layout().numel() + self.shapes.len()) * elem
            + (self.group_size - 1) * self.send.len()
    }
    /// Bytes of the all-gather's result (every slot of this rank's group,
    /// own included).
    pub fn gather_bytes(&self) -> usize {
        self.group_size * self.send.len()
    }

    /// Averages gradients in place across ranks (one flat all-reduce).
    ///
    /// A parameter must have a gradient on every rank or on none; anything
    /// else is the same error on every rank.
    pub fn reduce_gradients(&mut self, grads: &mut [Option<HostViewMut<'_>>]) -> Result<()> {
        let t = Instant::now();
        let lens: Vec<usize> = self.inner.layout().params.iter().map(|p| p.numel).collect();
        let dtype = self.inner.dtype();
        reduce_with(self.comm.as_ref(), &mut self.bucket, dtype, &lens, grads)?;
        self.times.reduce = t.elapsed();
        Ok(())
    }

    /// Computes the own blocks' directions, all-gathers them and applies all
    /// blocks' directions to `params` (gradients already averaged).
    pub fn step_reduced(
        &mut self,
        params: &mut [HostViewMut<'_>],
        grads: &[Option<HostView<'_>>],
    ) -> Result<()> {
        let t = Instant::now();
        {
            let views: Vec<HostView<'_>> = params.iter().map(|p| p.as_view()).collect();
            self.inner.compute_directions(&views, grads)?;
        }
        self.times.optimizer = t.elapsed();
        self.exchange(params)
    }

    /// Iterate averaging's evaluation view (the published `eval()`): every
    /// rank's parameters become the averaged sequence. Collective; does
    /// nothing without iterate averaging or when already in eval mode.
    /// Each block's owner computes its increment (it holds the block's
    /// `Z`), and they are shared like a step's directions.
    pub fn eval(&mut self, params: &mut [HostViewMut<'_>]) -> Result<()> {
        self.switch_mode(params, true)
    }

    /// Back to the train-mode sequence (the published `train()`).
    /// Collective; does nothing without iterate averaging or when already in
    /// train mode.
    pub fn train(&mut self, params: &mut [HostViewMut<'_>]) -> Result<()> {
        self.switch_mode(params, false)
    }

    /// Whether the parameters hold the train-mode sequence.
    pub fn is_train_mode(&self) -> bool {
        self.inner.is_train_mode()
    }

    fn switch_mode(&mut self, params: &mut [HostViewMut<'_>], to_eval: bool) -> Result<()> {
        let apply = {
            let views: Vec<HostView<'_>> = params.iter().map(|p| p.as_view()).collect();
            self.inner.compute_mode_switch(&views, to_eval)?
        };
        // Every rank decides the same (mode, step and config agree).
        if apply {
            self.exchange(params)?;
        }
        Ok(())
    }

    /// Shares the own blocks' directions (one all-gather) and applies all
    /// blocks' to `params`.
    fn exchange(&mut self, params: &mut [HostViewMut<'_>]) -> Result<()> {
        if self.opts.communicate_params {
            return self.exchange_params(params);
        }

        let t = Instant::now();
        let dirs = self.inner.directions();
        match self.opts.comm_dtype {
            CommDType::F32 => {
                codec::pack_full(dirs, &mut self.send);
                let group = self.group();
                self.comm
                    .all_gather_group_bytes(&self.send, self.gathered.bytes_mut(), group)?;
            }
            c => {
                codec::pack_16(dirs, c, &mut self.send);
                let group = self.group();
                let recv: &mut [u8] = bytemuck::cast_slice_mut(&mut self.recv16);
                self.comm.all_gather_group_bytes(&self.send, recv, group)?;
                codec::unpack_16(&self.recv16, c, &mut self.gathered, 0);
            }
        }
        self.times.all_gather = t.elapsed();

        let t = Instant::now();
        self.inner
            .apply_directions(params, self.gathered.view(), &self.tables)?;
        self.times.apply = t.elapsed();
        Ok(())
    }

    /// `communicate_params`: update own blocks, all-gather them, copy.
    fn exchange_params(&mut self, params: &mut [HostViewMut<'_>]) -> Result<()> {
        let t = Instant::now();
        // Own directions into the (not yet used) gathered buffer, so that
        // the optimizer is free to be borrowed mutably for the update.
        codec::copy_into(self.inner.directions(), &mut self.gathered);
        self.inner
            .apply_directions(params, self.gathered.view(), &self.own_tables)?;
        codec::pack_blocks(
            params,
            self.inner.layout(),
            &self.owned,
            &self.local_offsets,
            &mut self.send,
        );
        self.times.apply = t.elapsed();
        let t = Instant::now();
        let group = self.group();
        self.comm
            .all_gather_group_bytes(&self.send, self.gathered.bytes_mut(), group)?;
        self.times.all_gather = t.elapsed();
        let t = Instant::now();
        codec::unpack_blocks(
            self.gathered.view(),
            self.inner.layout(),
            &self.gathered_offsets,
            params,
        );
        self.times.apply += t.elapsed();
        Ok(())
    }

    /// Averages the gradients, then [`DistributedShampoo::step_reduced`].
    pub fn step(
        &mut self,
        params: &mut [HostViewMut<'_>],
        grads: &mut [Option<HostViewMut<'_>>],
    ) -> Result<()> {
        self.reduce_gradients(grads)?;
        let views: Vec<Option<HostView<'_>>> = grads
            .iter()
            .map(|g| g.as_ref().map(|g| g.as_view()))
            .collect();
        self.step_reduced(params, &views)
    }

    /// This rank's group of trainers (consecutive world ranks).
    fn group(&self) -> std::ops::Range<usize> {
        self.group_base..self.group_base + self.group_size
    }

    pub(crate) fn inner_mut(&mut self) -> &mut Shampoo<CpuBackend> {
        &mut self.inner
    }
}

/// Exchanges fingerprints; any difference is the same error on every rank.
fn check_fingerprints(comm: &dyn Communicator, fp: &Fingerprint) -> Result<()> {
    let all = crate::agreement::all_gather_json(comm, fp)?;
    match crate::agreement::disagreement(&all, diff) {
        None => Ok(()),
        Some(problems) => Err(Error::Fingerprint(problems)),
    }
}

/// The first difference between rank 0's fingerprint and rank `r`'s.
fn diff(a: &Fingerprint, b: &Fingerprint, r: usize) -> String {
    if a.world != b.world {
        return format!("world size {} on rank 0, {} on rank {r}", a.world, b.world);
    }
    if a.shapes != b.shapes {
        if a.shapes.len() != b.shapes.len() {
            return format!(
                "{} parameters on rank 0, {} on rank {r}",
                a.shapes.len(),
                b.shapes.len()
            );
        }
        let i = a
            .shapes
            .iter()
            .zip(&b.shapes)
            .position(|(x, y)| x != y)
            .expect("shapes differ");
        return format!(
            "parameter {i} has shape {:?} on rank 0 and {:?} on rank {r}",
            a.shapes[i], b.shapes[i]
        );
    }
    if a.dtype != b.dtype {
        return format!("dtype {} on rank 0, {} on rank {r}", a.dtype, b.dtype);
    }
    if a.config != b.config {
        let keys: Vec<String> = match (a.config.as_object(), b.config.as_object()) {
            (Some(x), Some(y)) => {
                let mut k: Vec<String> = x
                    .keys()
                    .chain(y.keys())
                    .filter(|k| x.get(*k) != y.get(*k))
                    .cloned()
                    .collect();
                k.sort();
                k.dedup();
                k
            }
            _ => vec!["config".into()],
        };
        return format!("config differs in {}", keys.join(", "));
    }
    format!(
        "options differ (comm dtype {}/{}, communicate_params {}/{}, trainers per group {}/{})",
        a.comm_dtype,
        b.comm_dtype,
        a.communicate_params,
        b.communicate_params,
        a.trainers_per_group,
        b.trainers_per_group
    )
}

trait BucketElem: Copy + Default + PartialEq + Into<f64> + From<u8> + Send + Sync + 'static {
    fn slice<'a>(v: HostView<'a>) -> &'a [Self];
    fn slice_mut<'a>(v: HostViewMut<'a>) -> &'a mut [Self];
}
impl BucketElem for f32 {
    fn slice<'a>(v: HostView<'a>) -> &'a [Self] {
        v.typed::<f32>().expect("dtype checked")
    }
    fn slice_mut<'a>(v: HostViewMut<'a>) -> &'a mut [Self] {
        v.typed::<f32>().expect("dtype checked")
    }
}
impl BucketElem for f64 {
    fn slice<'a>(v: HostView<'a>) -> &'a [Self] {
        v.typed::<f64>().expect("dtype checked")
    }
    fn slice_mut<'a>(v: HostViewMut<'a>) -> &'a mut [Self] {
        v.typed::<f64>().expect("dtype checked")
    }
}

/// Averages the gradients of parameters of `lens` elements each across the
/// ranks of `comm`, in place, in rank order: one all-reduce of one buffer
/// holding every gradient of `dtype` and one presence flag per parameter
/// (as [`DistributedShampoo::reduce_gradients`] does).
///
/// Collective. A parameter must have a gradient (`Some`) on every rank or
/// on none; anything else is the same error on every rank.
pub fn average_gradients(
    comm: &dyn Communicator,
    dtype: DType,
    lens: &[usize],
    grads: &mut [Option<HostViewMut<'_>>],
) -> Result<()> {
    let numel: usize = lens.iter().sum();
    let mut bucket = HostVec::zeros(dtype, numel + lens.len());
    reduce_with(comm, &mut bucket, dtype, lens, grads)
}

/// [`average_gradients`] with a preallocated bucket of `dtype` and
/// `sum(lens) + lens.len()` elements.
fn reduce_with(
    comm: &dyn Communicator,
    bucket: &mut HostVec,
    dtype: DType,
    lens: &[usize],
    grads: &mut [Option<HostViewMut<'_>>],
) -> Result<()> {
    if grads.len() != lens.len() {
        return Err(Error::invalid(format!(
            "{} gradients for {} parameters",
            grads.len(),
            lens.len()
        )));
    }
    for (i, (g, &n)) in grads.iter().zip(lens).enumerate() {
        if let Some(g) = g
            && (g.dtype() != dtype || g.len() != n)
        {
            return Err(Error::invalid(format!(
                "gradient {i} is {} x {}, parameter {i} is {dtype} x {n}",
                g.dtype(),
                g.len(),
            )));
        }
    }
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    let numel: usize = lens.iter().sum();
    match bucket {
        HostVec::F32(b) => {
            fill_bucket(b, grads, lens, numel);
            comm.all_reduce_mean(b)?;
            drain_bucket(b, grads, lens, numel, world)
        }
        HostVec::F64(b) => {
            fill_bucket(b, grads, lens, numel);
            comm.all_reduce_mean_f64(b)?;
            drain_bucket(b, grads, lens, numel, world)
        }
    }
}

fn fill_bucket<T: BucketElem>(
    b: &mut [T],
    grads: &[Option<HostViewMut<'_>>],
    lens: &[usize],
    numel: usize,
) {
    let mut off = 0;
    for (i, (g, &n)) in grads.iter().zip(lens).enumerate() {
        let dst = &mut b[off..off + n];
        match g {
            Some(g) => {
                dst.copy_from_slice(T::slice(g.as_view()));
                b[numel + i] = T::from(1);
            }
            None => {
                dst.fill(T::default());
                b[numel + i] = T::default();
            }
        }
        off += n;
    }
}

fn drain_bucket<T: BucketElem>(
    b: &[T],
    grads: &mut [Option<HostViewMut<'_>>],
    lens: &[usize],
    numel: usize,
    world: usize,
) -> Result<()> {
    // Check presence first: the flags are identical on every rank, so every
    // rank returns the same error.
    for i in 0..lens.len() {
        let share: f64 = b[numel + i].into();
        if share != 0.0 && share != 1.0 {
            let k = (share * world as f64).round() as usize;
            return Err(Error::invalid(format!(
                "parameter {i} has a gradient on {k} of {world} ranks; pass a gradient for it on every rank or on none"
            )));
        }
    }
    let mut off = 0;
    for (g, &n) in grads.iter_mut().zip(lens) {
        if let Some(g) = g {
            T::slice_mut(g.reborrow()).copy_from_slice(&b[off..off + n]);
        }
        off += n;
    }
    Ok(())
}

/// Persistent state bytes of an optimizer's owned blocks: what its
/// checkpoint holds (factors, roots, eigenpairs, failure counters, grafting,
/// filtered gradient, momentum, corrected second moments, iterate
/// averaging's `Z`), without workspace.
pub fn state_bytes(opt: &Shampoo<CpuBackend>) -> usize {
    let config = opt.config();
    let dtype = opt.dtype();
    let fdtype = config.factor_dtype_for(dtype);
    let per_elem_buffers = usize::from(config.grafting.is_some_and(|g| g.has_accumulator()))
        + usize::from(config.betas[0] != 0.0)
        + usize::from(config.momentum.is_some())
        + usize::from(config.is_eigenvalue_corrected())
        + usize::from(config.iterate_averaging.is_some());
    let eigenpairs = matches!(
        config.amortized(),
        shampoo_core::config::Amortized::Eigenpairs(_)
    );
    opt.layout()
        .groups
        .iter()
        .map(|g| {
            let factors: usize = g
                .factors
                .iter()
                .map(|f| {
                    let eigen = if eigenpairs {
                        (f.size * f.size + f.size) * fdtype.size()
                    } else {
                        0
                    };
                    f.size * f.size * (fdtype.size() + dtype.size()) + eigen
                })
                .sum();
            let failures = if g.factors.is_empty() {
                0
            } else {
                4 * g.factors.len()
            };
            g.count() * (factors + failures + per_elem_buffers * g.numel * dtype.size())
        })
        .sum()
}
