//! Collectives on a backend's own memory: the seam between the distributed
//! optimizer, which is written once over [`Backend`], and the transports.
//!
//! [`Collective<B>`] all-reduces and all-gathers views of backend `B`'s
//! buffers (in place on a device, or host slices), over the whole world or
//! a group of consecutive ranks, and counts per-item presence flags
//! exactly ([`FlagCounter`]). Implementations:
//!
//! | type | backend | moves data with |
//! | --- | --- | --- |
//! | [`HostCollective`] | [`CpuBackend`] | the host [`Communicator`] (in-process, TCP), directly on the views |
//! | [`HostStaged`] | any | download to host memory, the host [`Communicator`], upload |
//! | `NcclCollective` (feature `nccl`) | `CudaBackend` | NCCL on the backend's stream, no host copy |
//!
//! Every wait has a deadline: the host transports bound each exchange by
//! their [`CommOptions::timeout`](crate::CommOptions); NCCL's collectives
//! are queued on a stream, and the waits on them ([`FlagCounter::finish`],
//! [`Collective::wait_idle`]) poll with the same deadline.
//!
//! [`Collectives`] bundles a rank's host communicator with its device
//! collective, and gives the collective for a backend.

mod host;
#[cfg(feature = "nccl")]
pub mod nccl;

use std::ops::Range;
use std::sync::Arc;

use shampoo_core::CpuBackend;
use shampoo_core::backend::Backend;

use crate::comm::Communicator;
use crate::{Error, Result};

pub use host::{HostCollective, HostFlagCounter, HostStaged};

/// What moves a collective's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CollectiveKind {
    /// The host communicator, on host memory.
    Host,
    /// Device memory staged through the host communicator.
    HostStaged,
    /// NCCL on device memory.
    Nccl,
}

impl CollectiveKind {
    /// Short name (`host`, `host-staged`, `nccl`).
    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::Host => "host",
            CollectiveKind::HostStaged => "host-staged",
            CollectiveKind::Nccl => "nccl",
        }
    }
}

impl std::fmt::Display for CollectiveKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Collectives on the memory of backend `B`.
///
/// Like [`Communicator`], methods take `&self` (implementations synchronise
/// internally), every rank calls the same collectives in the same order
/// with the same sizes, and a group is a range of consecutive ranks holding
/// the caller (the groups of one call partition the world). Views keep
/// their dtype: an all-gather moves the elements' bytes, so a 16-bit wire
/// buffer ([`shampoo_core::backend::WireJob`]) travels as it is.
///
/// On a device, a call may return once the collective is queued on the
/// backend's stream (ordered with the backend's own work); a caller that
/// reads results on the host synchronises the backend, as it does for any
/// backend work.
pub trait Collective<B: Backend>: Send + Sync {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// The host communicator of the same world (set-up, fingerprints,
    /// checkpoint agreement: small, rare messages).
    fn host(&self) -> &Arc<dyn Communicator>;
    /// What moves the data.
    fn kind(&self) -> CollectiveKind;

    /// In-place mean of `buf` over the ranks of `group`.
    fn all_reduce_mean_group(
        &self,
        backend: &B,
        buf: B::ViewMut<'_>,
        group: Range<usize>,
    ) -> Result<()>;
    /// In-place mean of `buf` over the world.
    fn all_reduce_mean(&self, backend: &B, buf: B::ViewMut<'_>) -> Result<()> {
        self.all_reduce_mean_group(backend, buf, 0..self.world_size())
    }
    /// `recv` = the sends of the ranks of `group`, in rank order (`recv`
    /// holds `group.len()` times `send`'s elements, of the same dtype).
    fn all_gather_group(
        &self,
        backend: &B,
        send: B::View<'_>,
        recv: B::ViewMut<'_>,
        group: Range<usize>,
    ) -> Result<()>;
    /// [`Collective::all_gather_group`] over the world.
    fn all_gather(&self, backend: &B, send: B::View<'_>, recv: B::ViewMut<'_>) -> Result<()> {
        self.all_gather_group(backend, send, recv, 0..self.world_size())
    }
    /// A counter of `len` presence flags per step (collective to use, not to
    /// create).
    fn flag_counter(&self, backend: &B, len: usize) -> Result<Box<dyn FlagCounter>>;
    /// Returns once every collective queued so far has completed, or fails
    /// after the deadline (host transports: at once).
    fn wait_idle(&self, backend: &B) -> Result<()>;
}

/// Exact counts, over the ranks, of per-item flags (a gradient present or
/// not), read back without blocking the step that starts them.
pub trait FlagCounter: Send {
    /// Starts summing `flags` (0 or 1 each) over the ranks (collective).
    /// The previous count must have been taken ([`FlagCounter::finish`]);
    /// otherwise it is waited for and dropped.
    fn start(&mut self, flags: &[u8]) -> Result<()>;
    /// The sums of the last [`FlagCounter::start`], once: `None` when none
    /// is outstanding, or (with `wait` false) while they are on their way.
    /// With `wait`, waits for them up to the collective deadline.
    fn finish(&mut self, wait: bool) -> Result<Option<Vec<u32>>>;
}

/// Checks a group's arguments: the caller is in it, it fits the world, and
/// `recv` holds `group.len()` times `send`.
pub(crate) fn check_group_len(
    rank: usize,
    world: usize,
    group: &Range<usize>,
    send: usize,
    recv: usize,
) -> Result<()> {
    crate::comm::check_group(rank, world, group, send, recv)
}

/// A rank's communicators: the host one and, on a GPU, NCCL. Hands out the
/// collective of each backend (the distribution policy of `shampoo-tch` and
/// `shampoo-train`).
#[derive(Clone)]
pub struct Collectives {
    host: Arc<dyn Communicator>,
    staged: Arc<HostStaged>,
    #[cfg(feature = "nccl")]
    nccl: Option<Arc<nccl::NcclCollective>>,
}

impl std::fmt::Debug for Collectives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collectives")
            .field("rank", &self.host.rank())
            .field("world", &self.host.world_size())
            .field("device", &self.device_kind())
            .finish()
    }
}

impl Collectives {
    /// Host transports only: CPU memory directly, device memory staged
    /// through the host.
    pub fn host(host: Arc<dyn Communicator>) -> Self {
        Collectives {
            staged: Arc::new(HostStaged::new(host.clone())),
            host,
            #[cfg(feature = "nccl")]
            nccl: None,
        }
    }

    /// Device memory through NCCL (which must span the host communicator's
    /// world, rank for rank); CPU memory through the host communicator.
    #[cfg(feature = "nccl")]
    pub fn with_nccl(host: Arc<dyn Communicator>, nccl: Arc<nccl::NcclCollective>) -> Result<Self> {
        if (nccl.rank(), nccl.world_size()) != (host.rank(), host.world_size()) {
            return Err(Error::invalid(format!(
                "the NCCL communicator is rank {} of {}, the host communicator rank {} of {}",
                nccl.rank(),
                nccl.world_size(),
                host.rank(),
                host.world_size()
            )));
        }
        let mut c = Self::host(host);
        c.nccl = Some(nccl);
        Ok(c)
    }

    /// The host communicator.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.host
    }
    /// This rank.
    pub fn rank(&self) -> usize {
        self.host.rank()
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.host.world_size()
    }

    /// How device memory is communicated.
    pub fn device_kind(&self) -> CollectiveKind {
        #[cfg(feature = "nccl")]
        if self.nccl.is_some() {
            return CollectiveKind::Nccl;
        }
        CollectiveKind::HostStaged
    }

    /// The collective of CPU memory.
    pub fn cpu(&self) -> Arc<dyn Collective<CpuBackend>> {
        Arc::new(HostCollective::new(self.host.clone()))
    }

    /// The collective of CUDA memory: NCCL when set up, else staged through
    /// the host.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Arc<dyn Collective<shampoo_core::CudaBackend>> {
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.clone();
        }
        self.staged.clone()
    }

    /// Any backend's memory staged through the host communicator.
    pub fn staged<B: Backend>(&self) -> Arc<dyn Collective<B>> {
        self.staged.clone()
    }
}

/// What [`DistributedShampoo::new`](crate::DistributedShampoo::new) accepts
/// as its collective: an `Arc<dyn Collective<B>>`, a [`HostStaged`], or (for
/// the CPU backend) a host `Arc<dyn Communicator>`, used directly.
pub trait IntoCollective<B: Backend> {
    /// The collective.
    fn into_collective(self) -> Arc<dyn Collective<B>>;
}

impl<B: Backend> IntoCollective<B> for Arc<dyn Collective<B>> {
    fn into_collective(self) -> Arc<dyn Collective<B>> {
        self
    }
}

impl IntoCollective<CpuBackend> for Arc<dyn Communicator> {
    fn into_collective(self) -> Arc<dyn Collective<CpuBackend>> {
        Arc::new(HostCollective::new(self))
    }
}

impl<B: Backend> IntoCollective<B> for HostStaged {
    fn into_collective(self) -> Arc<dyn Collective<B>> {
        Arc::new(self)
    }
}

impl IntoCollective<CpuBackend> for HostCollective {
    fn into_collective(self) -> Arc<dyn Collective<CpuBackend>> {
        Arc::new(self)
    }
}

/// The error of a dtype mismatch between the views of one collective.
pub(crate) fn dtype_mismatch(op: &str, a: shampoo_core::DType, b: shampoo_core::DType) -> Error {
    Error::invalid(format!("{op}: send is {a}, receive buffer is {b}"))
}
