//! The NCCL transport (feature `nccl`): collectives on raw device pointers.
//!
//! Layers, as in cudarc: the raw entry points (`ncclAllReduce`, ...) with
//! cudarc's `nccl::sys` types, loaded at run time from a library found by
//! [`find_nccl`]; functions returning [`Result`]; and the owning
//! [`NcclCommunicator`], whose drop destroys the NCCL communicator without
//! ever panicking.
//!
//! The library is loaded here rather than through cudarc's own loader,
//! because cudarc's candidate names do not include `libnccl.so.2` (the name
//! NVIDIA's wheels and packages ship) and it panics when nothing matches;
//! here a missing library is an error naming what was looked for and where.
//!
//! The NCCL unique id travels over a host [`Communicator`] (the TCP mesh
//! built through the rendezvous store, or [`SingleProcess`](super::SingleProcess)
//! for one rank): rank 0 creates it and broadcasts its 128 bytes.
//!
//! NCCL does not sum in rank order, so with more than one rank results are
//! not bitwise those of one process (they are with one rank).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId,
};

use super::Communicator;
use crate::{Error, Result};

/// File names tried, in order, in every directory.
pub const NCCL_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// Directories searched for NCCL: `SHAMPOO_CUDA_LIB_DIRS` then
/// `LD_LIBRARY_PATH` (both `:`-separated).
pub fn nccl_search_dirs() -> Vec<PathBuf> {
    ["SHAMPOO_CUDA_LIB_DIRS", "LD_LIBRARY_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .flat_map(|v| std::env::split_paths(&v).collect::<Vec<_>>())
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

/// The first `NCCL_NAMES` file in `dirs`; with `system`, also the dynamic
/// linker's own search (`dlopen("libnccl.so.2")`). The error names every
/// file name and directory tried.
pub fn find_nccl_in(dirs: &[PathBuf], system: bool) -> Result<PathBuf> {
    for d in dirs {
        for n in NCCL_NAMES {
            let p = d.join(n);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if system {
        for n in NCCL_NAMES {
            // SAFETY: loading NCCL runs its initialisers, which have no
            // preconditions; the handle is dropped at once (only probing).
            if unsafe { libloading::Library::new(n) }.is_ok() {
                return Ok(PathBuf::from(n));
            }
        }
    }
    Err(Error::Unavailable(format!(
        "NCCL not found: looked for {} in [{}]{}; set SHAMPOO_CUDA_LIB_DIRS to the directory holding libnccl.so.2 (e.g. the nvidia/nccl/lib of a PyTorch environment)",
        NCCL_NAMES.join(", "),
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if system {
            " and the system library path"
        } else {
            ""
        }
    )))
}

/// [`find_nccl_in`] over [`nccl_search_dirs`] and the system path.
pub fn find_nccl() -> Result<PathBuf> {
    find_nccl_in(&nccl_search_dirs(), true)
}

type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> ncclResult_t;
type CommInitRank =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> ncclResult_t;
type CommDestroy = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type AllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type GetErrorString = unsafe extern "C" fn(ncclResult_t) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> ncclResult_t;
/// `ncclCommSplit(comm, color, key, newcomm, config)` (NCCL >= 2.18).
type CommSplit =
    unsafe extern "C" fn(ncclComm_t, c_int, c_int, *mut ncclComm_t, *mut c_void) -> ncclResult_t;
type CommGetAsyncError = unsafe extern "C" fn(ncclComm_t, *mut ncclResult_t) -> ncclResult_t;
type CommAbort = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;

/// NCCL's entry points, resolved from one loaded library. Loaded once and
/// never unloaded: NCCL starts background threads (bootstrap, proxy) that
/// would run unmapped code after a `dlclose`.
struct NcclLib {
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    comm_destroy: CommDestroy,
    all_reduce: AllReduce,
    all_gather: AllGather,
    get_error_string: GetErrorString,
    get_version: GetVersion,
    /// Absent before NCCL 2.18 (groups of ranks then fail with an error).
    comm_split: Option<CommSplit>,
    comm_get_async_error: CommGetAsyncError,
    comm_abort: CommAbort,
    path: PathBuf,
    /// Keeps the function pointers valid.
    _lib: libloading::Library,
}

/// The process's NCCL, loaded on first use from [`find_nccl`].
fn nccl() -> Result<&'static NcclLib> {
    static LIB: OnceLock<std::result::Result<NcclLib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        find_nccl()
            .and_then(|p| NcclLib::load(&p))
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::Unavailable(e.clone()))
}

impl NcclLib {
    fn load(path: &Path) -> Result<NcclLib> {
        let fail = |e: libloading::Error| {
            Error::Unavailable(format!("cannot load NCCL from {}: {e}", path.display()))
        };
        // SAFETY: loading a shared library runs its initialisers; NCCL's have
        // no preconditions.
        let lib = unsafe { libloading::Library::new(path) }.map_err(fail)?;
        macro_rules! sym {
            ($name:literal, $ty:ty) => {
                // SAFETY: the symbol is NCCL's C function of this name, whose
                // signature (from cudarc's generated bindings) is `$ty`; the
                // pointer stays valid while `_lib` is alive, which the struct
                // guarantees.
                *unsafe { lib.get::<$ty>($name) }.map_err(fail)?
            };
        }
        // SAFETY: as in `sym!`: NCCL's ncclCommSplit has this signature.
        let comm_split = unsafe { lib.get::<CommSplit>(b"ncclCommSplit") }
            .ok()
            .map(|f| *f);
        Ok(NcclLib {
            comm_split,
            comm_get_async_error: sym!(b"ncclCommGetAsyncError", CommGetAsyncError),
            comm_abort: sym!(b"ncclCommAbort", CommAbort),
            get_unique_id: sym!(b"ncclGetUniqueId", GetUniqueId),
            comm_init_rank: sym!(b"ncclCommInitRank", CommInitRank),
            comm_destroy: sym!(b"ncclCommDestroy", CommDestroy),
            all_reduce: sym!(b"ncclAllReduce", AllReduce),
            all_gather: sym!(b"ncclAllGather", AllGather),
            get_error_string: sym!(b"ncclGetErrorString", GetErrorString),
            get_version: sym!(b"ncclGetVersion", GetVersion),
            path: path.to_path_buf(),
            _lib: lib,
        })
    }

    fn check(&self, r: ncclResult_t, what: &str) -> Result<()> {
        if r == ncclResult_t::ncclSuccess {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string
        // for any result code.
        let msg = unsafe {
            let p = (self.get_error_string)(r);
            if p.is_null() {
                String::from("unknown error")
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(Error::Unavailable(format!(
            "NCCL {what} failed: {r:?}: {msg}"
        )))
    }
}

/// Element types of the NCCL collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NcclDType {
    /// `float`.
    F32,
    /// `double`.
    F64,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// bytes.
    U8,
    /// 32-bit signed integers.
    I32,
}

impl NcclDType {
    fn raw(self) -> ncclDataType_t {
        match self {
            NcclDType::F32 => ncclDataType_t::ncclFloat32,
            NcclDType::F64 => ncclDataType_t::ncclFloat64,
            NcclDType::Bf16 => ncclDataType_t::ncclBfloat16,
            NcclDType::F16 => ncclDataType_t::ncclFloat16,
            NcclDType::U8 => ncclDataType_t::ncclUint8,
            NcclDType::I32 => ncclDataType_t::ncclInt32,
        }
    }
}

/// Checks, without creating anything, that NCCL can run on CUDA device
/// `ordinal` here: the driver loads, the device exists, and the NCCL
/// library is found ([`find_nccl`]). Ranks can agree on it before the
/// collective [`NcclCommunicator::on_device`].
pub fn probe_device(ordinal: usize) -> Result<()> {
    let unavailable = |what: String| Error::Unavailable(format!("NCCL on cuda:{ordinal}: {what}"));
    // cudarc panics when it cannot load the driver: probe it first.
    // SAFETY: loading the driver library only runs its initialisers.
    if let Err(e) = unsafe { libloading::Library::new("libcuda.so.1") } {
        return Err(unavailable(format!(
            "the CUDA driver libcuda.so.1 cannot be loaded: {e}"
        )));
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| unavailable(format!("CUDA driver: {e}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(unavailable(format!("the driver sees {count} device(s)")));
    }
    find_nccl()?;
    Ok(())
}

/// One rank's NCCL communicator. The CUDA device must be current on the
/// calling thread when it is created (e.g. after cudarc's
/// `CudaContext::new(local_rank)`).
pub struct NcclCommunicator {
    lib: &'static NcclLib,
    comm: ncclComm_t,
    rank: usize,
    world: usize,
    /// The device's primary context, held while the communicator lives
    /// (when created by [`NcclCommunicator::on_device`]).
    _ctx: Option<std::sync::Arc<cudarc::driver::CudaContext>>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it are not concurrent; every method takes `&mut self`.
unsafe impl Send for NcclCommunicator {}

impl NcclCommunicator {
    /// Creates the NCCL communicator of `host`'s world: rank 0 creates the
    /// unique id and broadcasts it over `host`.
    pub fn new(host: &dyn Communicator) -> Result<NcclCommunicator> {
        let lib = nccl()?;
        let (rank, world) = (host.rank(), host.world_size());
        let mut id = ncclUniqueId {
            internal: [0 as c_char; 128],
        };
        if rank == 0 {
            // SAFETY: `id` is a valid, writable ncclUniqueId.
            let r = unsafe { (lib.get_unique_id)(&mut id) };
            lib.check(r, "ncclGetUniqueId")?;
        }
        {
            // SAFETY: ncclUniqueId is 128 plain `c_char`s; viewing them as
            // bytes is valid for reads and writes of the same size.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(id.internal.as_mut_ptr().cast::<u8>(), 128)
            };
            host.broadcast_bytes(bytes, 0)?;
        }
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let (n, r) = (
            c_int::try_from(world).map_err(|_| Error::invalid("world too large for NCCL"))?,
            c_int::try_from(rank).map_err(|_| Error::invalid("rank too large for NCCL"))?,
        );
        // SAFETY: `comm` is a valid out-pointer; `id` is the same on every
        // rank; ranks are in range.
        let res = unsafe { (lib.comm_init_rank)(&mut comm, n, id, r) };
        lib.check(res, "ncclCommInitRank")?;
        tracing::debug!(rank, world, lib = %lib.path.display(), "nccl communicator created");
        Ok(NcclCommunicator {
            lib,
            comm,
            rank,
            world,
            _ctx: None,
        })
    }

    /// As [`NcclCommunicator::new`], on CUDA device `ordinal` (in this
    /// process's view): makes the device's primary context (the one
    /// libtorch uses) current on the calling thread first, as NCCL takes the
    /// current device. A missing driver or device is an error, never a
    /// panic.
    pub fn on_device(host: &dyn Communicator, ordinal: usize) -> Result<NcclCommunicator> {
        probe_device(ordinal)?;
        let unavailable =
            |what: String| Error::Unavailable(format!("NCCL on cuda:{ordinal}: {what}"));
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("context: {e}")))?;
        ctx.bind_to_thread()
            .map_err(|e| unavailable(format!("binding the context: {e}")))?;
        let mut comm = Self::new(host)?;
        comm._ctx = Some(ctx);
        Ok(comm)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// NCCL's version code (e.g. 22703 for 2.27.3).
    pub fn version(&self) -> Result<i32> {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out-pointer.
        let r = unsafe { (self.lib.get_version)(&mut v) };
        self.lib.check(r, "ncclGetVersion")?;
        Ok(v)
    }

    /// In-place average of `count` elements at device address `buf`,
    /// queued on `stream`.
    ///
    /// # Safety
    /// `buf` must be a device allocation of at least `count` elements of
    /// `dtype` on this communicator's device, and `stream` a valid CUDA
    /// stream of that device (or null for the default stream); the buffer
    /// must stay alive until the stream has run the operation.
    pub unsafe fn all_reduce_mean(
        &mut self,
        buf: u64,
        count: usize,
        dtype: NcclDType,
        stream: *mut c_void,
    ) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.all_reduce(buf, count, dtype, ncclRedOp_t::ncclAvg, stream) }
    }

    /// In-place sum of `count` elements at device address `buf`, queued on
    /// `stream` (exact for integers).
    ///
    /// # Safety
    /// As [`NcclCommunicator::all_reduce_mean`].
    pub unsafe fn all_reduce_sum(
        &mut self,
        buf: u64,
        count: usize,
        dtype: NcclDType,
        stream: *mut c_void,
    ) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.all_reduce(buf, count, dtype, ncclRedOp_t::ncclSum, stream) }
    }

    /// `ncclAllReduce` in place with `op`.
    ///
    /// # Safety
    /// As [`NcclCommunicator::all_reduce_mean`].
    unsafe fn all_reduce(
        &mut self,
        buf: u64,
        count: usize,
        dtype: NcclDType,
        op: ncclRedOp_t,
        stream: *mut c_void,
    ) -> Result<()> {
        self.live("ncclAllReduce")?;
        let p = buf as *mut c_void;
        // SAFETY: the caller guarantees the pointers (see above).
        let r = unsafe {
            (self.lib.all_reduce)(p, p, count, dtype.raw(), op, self.comm, stream.cast())
        };
        self.lib.check(r, &format!("ncclAllReduce ({op:?})"))
    }

    /// The communicator of a group: the ranks that pass the same `color`,
    /// this one as `rank` of `size` (`ncclCommSplit`, ranks ordered by
    /// `rank`; collective over this communicator's ranks).
    pub fn split(&mut self, color: usize, rank: usize, size: usize) -> Result<NcclCommunicator> {
        self.live("ncclCommSplit")?;
        let split = self.lib.comm_split.ok_or_else(|| {
            Error::Unavailable(format!(
                "NCCL at {} has no ncclCommSplit (groups of ranks need NCCL 2.18 or later)",
                self.lib.path.display()
            ))
        })?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let (c, k) = (
            c_int::try_from(color).map_err(|_| Error::invalid("split color too large"))?,
            c_int::try_from(rank).map_err(|_| Error::invalid("split key too large"))?,
        );
        // SAFETY: `self.comm` is a live communicator; `comm` is a valid
        // out-pointer; a null config inherits the parent's.
        let r = unsafe { split(self.comm, c, k, &mut comm, std::ptr::null_mut()) };
        self.lib.check(r, "ncclCommSplit")?;
        Ok(NcclCommunicator {
            lib: self.lib,
            comm,
            rank,
            world: size,
            _ctx: self._ctx.clone(),
        })
    }

    /// An error once the communicator was aborted.
    fn live(&self, what: &str) -> Result<()> {
        if self.comm.is_null() {
            return Err(Error::Unavailable(format!(
                "NCCL {what}: the communicator was aborted after an earlier failure"
            )));
        }
        Ok(())
    }

    /// NCCL's asynchronous error state (a failed or aborted collective,
    /// for example a peer that died): `Ok` while there is none.
    pub fn async_error(&self) -> Result<()> {
        self.live("ncclCommGetAsyncError")?;
        let mut state = ncclResult_t::ncclSuccess;
        // SAFETY: `self.comm` is live; `state` is a valid out-pointer.
        let r = unsafe { (self.lib.comm_get_async_error)(self.comm, &mut state) };
        self.lib.check(r, "ncclCommGetAsyncError")?;
        if state == ncclResult_t::ncclInProgress {
            return Ok(());
        }
        self.lib.check(state, "a queued collective")
    }

    /// Aborts the communicator's queued collectives (after a timeout): its
    /// later collectives fail instead of hanging. The communicator is
    /// unusable afterwards.
    pub fn abort(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // SAFETY: `self.comm` is live and is not used after this (nulled).
        let r = unsafe { (self.lib.comm_abort)(self.comm) };
        if let Err(e) = self.lib.check(r, "ncclCommAbort") {
            tracing::warn!("{e}");
        }
        self.comm = std::ptr::null_mut();
    }

    /// `recv` = every rank's `count` elements at `send`, in rank order.
    ///
    /// # Safety
    /// `send` must hold `count` and `recv` `count * world_size` elements of
    /// `dtype` on this communicator's device; `stream` as in
    /// [`NcclCommunicator::all_reduce_mean`].
    pub unsafe fn all_gather(
        &mut self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: NcclDType,
        stream: *mut c_void,
    ) -> Result<()> {
        self.live("ncclAllGather")?;
        // SAFETY: the caller guarantees the pointers (see above).
        let r = unsafe {
            (self.lib.all_gather)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype.raw(),
                self.comm,
                stream.cast(),
            )
        };
        self.lib.check(r, "ncclAllGather")
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // SAFETY: `comm` was created by ncclCommInitRank and is destroyed
        // once.
        let r = unsafe { (self.lib.comm_destroy)(self.comm) };
        if let Err(e) = self.lib.check(r, "ncclCommDestroy") {
            tracing::warn!("{e}");
        }
        self.comm = std::ptr::null_mut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_what_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_nccl_in(&[dir.path().to_path_buf()], false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "NCCL not found: looked for libnccl.so.2, libnccl.so in [{}]; set SHAMPOO_CUDA_LIB_DIRS to the directory holding libnccl.so.2 (e.g. the nvidia/nccl/lib of a PyTorch environment)",
                dir.path().display()
            )
        );
    }

    #[test]
    fn the_first_directory_holding_the_library_wins() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(b.path().join("libnccl.so.2"), b"").unwrap();
        let found = find_nccl_in(&[a.path().to_path_buf(), b.path().to_path_buf()], false).unwrap();
        assert_eq!(found, b.path().join("libnccl.so.2"));
    }
}
