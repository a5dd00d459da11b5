//! The host collectives: CPU memory through a host [`Communicator`]
//! directly ([`HostCollective`]), and any backend's memory staged through
//! host memory ([`HostStaged`]: download, host collective, upload).
//!
//! Both use the same host arithmetic (the transports' rank-order mean), so
//! a CPU backend behind [`HostStaged`] gives bitwise what
//! [`HostCollective`] gives.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use shampoo_core::backend::{Backend, ViewMutOps, ViewOps};
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut};

use super::{Collective, CollectiveKind, FlagCounter, check_group_len, dtype_mismatch};
use crate::comm::{Communicator, reduce_chunks};
use crate::{Error, Result};

fn bytes(v: HostView<'_>) -> &[u8] {
    match v {
        HostView::F32(x) => bytemuck::cast_slice(x),
        HostView::F64(x) => bytemuck::cast_slice(x),
    }
}

fn bytes_mut(v: HostViewMut<'_>) -> &mut [u8] {
    match v {
        HostViewMut::F32(x) => bytemuck::cast_slice_mut(x),
        HostViewMut::F64(x) => bytemuck::cast_slice_mut(x),
    }
}

/// In-place mean of host memory over `group` (rank order, the transports'
/// arithmetic).
fn host_mean(host: &dyn Communicator, buf: HostViewMut<'_>, group: Range<usize>) -> Result<()> {
    let (rank, world) = (host.rank(), host.world_size());
    check_group_len(rank, world, &group, 0, 0)?;
    if group.len() == world {
        return match buf {
            HostViewMut::F32(b) => host.all_reduce_mean(b),
            HostViewMut::F64(b) => host.all_reduce_mean_f64(b),
        };
    }
    // A group: gather the group's parts, then sum them in rank order.
    fn reduce<T: crate::comm::ReduceElem>(
        host: &dyn Communicator,
        b: &mut [T],
        group: Range<usize>,
    ) -> Result<()> {
        let g = group.len();
        let mut all = vec![T::zeroed(); b.len() * g];
        host.all_gather_group_bytes(
            bytemuck::cast_slice(b),
            bytemuck::cast_slice_mut(&mut all),
            group,
        )?;
        let chunks: Vec<&[T]> = all.chunks(b.len().max(1)).take(g).collect();
        if b.is_empty() {
            return Ok(());
        }
        reduce_chunks(b, &chunks);
        Ok(())
    }
    match buf {
        HostViewMut::F32(b) => reduce(host, b, group),
        HostViewMut::F64(b) => reduce(host, b, group),
    }
}

/// All-gather of host memory within `group`.
fn host_gather(
    host: &dyn Communicator,
    send: HostView<'_>,
    recv: HostViewMut<'_>,
    group: Range<usize>,
) -> Result<()> {
    if send.dtype() != recv.dtype() {
        return Err(dtype_mismatch("all_gather", send.dtype(), recv.dtype()));
    }
    check_group_len(
        host.rank(),
        host.world_size(),
        &group,
        send.len(),
        recv.len(),
    )?;
    host.all_gather_group_bytes(bytes(send), bytes_mut(recv), group)
}

/// The collective of CPU ranks: a host [`Communicator`] (in-process, TCP,
/// one process) working on the CPU backend's views directly.
#[derive(Clone)]
pub struct HostCollective {
    host: Arc<dyn Communicator>,
}

impl HostCollective {
    /// Over `host`.
    pub fn new(host: Arc<dyn Communicator>) -> Self {
        HostCollective { host }
    }
}

impl Collective<CpuBackend> for HostCollective {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn host(&self) -> &Arc<dyn Communicator> {
        &self.host
    }
    fn kind(&self) -> CollectiveKind {
        CollectiveKind::Host
    }
    fn all_reduce_mean_group(
        &self,
        _backend: &CpuBackend,
        buf: HostViewMut<'_>,
        group: Range<usize>,
    ) -> Result<()> {
        host_mean(self.host.as_ref(), buf, group)
    }
    fn all_gather_group(
        &self,
        _backend: &CpuBackend,
        send: HostView<'_>,
        recv: HostViewMut<'_>,
        group: Range<usize>,
    ) -> Result<()> {
        host_gather(self.host.as_ref(), send, recv, group)
    }
    fn flag_counter(&self, _backend: &CpuBackend, len: usize) -> Result<Box<dyn FlagCounter>> {
        Ok(Box::new(HostFlagCounter::new(self.host.clone(), len)))
    }
    fn wait_idle(&self, _backend: &CpuBackend) -> Result<()> {
        Ok(())
    }
}

/// Host memory for staging, as 8-byte words (aligned for f32 and f64).
#[derive(Default)]
struct Staging {
    send: Vec<u64>,
    recv: Vec<u64>,
}

/// A host view of `n` elements of `dtype` at the start of `words` (grown,
/// never shrunk: a steady state allocates nothing).
fn staging(words: &mut Vec<u64>, dtype: DType, n: usize) -> HostViewMut<'_> {
    let need = (n * dtype.size()).div_ceil(8);
    if words.len() < need {
        words.resize(need, 0);
    }
    match dtype {
        DType::F32 => HostViewMut::F32(&mut bytemuck::cast_slice_mut(words.as_mut_slice())[..n]),
        DType::F64 => HostViewMut::F64(&mut bytemuck::cast_slice_mut(words.as_mut_slice())[..n]),
    }
}

/// Any backend's collectives through host memory: each call downloads its
/// input, runs the host collective, and uploads the result.
///
/// This is how device ranks communicate where NCCL cannot be set up (for
/// example two processes sharing one GPU, which NCCL refuses), and the
/// reference the device path is tested against: over the CPU backend it is
/// bitwise [`HostCollective`]. Each call waits for the backend's queued work
/// (the download synchronises it).
pub struct HostStaged {
    host: Arc<dyn Communicator>,
    staging: Mutex<Staging>,
}

impl HostStaged {
    /// Over `host`.
    pub fn new(host: Arc<dyn Communicator>) -> Self {
        HostStaged {
            host,
            staging: Mutex::new(Staging::default()),
        }
    }

    fn staging(&self) -> std::sync::MutexGuard<'_, Staging> {
        self.staging.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B: Backend> Collective<B> for HostStaged {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn host(&self) -> &Arc<dyn Communicator> {
        &self.host
    }
    fn kind(&self) -> CollectiveKind {
        CollectiveKind::HostStaged
    }
    fn all_reduce_mean_group(
        &self,
        backend: &B,
        buf: B::ViewMut<'_>,
        group: Range<usize>,
    ) -> Result<()> {
        let (dtype, n) = (buf.dtype(), buf.len());
        let mut st = self.staging();
        let mut h = staging(&mut st.send, dtype, n);
        backend.download(backend.as_view(&buf), h.reborrow())?;
        host_mean(self.host.as_ref(), h.reborrow(), group)?;
        backend.upload(buf, h.as_view())?;
        Ok(())
    }
    fn all_gather_group(
        &self,
        backend: &B,
        send: B::View<'_>,
        recv: B::ViewMut<'_>,
        group: Range<usize>,
    ) -> Result<()> {
        if send.dtype() != recv.dtype() {
            return Err(dtype_mismatch("all_gather", send.dtype(), recv.dtype()));
        }
        let dtype = send.dtype();
        let mut st = self.staging();
        let Staging { send: s, recv: r } = &mut *st;
        let mut hs = staging(s, dtype, send.len());
        let mut hr = staging(r, dtype, recv.len());
        backend.download(send, hs.reborrow())?;
        host_gather(self.host.as_ref(), hs.as_view(), hr.reborrow(), group)?;
        backend.upload(recv, hr.as_view())?;
        Ok(())
    }
    fn flag_counter(&self, _backend: &B, len: usize) -> Result<Box<dyn FlagCounter>> {
        Ok(Box::new(HostFlagCounter::new(self.host.clone(), len)))
    }
    fn wait_idle(&self, _backend: &B) -> Result<()> {
        Ok(())
    }
}

/// Counts flags with one host all-gather of a byte per flag and rank; the
/// sums are ready as soon as [`FlagCounter::start`] returns.
pub struct HostFlagCounter {
    host: Arc<dyn Communicator>,
    len: usize,
    gathered: Vec<u8>,
    ready: Option<Vec<u32>>,
}

impl HostFlagCounter {
    /// A counter of `len` flags over `host`'s world.
    pub fn new(host: Arc<dyn Communicator>, len: usize) -> Self {
        HostFlagCounter {
            gathered: vec![0; len * host.world_size()],
            host,
            len,
            ready: None,
        }
    }
}

impl FlagCounter for HostFlagCounter {
    fn start(&mut self, flags: &[u8]) -> Result<()> {
        if flags.len() != self.len {
            return Err(Error::invalid(format!(
                "{} presence flags for a counter of {}",
                flags.len(),
                self.len
            )));
        }
        self.host.all_gather_bytes(flags, &mut self.gathered)?;
        let mut sums = vec![0u32; self.len];
        for part in self.gathered.chunks(self.len.max(1)) {
            for (s, &f) in sums.iter_mut().zip(part) {
                *s += u32::from(f);
            }
        }
        self.ready = Some(sums);
        Ok(())
    }

    fn finish(&mut self, _wait: bool) -> Result<Option<Vec<u32>>> {
        Ok(self.ready.take())
    }
}
