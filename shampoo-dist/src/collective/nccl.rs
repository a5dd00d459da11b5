//! NCCL on the CUDA backend's memory (feature `nccl`): collectives queued
//! on the backend's stream, in place, with no host copy and no host
//! synchronisation.
//!
//! - Means are NCCL's `ncclAvg`; NCCL does not sum in rank order, so with
//!   several ranks results are not bitwise those of one process (with one
//!   rank they are: the average of one value is that value).
//! - Presence flags are summed as 32-bit integers (`ncclSum` on
//!   `ncclInt32`, exact) into device memory, copied back into pinned host
//!   memory on the same stream and read when an event says the copy is
//!   done: the step that starts the count never waits for the GPU.
//! - Groups of ranks use communicators split from the world's
//!   (`ncclCommSplit`, made at the first use of each group, which every
//!   rank reaches at the same collective).
//! - Every wait (the flag read-back, [`Collective::wait_idle`]) polls an
//!   event with the collective timeout. When it passes, the NCCL
//!   communicator is aborted, so that later collectives fail at once
//!   instead of hanging, and the error says what NCCL reports.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, DriverError, result as drv, sys as dsys};
use shampoo_core::backend::cuda::{CudaView, CudaViewMut};
use shampoo_core::backend::{ViewMutOps, ViewOps};
use shampoo_core::{CudaBackend, DType};

use super::{Collective, CollectiveKind, FlagCounter, check_group_len, dtype_mismatch};
use crate::comm::nccl::{NcclCommunicator, NcclDType};
use crate::comm::{CommOptions, Communicator};
use crate::{Error, Result};

/// An NCCL communicator shared by a collective and its flag counters.
type Shared = Arc<Mutex<NcclCommunicator>>;

fn lock(c: &Mutex<NcclCommunicator>) -> MutexGuard<'_, NcclCommunicator> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

fn nccl_dtype(d: DType) -> NcclDType {
    match d {
        DType::F32 => NcclDType::F32,
        DType::F64 => NcclDType::F64,
    }
}

fn driver(what: &str, e: DriverError) -> Error {
    Error::Unavailable(format!("CUDA {what}: {e}"))
}

/// Polls `event` until it completes, at most `timeout`. On a timeout the
/// communicator is aborted and the error carries NCCL's asynchronous state.
fn wait_event(
    event: dsys::CUevent,
    comm: &Mutex<NcclCommunicator>,
    timeout: Duration,
    what: &str,
) -> Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(20);
    loop {
        // SAFETY: `event` is a live event of the current context.
        match unsafe { drv::event::query(event) } {
            Ok(()) => return Ok(()),
            Err(DriverError(dsys::CUresult::CUDA_ERROR_NOT_READY)) => {}
            Err(e) => return Err(driver(&format!("waiting for {what}"), e)),
        }
        if start.elapsed() >= timeout {
            let mut c = lock(comm);
            let detail = match c.async_error() {
                Ok(()) => "NCCL reports no error: a peer is likely hung or dead".to_string(),
                Err(e) => e.to_string(),
            };
            let rank = c.rank();
            c.abort();
            return Err(Error::DeviceTimeout {
                rank,
                op: what.to_string(),
                timeout,
                detail: format!("{detail}; the NCCL communicator was aborted"),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    }
}

/// A CUDA event for polling, destroyed on drop.
struct Event(dsys::CUevent);

impl Event {
    fn new() -> Result<Self> {
        drv::event::create(dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Event)
            .map_err(|e| driver("event", e))
    }
    fn record(&self, stream: *mut std::ffi::c_void) -> Result<()> {
        // SAFETY: the event is live; the stream is the backend's, valid for
        // its life (the caller holds the backend).
        unsafe { drv::event::record(self.0, stream as dsys::CUstream) }
            .map_err(|e| driver("event record", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by `Event::new`, destroyed once; destroying an
        // event that has not completed is allowed (resources are released
        // when it completes).
        let _ = unsafe { drv::event::destroy(self.0) };
    }
}

/// NCCL collectives of one GPU rank, on the CUDA backend's stream.
pub struct NcclCollective {
    world: Shared,
    groups: Mutex<Vec<(Range<usize>, NcclCommunicator)>>,
    host: Arc<dyn Communicator>,
    ordinal: usize,
    rank: usize,
    size: usize,
    timeout: Duration,
}

impl NcclCollective {
    /// Collective: creates the NCCL communicator of `host`'s world on CUDA
    /// device `ordinal` ([`NcclCommunicator::on_device`]). Every wait on
    /// the device is bounded by `opts.timeout`.
    ///
    /// Ranks should first agree that NCCL can run everywhere
    /// ([`crate::comm::nccl::probe_device`]), as the creation is collective.
    pub fn new(host: Arc<dyn Communicator>, ordinal: usize, opts: &CommOptions) -> Result<Self> {
        let nccl = NcclCommunicator::on_device(host.as_ref(), ordinal)?;
        Self::from_communicator(nccl, host, ordinal, opts)
    }

    /// Over an NCCL communicator created on device `ordinal` for `host`'s
    /// world.
    pub fn from_communicator(
        nccl: NcclCommunicator,
        host: Arc<dyn Communicator>,
        ordinal: usize,
        opts: &CommOptions,
    ) -> Result<Self> {
        if (nccl.rank(), nccl.world_size()) != (host.rank(), host.world_size()) {
            return Err(Error::invalid(format!(
                "the NCCL communicator is rank {} of {}, the host communicator rank {} of {}",
                nccl.rank(),
                nccl.world_size(),
                host.rank(),
                host.world_size()
            )));
        }
        Ok(NcclCollective {
            rank: nccl.rank(),
            size: nccl.world_size(),
            world: Arc::new(Mutex::new(nccl)),
            groups: Mutex::new(Vec::new()),
            host,
            ordinal,
            timeout: opts.timeout,
        })
    }

    /// The CUDA device the communicator runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Checks the backend's device and makes its context current.
    fn enter(&self, be: &CudaBackend) -> Result<()> {
        if be.ordinal() != self.ordinal {
            return Err(Error::invalid(format!(
                "the NCCL communicator is on cuda:{}, the backend on cuda:{}",
                self.ordinal,
                be.ordinal()
            )));
        }
        be.make_current()?;
        Ok(())
    }

    /// Runs `f` on the communicator of `group` (the world's, or one split
    /// from it at the group's first use), then checks NCCL's asynchronous
    /// state.
    fn on_group(
        &self,
        group: &Range<usize>,
        f: impl FnOnce(&mut NcclCommunicator) -> Result<()>,
    ) -> Result<()> {
        if group.len() == self.size {
            let mut c = lock(&self.world);
            f(&mut c)?;
            return c.async_error();
        }
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let i = match groups.iter().position(|(g, _)| g == group) {
            Some(i) => i,
            None => {
                let split =
                    lock(&self.world).split(group.start, self.rank - group.start, group.len())?;
                groups.push((group.clone(), split));
                groups.len() - 1
            }
        };
        let c = &mut groups[i].1;
        f(c)?;
        c.async_error()
    }
}

impl Collective<CudaBackend> for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn host(&self) -> &Arc<dyn Communicator> {
        &self.host
    }
    fn kind(&self) -> CollectiveKind {
        CollectiveKind::Nccl
    }

    fn all_reduce_mean_group(
        &self,
        be: &CudaBackend,
        buf: CudaViewMut<'_>,
        group: Range<usize>,
    ) -> Result<()> {
        check_group_len(self.rank, self.size, &group, 0, 0)?;
        self.enter(be)?;
        let (ptr, n, dtype) = (buf.device_ptr(), buf.len(), buf.dtype());
        if n == 0 {
            return Ok(());
        }
        self.on_group(&group, |c| {
            // SAFETY: `buf` is `n` elements of `dtype` in the backend's
            // device memory, borrowed by this call; the all-reduce is queued
            // on the backend's stream, so work that reuses the memory later
            // (queued on the same stream) runs after it.
            unsafe { c.all_reduce_mean(ptr, n, nccl_dtype(dtype), be.stream()) }
        })
    }

    fn all_gather_group(
        &self,
        be: &CudaBackend,
        send: CudaView<'_>,
        recv: CudaViewMut<'_>,
        group: Range<usize>,
    ) -> Result<()> {
        if send.dtype() != recv.dtype() {
            return Err(dtype_mismatch("all_gather", send.dtype(), recv.dtype()));
        }
        check_group_len(self.rank, self.size, &group, send.len(), recv.len())?;
        self.enter(be)?;
        if send.is_empty() {
            return Ok(());
        }
        let (s, r, n, dtype) = (
            send.device_ptr(),
            recv.device_ptr(),
            send.len(),
            send.dtype(),
        );
        self.on_group(&group, |c| {
            // SAFETY: `send` holds `n` and `recv` `n * group.len()` elements
            // of `dtype` (checked) in the backend's device memory; queued on
            // the backend's stream as above.
            unsafe { c.all_gather(s, r, n, nccl_dtype(dtype), be.stream()) }
        })
    }

    fn flag_counter(&self, be: &CudaBackend, len: usize) -> Result<Box<dyn FlagCounter>> {
        self.enter(be)?;
        Ok(Box::new(NcclFlagCounter::new(
            self.world.clone(),
            be,
            len,
            self.timeout,
        )?))
    }

    fn wait_idle(&self, be: &CudaBackend) -> Result<()> {
        self.enter(be)?;
        let event = Event::new()?;
        event.record(be.stream())?;
        wait_event(event.0, &self.world, self.timeout, "the queued collectives")
    }
}

/// Pinned host memory of `len` `i32`s, freed on drop (unless leaked).
struct Pinned {
    ptr: *mut i32,
    len: usize,
}

impl Pinned {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: a plain page-locked allocation of `len` i32s (flags 0),
        // zeroed below before any read.
        let ptr = unsafe { drv::malloc_host(len * 4, 0) }
            .map_err(|e| driver("pinned host memory", e))?
            .cast::<i32>();
        // SAFETY: `ptr` holds `len` i32s.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(Pinned { ptr, len })
    }
    fn slice(&self) -> &[i32] {
        // SAFETY: `ptr` holds `len` initialised i32s for the life of self;
        // callers only read when no copy into it is in flight.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn slice_mut(&mut self) -> &mut [i32] {
        // SAFETY: as above, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        // SAFETY: allocated by `malloc_host`, freed once; the owner only
        // drops it when no copy is in flight (otherwise it leaks it).
        let _ = unsafe { drv::free_host(self.ptr.cast()) };
    }
}

/// Presence flags summed by NCCL as integers and read back asynchronously.
struct NcclFlagCounter {
    comm: Shared,
    ctx: Arc<CudaContext>,
    stream: dsys::CUstream,
    /// `len` i32s on the device.
    device: dsys::CUdeviceptr,
    host_in: Pinned,
    host_out: Pinned,
    event: Event,
    len: usize,
    pending: bool,
    timeout: Duration,
    /// Sums of a counter of no flags.
    empty: bool,
}

// SAFETY: the raw handles (stream, device pointer, pinned memory, event)
// are owned by this counter and used from one thread at a time (`&mut
// self`); the driver API is thread-safe once the context is bound, which
// every method does first.
unsafe impl Send for NcclFlagCounter {}

impl NcclFlagCounter {
    fn new(comm: Shared, be: &CudaBackend, len: usize, timeout: Duration) -> Result<Self> {
        let ctx = CudaContext::new(be.ordinal()).map_err(|e| driver("context", e))?;
        ctx.bind_to_thread().map_err(|e| driver("context", e))?;
        let bytes = len.max(1) * 4;
        // SAFETY: a plain device allocation, zeroed before use.
        let device = unsafe { drv::malloc_sync(bytes) }.map_err(|e| driver("allocation", e))?;
        // SAFETY: `device` holds `bytes` bytes.
        unsafe { drv::memset_d8_sync(device, 0, bytes) }.map_err(|e| driver("memset", e))?;
        Ok(NcclFlagCounter {
            comm,
            stream: be.stream() as dsys::CUstream,
            device,
            host_in: Pinned::new(len.max(1))?,
            host_out: Pinned::new(len.max(1))?,
            event: Event::new()?,
            ctx,
            len,
            pending: false,
            timeout,
            empty: false,
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver("context", e))
    }
}

impl FlagCounter for NcclFlagCounter {
    fn start(&mut self, flags: &[u8]) -> Result<()> {
        if flags.len() != self.len {
            return Err(Error::invalid(format!(
                "{} presence flags for a counter of {}",
                flags.len(),
                self.len
            )));
        }
        if self.pending {
            self.finish(true)?;
        }
        if self.len == 0 {
            self.empty = true;
            return Ok(());
        }
        self.bind()?;
        for (d, &f) in self.host_in.slice_mut().iter_mut().zip(flags) {
            *d = i32::from(f);
        }
        let n = self.len;
        // SAFETY: `device` holds `len` i32s; `host_in` is pinned and not
        // written again before this copy is done (the next `start` waits
        // for the event recorded after it).
        unsafe { drv::memcpy_htod_async(self.device, &self.host_in.slice()[..n], self.stream) }
            .map_err(|e| driver("flag upload", e))?;
        {
            let mut c = lock(&self.comm);
            // SAFETY: `device` holds `len` i32s, alive for the counter's
            // life; queued on the backend's stream after the upload.
            unsafe { c.all_reduce_sum(self.device, n, NcclDType::I32, self.stream.cast()) }?;
            c.async_error()?;
        }
        // SAFETY: `host_out` is pinned, holds `len` i32s and is only read
        // after the event recorded below has completed.
        unsafe {
            drv::memcpy_dtoh_async(
                &mut self.host_out.slice_mut()[..n],
                self.device,
                self.stream,
            )
        }
        .map_err(|e| driver("flag read-back", e))?;
        self.event.record(self.stream.cast())?;
        self.pending = true;
        Ok(())
    }

    fn finish(&mut self, wait: bool) -> Result<Option<Vec<u32>>> {
        if std::mem::take(&mut self.empty) {
            return Ok(Some(Vec::new()));
        }
        if !self.pending {
            return Ok(None);
        }
        self.bind()?;
        if !wait {
            // SAFETY: the event is live.
            match unsafe { drv::event::query(self.event.0) } {
                Ok(()) => {}
                Err(DriverError(dsys::CUresult::CUDA_ERROR_NOT_READY)) => return Ok(None),
                Err(e) => return Err(driver("flag read-back", e)),
            }
        } else {
            wait_event(
                self.event.0,
                &self.comm,
                self.timeout,
                "the gradient presence count",
            )?;
        }
        self.pending = false;
        Ok(Some(
            self.host_out
                .slice()
                .iter()
                .map(|&k| k.max(0) as u32)
                .collect(),
        ))
    }
}

impl Drop for NcclFlagCounter {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        if self.pending
            && wait_event(self.event.0, &self.comm, self.timeout, "a presence count").is_err()
        {
            // A copy may still write into the pinned buffers: leak them
            // rather than free memory in use.
            tracing::warn!("an NCCL presence count never completed; its buffers are leaked");
            for p in [&mut self.host_in, &mut self.host_out] {
                p.ptr = std::ptr::null_mut();
            }
            return;
        }
        // SAFETY: allocated by `malloc_sync`, freed once, no work in flight.
        let _ = unsafe { drv::free_sync(self.device) };
    }
}
