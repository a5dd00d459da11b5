//! [`DistributedShampoo`]: one parameter group's Shampoo, its blocks spread
//! over the ranks of a collective, written once over any [`Backend`].
//!
//! A step:
//!
//! 1. gradients are averaged over ranks by one flat all-reduce on the
//!    backend's memory ([`DistributedShampoo::reduce_gradients`], a
//!    [`GradientAverager`]);
//! 2. each rank computes the search directions `-lr * P` of its own blocks
//!    (steps 1-7 of the algorithm, [`Shampoo::compute_directions`]);
//! 3. one all-gather of every rank's directions, each rank's slot padded to
//!    the longest, in the communication dtype (16-bit formats are packed and
//!    unpacked by the backend, [`WireJob`]);
//! 4. every rank adds all blocks' directions to its parameters (step 8).
//!
//! With `communicate_params`, each rank updates its own blocks, and the
//! all-gather carries the updated parameter blocks (in the parameters'
//! dtype), which every rank copies into place.
//!
//! With `num_trainers_per_group = G`, ranks form `world / G` groups of `G`
//! consecutive ranks; each group spreads all blocks over its own ranks, so a
//! block's state lives on one rank per group. `num_trainers_per_group = 1`
//! is the replicated mode: every rank computes every block and nothing is
//! all-gathered (sharded mode all-gathers even in a world of one, where the
//! collective copies, so that one process runs the whole path).
//!
//! Block results do not depend on which other blocks a rank owns, and host
//! collectives average gradients in rank order, so on CPU ranks with
//! full-precision communication every rank ends with bitwise the parameters
//! of one process that averages the same gradients with
//! [`mean_in_rank_order`](crate::mean_in_rank_order).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shampoo_core::backend::{
    Backend, GatherJob, Map, ScatterJob, TableEntry, ViewMutOps, ViewOps, WireFormat, WireJob,
    wire16_len,
};
use shampoo_core::layout::Layout;
use shampoo_core::strided::{ParamShape, canonical_strides, row_major_strides};
use shampoo_core::{CpuBackend, DType, Shampoo, ShampooConfig};

use crate::assign::{assign_blocks, block_costs};
use crate::collective::{Collective, IntoCollective};
use crate::comm::{CommDType, Communicator};
use crate::gradients::GradientAverager;
use crate::{Error, Result};

/// Options of the distributed step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DistOptions {
    /// Element type of the direction all-gather (default: full precision).
    pub comm_dtype: CommDType,
    /// All-gather updated parameter blocks instead of directions.
    pub communicate_params: bool,
    /// Ranks per group that together cover all blocks (`None`: the whole
    /// world; `Some(1)`: replicated, every rank computes every block). Must
    /// divide the world size.
    pub num_trainers_per_group: Option<usize>,
}

impl DistOptions {
    /// Replicated mode: every rank computes every block
    /// (`num_trainers_per_group = 1`), nothing is all-gathered.
    pub fn replicated() -> Self {
        DistOptions {
            num_trainers_per_group: Some(1),
            ..DistOptions::default()
        }
    }

    /// Whether these options ask for replicated mode
    /// (`num_trainers_per_group = 1`).
    pub fn is_replicated(&self) -> bool {
        self.num_trainers_per_group == Some(1)
    }
}

/// Wall-clock time of each part of the last step (on a device: the time to
/// queue the work, which runs asynchronously).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DistTimes {
    /// Gradient all-reduce (including copying into and out of the bucket).
    pub reduce: Duration,
    /// Computing this rank's own blocks' directions.
    pub optimizer: Duration,
    /// The all-gather (including packing and unpacking).
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
    /// Each parameter's memory layout (`None`: row-major): gradients are
    /// averaged element by element in memory order, so ranks must agree.
    strides: Vec<Option<Vec<usize>>>,
    dtype: String,
    config: serde_json::Value,
    comm_dtype: String,
    communicate_params: bool,
    trainers_per_group: usize,
}

/// The buffers of the all-gather (groups of more than one rank).
struct Exchange<B: Backend> {
    /// This rank's slot, in wire format (full precision: the parameters'
    /// dtype; 16-bit: a wire buffer).
    send: B::Buffer,
    /// Every slot of the group in 16-bit wire format.
    recv16: Option<B::Buffer>,
    /// Every slot of the group, full precision.
    gathered: B::Buffer,
    /// Elements per slot (a multiple of 4, so that 16-bit slots are whole
    /// elements of either dtype).
    slot_len: usize,
    /// Apply tables over `gathered` (every block).
    tables: Vec<B::BlockTable>,
    /// The own blocks at their offsets in this rank's slot, for gathering
    /// updated parameters (`communicate_params`).
    own_gather: B::BlockTable,
}

/// Data-parallel Shampoo for one parameter group (several groups: several
/// of these sharing one collective) over backend `B`.
pub struct DistributedShampoo<B: Backend = CpuBackend> {
    inner: Shampoo<B>,
    comm: Arc<dyn Collective<B>>,
    opts: DistOptions,
    shapes: Vec<Vec<usize>>,
    /// Ranks per group (`G`).
    group_size: usize,
    /// First world rank of this rank's group.
    group_base: usize,
    /// Owner of every block, as a rank inside a group (`0..G`).
    owner: Vec<usize>,
    owned: Vec<usize>,
    exchange: Option<Exchange<B>>,
    averager: GradientAverager<B>,
    times: DistTimes,
}

impl<B: Backend> DistributedShampoo<B> {
    /// Builds this rank's share of the optimizer for parameters of `shapes`
    /// on `backend`, communicating through `comm` (an
    /// `Arc<dyn Collective<B>>`, a [`HostStaged`](crate::HostStaged), or for
    /// the CPU backend a host `Arc<dyn Communicator>`).
    ///
    /// Collective: every rank must call it; ranks exchange a fingerprint of
    /// shapes, dtype, config and options, and any difference is the same
    /// [`Error::Fingerprint`] on every rank.
    ///
    /// Parameters given with strides ([`StridedShape`](shampoo_core::strided::StridedShape): channels-last
    /// weights) are read and written in place through them; only their
    /// logical shapes need to agree across ranks.
    pub fn new<S: ParamShape>(
        config: ShampooConfig,
        given: &[S],
        dtype: DType,
        backend: B,
        comm: impl IntoCollective<B>,
        opts: DistOptions,
    ) -> Result<Self> {
        let shapes: Vec<Vec<usize>> = given.iter().map(|s| s.dims().to_vec()).collect();
        let shapes = &shapes[..];
        let comm = comm.into_collective();
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
            strides: given.iter().map(memory_layout).collect(),
            dtype: dtype.name().into(),
            config: serde_json::to_value(&config)
                .map_err(|e| Error::invalid(format!("config: {e}")))?,
            comm_dtype: opts.comm_dtype.name().into(),
            communicate_params: opts.communicate_params,
            trainers_per_group: g,
        };
        check_fingerprints(comm.host().as_ref(), &fp)?;

        let full = Layout::new(shapes, &config, &|_| true)?;
        let costs = block_costs(&full, &config);
        let owner = assign_blocks(&costs, g);
        let local_rank = rank % g;
        let group_base = rank - local_rank;
        let inner = Shampoo::with_owned_blocks(config, given, dtype, backend, &|id| {
            owner[id] == local_rank
        })?;
        let owned: Vec<usize> = (0..owner.len())
            .filter(|&id| owner[id] == local_rank)
            .collect();
        // Sharded mode all-gathers even in a group of one (where the
        // collective copies), so that a world of one runs the whole path.
        let exchange = if opts.is_replicated() {
            None
        } else {
            Some(Self::exchange(&inner, shapes, &owner, g, &opts)?)
        };
        let lens: Vec<usize> = inner.layout().params.iter().map(|p| p.numel).collect();
        let averager = GradientAverager::new(comm.as_ref(), inner.backend(), dtype, &lens)?;
        tracing::debug!(
            rank,
            world,
            owned = owned.len(),
            blocks = owner.len(),
            slot_len = exchange.as_ref().map_or(0, |e| e.slot_len),
            collective = %comm.kind(),
            backend = %inner.backend().name(),
            "distributed shampoo built"
        );
        Ok(DistributedShampoo {
            comm,
            shapes: shapes.to_vec(),
            group_size: g,
            group_base,
            opts,
            owner,
            owned,
            exchange,
            averager,
            inner,
            times: DistTimes::default(),
        })
    }

    /// The all-gather's buffers and tables for groups of `g` ranks.
    fn exchange(
        inner: &Shampoo<B>,
        shapes: &[Vec<usize>],
        owner: &[usize],
        g: usize,
        opts: &DistOptions,
    ) -> Result<Exchange<B>> {
        let config = inner.config();
        let (be, dtype) = (inner.backend(), inner.dtype());
        let slots = crate::assign::slots(shapes, config, owner, g)?;
        let slot_len = slots.len;
        let gathered_offsets: Vec<Option<usize>> = owner
            .iter()
            .zip(&slots.offsets)
            .map(|(&o, &off)| Some(o * slot_len + off))
            .collect();
        let tables = inner.apply_tables(&gathered_offsets)?;
        let layout = inner.layout();
        let local = layout.direction_offsets();
        let own_gather = be.block_table(
            local
                .iter()
                .enumerate()
                .filter_map(|(id, off)| {
                    off.map(|packed_offset| TableEntry {
                        block: layout.blocks[id].clone(),
                        packed_offset,
                    })
                })
                .collect(),
        )?;
        let sixteen = wire_format(opts).is_some();
        let (send, recv16) = if sixteen {
            let w = wire16_len(dtype, slot_len);
            (be.alloc(dtype, w)?, Some(be.alloc(dtype, g * w)?))
        } else {
            (be.alloc(dtype, slot_len)?, None)
        };
        Ok(Exchange {
            send,
            recv16,
            gathered: be.alloc(dtype, g * slot_len)?,
            slot_len,
            tables,
            own_gather,
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
    /// The collective.
    pub fn collective(&self) -> &Arc<dyn Collective<B>> {
        &self.comm
    }
    /// The host communicator of the collective's world.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        self.comm.host()
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
    pub fn local(&self) -> &Shampoo<B> {
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
    /// Bytes of persistent optimizer state on this rank, as the core
    /// allocated it ([`Shampoo::state_bytes`]: what its checkpoint file
    /// holds).
    pub fn state_bytes(&self) -> usize {
        self.inner.state_bytes()
    }
    /// Bytes one rank receives from other ranks per step, independent of
    /// how the transport moves them: the gradient all-reduce buffer (all
    /// elements, counted once) and the slots of the other ranks of its
    /// group (presence flags, a few bytes, not counted). Zero for a world
    /// of one.
    pub fn comm_bytes_per_step(&self) -> usize {
        let world = self.world_size();
        if world == 1 {
            return 0;
        }
        let elem = self.inner.dtype().size();
        self.inner.layout().numel() * elem + (self.group_size - 1) * self.slot_bytes()
    }
    /// Bytes of the all-gather's result per step (every slot of this rank's
    /// group, own included; zero when nothing is all-gathered).
    pub fn gather_bytes(&self) -> usize {
        self.group_size * self.slot_bytes()
    }

    /// Bytes of one rank's slot on the wire.
    fn slot_bytes(&self) -> usize {
        let Some(x) = &self.exchange else {
            return 0;
        };
        let dtype = self.inner.dtype();
        if wire_format(&self.opts).is_some() {
            wire16_len(dtype, x.slot_len) * dtype.size()
        } else {
            x.slot_len * dtype.size()
        }
    }

    /// Averages gradients in place across ranks (one flat all-reduce).
    ///
    /// A parameter must have a gradient on every rank or on none; anything
    /// else is the same [`Error::Presence`] on every rank, from this call
    /// (host collectives) or the next one (device collectives, which do not
    /// wait for the GPU: see [`DistributedShampoo::flush`]).
    pub fn reduce_gradients(&mut self, grads: &mut [Option<B::ViewMut<'_>>]) -> Result<()> {
        let t = Instant::now();
        let step = self.inner.step_count() + 1;
        self.averager
            .average(self.comm.as_ref(), self.inner.backend(), grads, step)?;
        // A world of one averages nothing.
        self.times.reduce = if self.world_size() > 1 {
            t.elapsed()
        } else {
            Duration::ZERO
        };
        Ok(())
    }

    /// Waits for what a step leaves outstanding and checks it: the
    /// gradient presence counts that device collectives check a step late.
    /// Call it after the last step (saving a checkpoint does).
    pub fn flush(&mut self) -> Result<()> {
        self.averager.check()?;
        self.comm.wait_idle(self.inner.backend())
    }

    /// Computes the own blocks' directions, all-gathers them and applies all
    /// blocks' directions to `params` (gradients already averaged).
    pub fn step_reduced(
        &mut self,
        params: &mut [B::ViewMut<'_>],
        grads: &[Option<B::View<'_>>],
    ) -> Result<()> {
        self.times.all_gather = Duration::ZERO;
        self.times.apply = Duration::ZERO;
        if self.exchange.is_none() {
            // Replicated: every block is this rank's.
            let t = Instant::now();
            self.inner.step(params, grads)?;
            self.times.optimizer = t.elapsed();
            return Ok(());
        }
        if self.opts.communicate_params {
            return self.exchange_params(params, |opt, params| opt.step(params, grads));
        }
        let t = Instant::now();
        let computed = {
            let be = self.inner.backend();
            let views: Vec<B::View<'_>> = params.iter().map(|p| be.as_view(p)).collect();
            let grads: Vec<Option<B::View<'_>>> = grads.iter().map(|g| g.map(B::shorten)).collect();
            self.inner.compute_directions(&views, &grads)
        };
        self.times.optimizer = t.elapsed();
        if let Err(e) = computed {
            // The other ranks wait in this step's all-gather: take part
            // with no update (zeros) before reporting the error.
            self.gather_nothing()?;
            return Err(e.into());
        }
        self.exchange_directions(params)
    }

    /// Iterate averaging's evaluation view (the published `eval()`): every
    /// rank's parameters become the averaged sequence. Collective; does
    /// nothing without iterate averaging or when already in eval mode.
    /// Each block's owner computes its increment (it holds the block's
    /// `Z`), and they are shared like a step's directions.
    pub fn eval(&mut self, params: &mut [B::ViewMut<'_>]) -> Result<()> {
        self.switch_mode(params, true)
    }

    /// Back to the train-mode sequence (the published `train()`).
    /// Collective; does nothing without iterate averaging or when already in
    /// train mode.
    pub fn train(&mut self, params: &mut [B::ViewMut<'_>]) -> Result<()> {
        self.switch_mode(params, false)
    }

    /// Whether the parameters hold the train-mode sequence.
    pub fn is_train_mode(&self) -> bool {
        self.inner.is_train_mode()
    }

    fn switch_mode(&mut self, params: &mut [B::ViewMut<'_>], to_eval: bool) -> Result<()> {
        let local = |opt: &mut Shampoo<B>, params: &mut [B::ViewMut<'_>]| {
            if to_eval {
                opt.eval(params)
            } else {
                opt.train(params)
            }
        };
        if self.exchange.is_none() {
            return Ok(local(&mut self.inner, params)?);
        }
        if self.opts.communicate_params {
            return self.exchange_params(params, local);
        }
        let apply = {
            let be = self.inner.backend();
            let views: Vec<B::View<'_>> = params.iter().map(|p| be.as_view(p)).collect();
            self.inner.compute_mode_switch(&views, to_eval)?
        };
        // Every rank decides the same (mode, step and config agree).
        if apply {
            self.exchange_directions(params)?;
        }
        Ok(())
    }

    /// Shares the own blocks' directions (one all-gather) and applies all
    /// blocks' to `params`.
    fn exchange_directions(&mut self, params: &mut [B::ViewMut<'_>]) -> Result<()> {
        let t = Instant::now();
        let group = self.group();
        let format = wire_format(&self.opts);
        let x = self
            .exchange
            .as_mut()
            .expect("sharded mode has an exchange");
        let be = self.inner.backend();
        let dirs = self.inner.directions();
        match format {
            None if dirs.len() == x.slot_len => {
                self.comm
                    .all_gather_group(be, dirs, be.view_mut(&mut x.gathered), group)?;
            }
            None => {
                {
                    let (head, _) = be.view_mut(&mut x.send).split_at(dirs.len());
                    copy(be, B::shorten(dirs), head)?;
                }
                self.comm.all_gather_group(
                    be,
                    be.view(&x.send),
                    be.view_mut(&mut x.gathered),
                    group,
                )?;
            }
            Some(format) => {
                be.wire(&mut [WireJob::Pack {
                    src: dirs,
                    wire: be.view_mut(&mut x.send),
                    format,
                }])?;
                let recv = x.recv16.as_mut().expect("16-bit buffers");
                self.comm
                    .all_gather_group(be, be.view(&x.send), be.view_mut(recv), group)?;
                be.wire(&mut [WireJob::Unpack {
                    wire: be.view(recv),
                    dst: be.view_mut(&mut x.gathered),
                    format,
                }])?;
            }
        }
        self.times.all_gather = t.elapsed();

        let t = Instant::now();
        let x = self
            .exchange
            .as_ref()
            .expect("sharded mode has an exchange");
        let source = self.inner.backend().view(&x.gathered);
        self.inner.apply_directions(params, source, &x.tables)?;
        self.times.apply = t.elapsed();
        Ok(())
    }

    /// Takes part in a step's all-gather with an all-zero slot (directions
    /// that change nothing), after this rank's own computation failed.
    fn gather_nothing(&mut self) -> Result<()> {
        let group = self.group();
        let x = self
            .exchange
            .as_mut()
            .expect("sharded mode has an exchange");
        let be = self.inner.backend();
        let n = be.view(&x.send).len();
        be.map(&mut [Map::Fill {
            dst: be.view_mut(&mut x.send),
            value: 0.0,
            numel: n,
            count: 1,
            select: None,
        }])?;
        let recv = match x.recv16.as_mut() {
            Some(r) => r,
            None => &mut x.gathered,
        };
        self.comm
            .all_gather_group(be, be.view(&x.send), be.view_mut(recv), group)
    }

    /// `communicate_params`: update own blocks, all-gather them, copy.
    fn exchange_params(
        &mut self,
        params: &mut [B::ViewMut<'_>],
        local: impl FnOnce(&mut Shampoo<B>, &mut [B::ViewMut<'_>]) -> shampoo_core::Result<()>,
    ) -> Result<()> {
        let t = Instant::now();
        // Own blocks updated in place (a step, or a mode switch). On a
        // failure the own blocks are unchanged, and every rank still gets
        // them.
        let stepped = local(&mut self.inner, params);
        self.times.optimizer = t.elapsed();
        let t = Instant::now();
        let group = self.group();
        let x = self
            .exchange
            .as_mut()
            .expect("sharded mode has an exchange");
        let be = self.inner.backend();
        {
            let sources: Vec<Option<B::View<'_>>> =
                params.iter().map(|p| Some(be.as_view(p))).collect();
            be.gather(&mut [GatherJob {
                table: &x.own_gather,
                sources: &sources,
                add: None,
                out: be.view_mut(&mut x.send),
                select: None,
            }])?;
        }
        self.comm
            .all_gather_group(be, be.view(&x.send), be.view_mut(&mut x.gathered), group)?;
        self.times.all_gather = t.elapsed();
        let t = Instant::now();
        let source = be.view(&x.gathered);
        let mut jobs: Vec<ScatterJob<'_, B>> = params
            .iter_mut()
            .zip(&x.tables)
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, table)| ScatterJob {
                table,
                source,
                dst: be.reborrow(p),
                add: false,
            })
            .collect();
        be.scatter(&mut jobs)?;
        self.times.apply = t.elapsed();
        Ok(stepped?)
    }

    /// Averages the gradients, then [`DistributedShampoo::step_reduced`].
    pub fn step(
        &mut self,
        params: &mut [B::ViewMut<'_>],
        grads: &mut [Option<B::ViewMut<'_>>],
    ) -> Result<()> {
        self.reduce_gradients(grads)?;
        let be = self.inner.backend();
        // The views borrow `grads`, not the optimizer.
        let views: Vec<Option<B::View<'_>>> = grads
            .iter()
            .map(|g| g.as_ref().map(|g| be.as_view(g)))
            .collect();
        self.step_reduced(params, &views)
    }

    /// This rank's group of trainers (consecutive world ranks).
    fn group(&self) -> std::ops::Range<usize> {
        self.group_base..self.group_base + self.group_size
    }

    pub(crate) fn inner_mut(&mut self) -> &mut Shampoo<B> {
        &mut self.inner
    }
}

/// The 16-bit format of the direction all-gather, if any (parameters always
/// travel in their own dtype).
fn wire_format(opts: &DistOptions) -> Option<WireFormat> {
    if opts.communicate_params {
        return None;
    }
    match opts.comm_dtype {
        CommDType::Full => None,
        CommDType::Bf16 => Some(WireFormat::Bf16),
        CommDType::F16 => Some(WireFormat::F16),
    }
}

/// `dst = src` on the backend.
fn copy<'a, B: Backend>(be: &B, src: B::View<'a>, dst: B::ViewMut<'a>) -> Result<()> {
    let n = src.len();
    if n == 0 {
        return Ok(());
    }
    be.map(&mut [Map::Copy {
        src,
        dst,
        numel: n,
        count: 1,
        select: None,
    }])?;
    Ok(())
}

/// A parameter's layout as the ranks compare it: `None` for row-major,
/// else its canonical strides.
fn memory_layout<S: ParamShape>(s: &S) -> Option<Vec<usize>> {
    if s.dims().contains(&0) {
        return None;
    }
    let strides = canonical_strides(s.dims(), s.strides()?);
    (strides != row_major_strides(s.dims())).then_some(strides)
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
    if let Some(i) = (0..a.strides.len()).find(|&i| a.strides.get(i) != b.strides.get(i)) {
        let show = |s: Option<&Option<Vec<usize>>>| match s {
            Some(Some(st)) => format!("strides {st:?}"),
            _ => "row-major".to_string(),
        };
        return format!(
            "parameter {i} is laid out {} on rank 0 and {} on rank {r} (gradients are averaged in memory order: give every rank the same layout)",
            show(a.strides.get(i)),
            show(b.strides.get(i))
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

/// Averages the gradients of parameters of `lens` elements each across the
/// ranks of `comm`, in place ([`GradientAverager`], allocated for this call:
/// a loop that averages every step keeps a [`GradientAverager`] instead).
///
/// Collective. A parameter must have a gradient (`Some`) on every rank or
/// on none; anything else is the same [`Error::Presence`] on every rank
/// (waited for, also with a device collective).
pub fn average_gradients<B: Backend>(
    comm: &dyn Collective<B>,
    backend: &B,
    dtype: DType,
    lens: &[usize],
    grads: &mut [Option<B::ViewMut<'_>>],
) -> Result<()> {
    let mut avg = GradientAverager::new(comm, backend, dtype, lens)?;
    avg.average(comm, backend, grads, 1)?;
    avg.check()
}
