//! Batches assembled ahead of the step that uses them, on worker threads,
//! into preallocated buffers.
//!
//! A [`Loader`] owns `prefetch + 1` slots, each a uint8 `[max_batch, h, w, c]`
//! buffer (in pinned host memory when the model is on a GPU), and a pool of
//! worker threads. Batch `b` of its [`BatchPlan`] goes to slot `b % slots`.
//! Workers claim one sample at a time, in plan order, and write it straight
//! into its slice of the slot with [`Dataset::write_sample`]; they run ahead
//! of the consumer by at most as many batches as there are slots, and wait
//! otherwise. The consumer ([`Loader::next_batch`]) waits for its batch to be
//! complete, moves the kept samples together (corrupt ones are left out, as
//! in [`assemble`](super::assemble)), and turns the slot into the model's
//! input on the device ([`Normaliser`]): on the CPU with tensor operations
//! over the slot's memory, on a GPU after one asynchronous copy of the uint8
//! bytes. A slot goes back to the workers once nothing reads it any more:
//! right after the conversion on the CPU; on a GPU when the next batch is
//! asked for, after a device synchronisation (the training loop has already
//! synchronised by then, to read the loss).
//!
//! What a batch holds depends only on the plan and the dataset (every sample
//! is a function of seed, epoch and index, written at a fixed place), never
//! on the number of workers or on timing: the loader yields bit for bit the
//! batches of the synchronous [`assemble`](super::assemble). Dropping a
//! loader stops its workers and joins them (each finishes the sample it is
//! writing), so a run that ends mid-epoch, or fails, leaves no thread
//! behind.

use super::{Batch, Dataset, HostBatch, Normaliser, Scratch, compact, kept_labels};
use crate::error::{Error, Result};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Which samples make up each batch of a loader's run, in order.
pub trait BatchPlan: Send {
    /// Number of batches.
    fn len(&self) -> usize;
    /// Whether there are no batches.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The largest batch (the capacity of a slot).
    fn max_batch(&self) -> usize;
    /// Batch `b`: the epoch that keys its augmentation, and its sample
    /// indices. Called once per batch, in increasing `b`.
    fn batch(&mut self, b: usize) -> (u64, Vec<usize>);
}

/// One rank's training batches from global step `start` to `stop`: batch
/// `b` is step `start + b`, whose samples are the rank's slice of its global
/// batch in its epoch's order ([`super::epoch_order`],
/// [`super::rank_indices`]).
#[derive(Debug)]
pub struct TrainPlan {
    n: usize,
    seed: u64,
    global_batch: usize,
    rank: usize,
    world: usize,
    steps_per_epoch: u64,
    start: u64,
    stop: u64,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl TrainPlan {
    /// Steps `start..stop` of a run over `n` samples with `global_batch`
    /// images a step split over `world` ranks, seen from `rank`.
    pub fn new(
        n: usize,
        seed: u64,
        global_batch: usize,
        (rank, world): (usize, usize),
        (start, stop): (u64, u64),
    ) -> Self {
        TrainPlan {
            n,
            seed,
            global_batch,
            rank,
            world,
            steps_per_epoch: super::steps_per_epoch(n, global_batch) as u64,
            start,
            stop: stop.max(start),
            order: Vec::new(),
            order_epoch: None,
        }
    }
}

impl BatchPlan for TrainPlan {
    fn len(&self) -> usize {
        (self.stop - self.start) as usize
    }

    fn max_batch(&self) -> usize {
        self.global_batch / self.world
    }

    fn batch(&mut self, b: usize) -> (u64, Vec<usize>) {
        let step = self.start + b as u64;
        let epoch = step / self.steps_per_epoch;
        let pos = (step % self.steps_per_epoch) as usize;
        if self.order_epoch != Some(epoch) {
            self.order = super::epoch_order(self.n, self.seed, epoch);
            self.order_epoch = Some(epoch);
        }
        let idx = super::rank_indices(&self.order, pos, self.global_batch, self.rank, self.world);
        (epoch, idx.to_vec())
    }
}

/// A fixed list of samples in batches of `chunk` (the last may be shorter),
/// all with the same epoch key: evaluation.
#[derive(Debug, Clone)]
pub struct ChunkPlan {
    indices: Vec<usize>,
    chunk: usize,
    epoch: u64,
}

impl ChunkPlan {
    /// `indices` in batches of `chunk` (at least 1).
    pub fn new(indices: Vec<usize>, chunk: usize, epoch: u64) -> Self {
        ChunkPlan {
            indices,
            chunk: chunk.max(1),
            epoch,
        }
    }
}

impl BatchPlan for ChunkPlan {
    fn len(&self) -> usize {
        self.indices.len().div_ceil(self.chunk)
    }

    fn max_batch(&self) -> usize {
        self.chunk.min(self.indices.len())
    }

    fn batch(&mut self, b: usize) -> (u64, Vec<usize>) {
        let s = b * self.chunk;
        let e = (s + self.chunk).min(self.indices.len());
        (self.epoch, self.indices[s..e].to_vec())
    }
}

/// How a loader runs.
#[derive(Debug, Clone, Copy)]
pub struct LoaderOptions {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Batches prepared ahead of the one in use (at least 1); the loader
    /// holds one slot more than this.
    pub prefetch: usize,
    /// Where [`Loader::next_batch`] puts the batches (and whether the slots are
    /// pinned).
    pub device: Device,
    /// Images with channels-last strides.
    pub channels_last: bool,
    /// Seed of the augmentation.
    pub seed: u64,
}

/// The number of data workers for a rank when `--data-workers` is not
/// given: the cores of this machine divided by the ranks on it
/// (`LOCAL_WORLD_SIZE`, which `shampoo-run` and torchrun set), at least 1.
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(1);
    (cores / local).max(1)
}

/// A slot's memory as the workers see it.
struct SlotMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is only dereferenced for disjoint sample slices that
// the state mutex hands to exactly one thread at a time (a worker while the
// sample is claimed, the consumer once the batch is complete and until it
// releases the slot), and the memory (a tensor the `Loader` owns) outlives
// every worker: `Loader::drop` joins them before the tensors are freed.
unsafe impl Send for SlotMem {}
// SAFETY: as above; `&SlotMem` only gives out the pointer.
unsafe impl Sync for SlotMem {}

#[derive(Default)]
struct SlotState {
    /// The batch the slot holds or is being filled with.
    batch: Option<usize>,
    epoch: u64,
    indices: Vec<usize>,
    kept: Vec<bool>,
    /// Samples of the batch not yet written.
    pending: usize,
    /// The error of the lowest sample that failed, with its position.
    error: Option<(usize, Error)>,
}

struct State {
    plan: Box<dyn BatchPlan>,
    total: usize,
    /// The batch whose samples are being claimed, and its next sample.
    claim: usize,
    claim_next: usize,
    /// Batches before this one are consumed and their slots free.
    released: usize,
    slots: Vec<SlotState>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Workers wait here for a free slot.
    work: Condvar,
    /// The consumer waits here for a complete batch.
    ready: Condvar,
    dataset: Arc<dyn Dataset>,
    seed: u64,
    sample_bytes: usize,
    mem: Vec<SlotMem>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A complete batch handed to the consumer.
struct Ready {
    batch: usize,
    slot: usize,
    labels: Vec<i64>,
    skipped: usize,
}

/// A prefetching batch loader over a dataset and a plan (see the module
/// documentation).
pub struct Loader {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// `[max_batch, h, w, c]` uint8, pinned when `device` is a GPU.
    slots: Vec<Tensor>,
    normaliser: Normaliser,
    opts: LoaderOptions,
    next: usize,
    total: usize,
    /// A batch whose slot an asynchronous copy may still be reading.
    in_flight: Option<usize>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("workers", &self.workers.len())
            .field("slots", &self.slots.len())
            .field("next", &self.next)
            .field("total", &self.total)
            .finish()
    }
}

impl Loader {
    /// Starts the workers on `plan`'s batches of `dataset`.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        plan: Box<dyn BatchPlan>,
        opts: LoaderOptions,
    ) -> Result<Self> {
        if opts.workers == 0 {
            return Err(Error::Invalid("--data-workers must be at least 1".into()));
        }
        if opts.prefetch == 0 {
            return Err(Error::Invalid("--prefetch must be at least 1".into()));
        }
        let [h, w, c] = dataset.sample_shape();
        let sample_bytes = h * w * c;
        let cap = plan.max_batch().max(1);
        let total = plan.len();
        // No more slots than batches: a short evaluation needs few.
        let nslots = (opts.prefetch + 1).min(total.max(1));
        let mut slots = Vec::with_capacity(nslots);
        for _ in 0..nslots {
            let t = Tensor::f_empty(
                [cap as i64, h as i64, w as i64, c as i64],
                (Kind::Uint8, Device::Cpu),
            )?;
            slots.push(match opts.device {
                Device::Cpu => t,
                d => t.f_pin_memory(d)?,
            });
        }
        let mem = slots
            .iter()
            .map(|t| SlotMem {
                ptr: t.data_ptr() as *mut u8,
                len: cap * sample_bytes,
            })
            .collect();
        let normaliser = Normaliser::new(&*dataset, opts.device)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                plan,
                total,
                claim: 0,
                claim_next: 0,
                released: 0,
                slots: (0..nslots).map(|_| SlotState::default()).collect(),
                stop: false,
            }),
            work: Condvar::new(),
            ready: Condvar::new(),
            dataset,
            seed: opts.seed,
            sample_bytes,
            mem,
        });
        let mut loader = Loader {
            shared,
            workers: Vec::with_capacity(opts.workers),
            slots,
            normaliser,
            opts,
            next: 0,
            total,
            in_flight: None,
        };
        for i in 0..opts.workers.min(total.saturating_mul(cap).max(1)) {
            let shared = loader.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("data-worker-{i}"))
                .spawn(move || work(&shared))
                .map_err(|source| Error::Io {
                    context: "starting a data worker thread".into(),
                    source,
                })?;
            loader.workers.push(handle);
        }
        Ok(loader)
    }

    /// Batches in the plan.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether the plan has no batches.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Worker threads running.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The next batch as the model takes it (normalised float32 on the
    /// device), or `None` after the last one. A corrupt image under
    /// `--on-corrupt fail` is the error of the batch that holds it.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let Some(r) = self.wait_next()? else {
            return Ok(None);
        };
        let converted = self.convert(&r);
        match (&converted, self.opts.device) {
            (Ok(_), Device::Cuda(_)) => self.in_flight = Some(r.batch),
            _ => self.release(r.batch),
        }
        converted.map(Some)
    }

    /// The next batch's uint8 NHWC pixels and labels, as the workers wrote
    /// them (a copy), or `None` after the last one.
    pub fn next_host(&mut self) -> Result<Option<HostBatch>> {
        let shape = self.shared.dataset.sample_shape();
        self.next_with(|pixels, labels, skipped| HostBatch {
            pixels: pixels.to_vec(),
            labels: labels.to_vec(),
            skipped,
            shape,
        })
    }

    /// Calls `f` on the next batch's uint8 NHWC pixels, labels and skipped
    /// count in place (no copy), then gives the slot back; `None` after the
    /// last batch.
    pub fn next_with<R>(&mut self, f: impl FnOnce(&[u8], &[i64], usize) -> R) -> Result<Option<R>> {
        let Some(r) = self.wait_next()? else {
            return Ok(None);
        };
        let mem = &self.shared.mem[r.slot];
        // SAFETY: batch `r.batch` is complete and its slot not yet released,
        // so no worker writes it; `labels.len()` samples fit in the slot.
        let pixels = unsafe {
            std::slice::from_raw_parts(mem.ptr, r.labels.len() * self.shared.sample_bytes)
        };
        let out = f(pixels, &r.labels, r.skipped);
        self.release(r.batch);
        Ok(Some(out))
    }

    fn convert(&self, r: &Ready) -> Result<Batch> {
        let n = r.labels.len() as i64;
        let pixels = self.slots[r.slot].f_narrow(0, 0, n)?;
        let pixels = match self.opts.device {
            Device::Cpu => pixels,
            // Pinned memory: the copy is queued and this returns at once.
            d => pixels.f_to_device_(d, Kind::Uint8, true, false)?,
        };
        Ok(Batch {
            images: self.normaliser.to_input(&pixels, self.opts.channels_last)?,
            labels: Tensor::from_slice(&r.labels).f_to_device(self.opts.device)?,
            skipped: r.skipped,
        })
    }

    /// Waits for the next batch to be complete and compacts it in its slot.
    fn wait_next(&mut self) -> Result<Option<Ready>> {
        if let Some(b) = self.in_flight.take() {
            if let Device::Cuda(i) = self.opts.device {
                tch::Cuda::synchronize(i as i64);
            }
            self.release(b);
        }
        if self.next >= self.total {
            return Ok(None);
        }
        let b = self.next;
        let s = b % self.slots.len();
        let mut st = self.shared.lock();
        while !(st.slots[s].batch == Some(b) && st.slots[s].pending == 0) {
            // Workers only leave when told to stop or when the plan is
            // done; check anyway rather than wait forever.
            if self.workers.iter().all(|h| h.is_finished()) {
                return Err(Error::Invalid(format!(
                    "the data workers stopped before batch {b} was complete"
                )));
            }
            st = self
                .shared
                .ready
                .wait_timeout(st, Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.next += 1;
        let slot = &mut st.slots[s];
        if let Some((_, e)) = slot.error.take() {
            drop(st);
            self.release(b);
            return Err(e);
        }
        let kept = std::mem::take(&mut slot.kept);
        let labels = kept_labels(&*self.shared.dataset, &slot.indices, &kept);
        drop(st);
        let bytes = self.shared.sample_bytes;
        let mem = &self.shared.mem[s];
        // SAFETY: the batch is complete and its slot not released: no worker
        // touches it; `kept.len() <= max_batch` samples fit in `mem.len`.
        let buf = unsafe { std::slice::from_raw_parts_mut(mem.ptr, kept.len() * bytes) };
        debug_assert!(buf.len() <= mem.len);
        let n = compact(buf, bytes, &kept);
        Ok(Some(Ready {
            batch: b,
            slot: s,
            skipped: kept.len() - n,
            labels,
        }))
    }

    fn release(&self, b: usize) {
        let mut st = self.shared.lock();
        st.released = st.released.max(b + 1);
        drop(st);
        self.shared.work.notify_all();
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        for h in self.workers.drain(..) {
            // A worker's panics are caught in `work`; a join error would be
            // one in the loop itself, and there is nothing left to do then.
            let _ = h.join();
        }
        // A copy still in flight reads pinned memory that libtorch's host
        // allocator keeps until the copy's event has completed, so the
        // slots can be freed now.
    }
}

/// A worker: claims samples in plan order and writes them into their slots.
fn work(shared: &Shared) {
    let mut scratch = Scratch::default();
    let nslots = shared.mem.len();
    let bytes = shared.sample_bytes;
    let mut st = shared.lock();
    loop {
        if st.stop || st.claim >= st.total {
            return;
        }
        if st.claim >= st.released + nslots {
            st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let b = st.claim;
        let s = b % nslots;
        if st.slots[s].batch != Some(b) {
            let (epoch, indices) = st.plan.batch(b);
            let slot = &mut st.slots[s];
            slot.batch = Some(b);
            slot.epoch = epoch;
            slot.pending = indices.len();
            slot.kept.clear();
            slot.kept.resize(indices.len(), false);
            slot.indices = indices;
            slot.error = None;
            st.claim_next = 0;
            if st.slots[s].pending == 0 {
                shared.ready.notify_all();
            }
        }
        if st.claim_next >= st.slots[s].indices.len() {
            st.claim += 1;
            continue;
        }
        let i = st.claim_next;
        st.claim_next += 1;
        let (index, epoch) = (st.slots[s].indices[i], st.slots[s].epoch);
        drop(st);

        let mem = &shared.mem[s];
        debug_assert!((i + 1) * bytes <= mem.len);
        // SAFETY: sample `i` of batch `b` was claimed by this worker alone
        // (under the lock), the slot is not handed to the consumer before
        // `pending` reaches 0, and `(i + 1) * bytes <= mem.len` because a
        // batch holds at most `max_batch` samples.
        let out = unsafe { std::slice::from_raw_parts_mut(mem.ptr.add(i * bytes), bytes) };
        let result = catch_unwind(AssertUnwindSafe(|| {
            shared
                .dataset
                .write_sample(index, epoch, shared.seed, out, &mut scratch)
        }))
        .unwrap_or_else(|panic| {
            scratch = Scratch::default();
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Invalid(format!(
                "a data worker panicked on sample {index}: {what}"
            )))
        });

        st = shared.lock();
        let slot = &mut st.slots[s];
        match result {
            Ok(kept) => slot.kept[i] = kept,
            Err(e) => {
                if slot.error.as_ref().is_none_or(|(j, _)| i < *j) {
                    slot.error = Some((i, e));
                }
            }
        }
        slot.pending -= 1;
        if slot.pending == 0 {
            shared.ready.notify_all();
        }
    }
}
