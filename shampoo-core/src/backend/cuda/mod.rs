//! The CUDA backend: the project's own kernels (`kernels/*.cu`, compiled
//! with NVRTC at run time), cuBLAS strided-batched GEMM for statistics,
//! preconditioning and the Newton iteration, cuSOLVER for batched symmetric
//! eigendecompositions. Libraries are loaded at run time through cudarc
//! (`dynamic-loading`), after [`probe`] has checked that they exist, so a
//! binary built with the `cuda` feature runs (on the CPU backend) on
//! machines without CUDA, and reports what is missing when asked for CUDA.
//!
//! Memory: a [`CudaBuffer`] is one device allocation, made when the
//! algorithm builds its state (the algorithm allocates all its buffers at
//! construction). Views are plain `(device address, length, dtype)` triples
//! with a lifetime marker; [`CudaView::from_raw`] and
//! [`CudaViewMut::from_raw`] let a caller (e.g. a libtorch program) hand in
//! parameters and gradients it owns without copies.
//!
//! Work is queued on one stream: the legacy default stream
//! ([`CudaBackend::new`]) or a stream of the caller's
//! ([`CudaBackend::with_stream`]). A steady-state step queues kernels and
//! GEMMs only: no allocation, no copy and no host synchronisation (small
//! tables of block records and GEMM pointer arrays are uploaded the first
//! time they are needed and reused, see `tables.rs`). The exceptions are in
//! amortized steps: [`Backend::eigh`]'s per-matrix statuses are host
//! memory, so it waits for the solver, its workspace grows on the first
//! call for a given size, and a float32 failure retried in float64
//! allocates the float64 copy it needs; the failure flags of a root-inverse
//! step are read back once ([`Backend::download_all`]).
//!
//! Selections are turned into runs of consecutive matrices; each run is one
//! launch (one batched call), so the usual selections (all, or an interval)
//! cost no upload of indices. The runs of all jobs of a gather, scatter,
//! `map` or `reduce` call, and the same-size products of a `matmul` call,
//! are merged into one launch where the kernel allows it (`ops.rs`,
//! `blas.rs`). [`CudaBackend::planner`] runs all of this with no device and
//! records what it would issue ([`plan`]).

mod blas;
mod eigh;
mod kernels;
mod libs;
mod ops;
pub mod plan;
pub mod probe;
mod scratch;
mod tables;
mod wire;

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, result as drv, sys as dsys};

use crate::backend::{
    Backend, EighJob, GatherJob, GramJob, Map, MatmulJob, ModeProductJob, Op, OrthogonalizeJob,
    QrJob, ReduceJob, ScatterJob, Selection, TableEntry, ViewMutOps, ViewOps, WireJob,
};
use crate::{DType, Error, HostView, HostViewMut, Result};
use kernels::Args;

pub use kernels::{
    COMMON, Kernel, KernelSource, SOURCES, compile_all, compile_options, compile_source,
};
pub use ops::{CudaBlockTable, GEOMETRY_WORDS, MOVE_WORDS, move_words};

/// One device allocation of `len` elements of one dtype.
pub struct CudaBuffer {
    ptr: u64,
    len: usize,
    dtype: DType,
    /// The context that owns the allocation (none for a planner's).
    ctx: Option<Arc<CudaContext>>,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuffer({} x {} at {:#x})",
            self.len, self.dtype, self.ptr
        )
    }
}

impl CudaBuffer {
    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if self.ptr != 0
            && let Some(ctx) = &self.ctx
            && ctx.bind_to_thread().is_ok()
        {
            // SAFETY: the allocation was made by `alloc` and is freed once;
            // cuMemFree waits for work still using it.
            let _ = unsafe { drv::free_sync(self.ptr) };
        }
    }
}

/// Shared view of device memory: `len` elements of `dtype` at a device
/// address, borrowed for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct CudaView<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    _life: PhantomData<&'a ()>,
}

impl CudaView<'_> {
    /// A view of memory the caller owns (e.g. a libtorch tensor's
    /// `data_ptr()`).
    ///
    /// # Safety
    ///
    /// `ptr` must be the address of `len` contiguous elements of `dtype` in
    /// device memory of the backend's context (or 0 when `len` is 0), kept
    /// alive and not written by anyone else while the view (and any work
    /// the backend queued with it, until the stream reaches that point) is
    /// in use.
    pub unsafe fn from_raw(ptr: u64, len: usize, dtype: DType) -> Self {
        CudaView {
            ptr,
            len,
            dtype,
            _life: PhantomData,
        }
    }
    /// The device address of the first element.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl ViewOps for CudaView<'_> {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
    fn slice(self, start: usize, len: usize) -> Self {
        assert!(
            start.checked_add(len).is_some_and(|e| e <= self.len),
            "slice {start}..+{len} of a view of {}",
            self.len
        );
        CudaView {
            ptr: self.ptr + (start * self.dtype.size()) as u64,
            len,
            ..self
        }
    }
}

/// Exclusive view of device memory: `len` elements of `dtype` at a device
/// address, borrowed mutably for `'a`.
#[derive(Debug)]
pub struct CudaViewMut<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    _life: PhantomData<&'a mut ()>,
}

impl CudaViewMut<'_> {
    /// An exclusive view of memory the caller owns (e.g. a libtorch
    /// parameter's `data_ptr()`), updated in place.
    ///
    /// # Safety
    ///
    /// As [`CudaView::from_raw`], and no other view or program may read or
    /// write the memory while this view (and the work queued with it) is in
    /// use.
    pub unsafe fn from_raw(ptr: u64, len: usize, dtype: DType) -> Self {
        CudaViewMut {
            ptr,
            len,
            dtype,
            _life: PhantomData,
        }
    }
    /// The device address of the first element.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl ViewMutOps for CudaViewMut<'_> {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        assert!(mid <= self.len, "split at {mid} of a view of {}", self.len);
        let second = CudaViewMut {
            ptr: self.ptr + (mid * self.dtype.size()) as u64,
            len: self.len - mid,
            dtype: self.dtype,
            _life: PhantomData,
        };
        (CudaViewMut { len: mid, ..self }, second)
    }
}

/// A raw stream handle.
#[derive(Clone, Copy)]
struct Stream(dsys::CUstream);
// SAFETY: a CUstream is an opaque driver handle usable from any thread with
// its context current; the driver API is thread-safe.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

/// What a backend's calls reach: a device, or a recorder of what they
/// would issue ([`plan`]).
enum Exec {
    Device(Device),
    Plan(plan::Recorder),
}

/// One device's handles.
struct Device {
    // Dropped in this order: the library handles, the cached tables and
    // the kernels while the context (last) is still alive.
    libs: Mutex<libs::Libs>,
    tables: Mutex<tables::Cache>,
    kernels: kernels::Loaded,
    stream: Stream,
    ctx: Arc<CudaContext>,
}

impl Drop for Device {
    fn drop(&mut self) {
        // Handles and modules are destroyed with the context current, after
        // the work queued with them.
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the stream is valid for the backend's life.
            let _ = unsafe { drv::stream::synchronize(self.stream.0) };
        }
    }
}

/// The CUDA backend (one device, one stream), or its planner.
pub struct CudaBackend {
    exec: Exec,
    device: String,
    arch: String,
}

impl CudaBackend {
    /// A backend on device `ordinal`, queueing on the legacy default stream.
    ///
    /// Fails with [`Error::BackendUnavailable`] naming what is missing: the
    /// driver library, a toolkit library (see [`probe`]), or a device.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::init(ordinal, std::ptr::null_mut())
    }

    /// A backend on device `ordinal` that queues all its work on `stream`
    /// (e.g. PyTorch's current stream), so that it is ordered with the
    /// caller's work without synchronisation.
    ///
    /// # Safety
    ///
    /// `stream` must be a valid stream of the device's primary context (or
    /// null for the legacy default stream) and outlive the backend.
    pub unsafe fn with_stream(ordinal: usize, stream: *mut c_void) -> Result<Self> {
        Self::init(ordinal, stream as dsys::CUstream)
    }

    /// A backend that needs no GPU and no CUDA library: it runs the
    /// backend's code and records every launch, library call, copy and
    /// host wait it would issue ([`CudaBackend::take_plan`]) instead of
    /// issuing it. Its buffers hold no data.
    pub fn planner() -> Self {
        CudaBackend {
            exec: Exec::Plan(plan::Recorder::new()),
            device: "planner (no device)".into(),
            arch: "none".into(),
        }
    }

    /// Whether this is a [`CudaBackend::planner`].
    pub fn is_planner(&self) -> bool {
        matches!(self.exec, Exec::Plan(_))
    }

    /// The calls recorded since the last call (empty on a device).
    pub fn take_plan(&self) -> Vec<plan::Launch> {
        match &self.exec {
            Exec::Plan(r) => r.take(),
            Exec::Device(_) => Vec::new(),
        }
    }

    fn init(ordinal: usize, stream: dsys::CUstream) -> Result<Self> {
        probe::probe_all()?;
        let unavailable = |what: &str, e: drv::DriverError| {
            Error::BackendUnavailable(format!("CUDA {what}: {e}"))
        };
        drv::init().map_err(|e| unavailable("driver initialisation failed", e))?;
        let count = drv::device::get_count().map_err(|e| unavailable("device count", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::BackendUnavailable(format!(
                "no CUDA device {ordinal}: the driver sees {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable("context", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| unavailable("compute capability", e))?;
        let arch = format!("sm_{major}{minor}");
        let device = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        ctx.bind_to_thread()
            .map_err(|e| unavailable("context binding", e))?;
        let kernels = kernels::Loaded::load(&arch)?;
        let libs = libs::Libs::new(stream)?;
        tracing::info!(device = %device, arch = %arch, "CUDA backend ready");
        Ok(CudaBackend {
            exec: Exec::Device(Device {
                ctx,
                stream: Stream(stream),
                kernels,
                tables: Mutex::new(tables::Cache::default()),
                libs: Mutex::new(libs),
            }),
            device,
            arch,
        })
    }

    /// The architecture the kernels were compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.device
    }

    /// The stream all work is queued on (null: the legacy default stream,
    /// or a planner).
    pub fn stream(&self) -> *mut c_void {
        match &self.exec {
            Exec::Device(d) => d.stream.0 as *mut c_void,
            Exec::Plan(_) => std::ptr::null_mut(),
        }
    }

    /// The device's ordinal (in this process's view; 0 for a planner).
    pub fn ordinal(&self) -> usize {
        match &self.exec {
            Exec::Device(d) => d.ctx.ordinal(),
            Exec::Plan(_) => 0,
        }
    }

    /// Makes the backend's context (the device's primary context) current
    /// on the calling thread, as every backend call does first; for code
    /// that queues its own work on [`CudaBackend::stream`] (NCCL).
    pub fn make_current(&self) -> Result<()> {
        self.bind()
    }

    /// Free and total memory of the device, in bytes (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.device()?;
        self.bind()?;
        drv::mem_get_info().map_err(|e| Error::backend("memory info", e))
    }

    fn bind(&self) -> Result<()> {
        match &self.exec {
            Exec::Device(d) => d
                .ctx
                .bind_to_thread()
                .map_err(|e| Error::backend("bind context", e)),
            Exec::Plan(_) => Ok(()),
        }
    }

    /// The device, or the error of an operation a planner cannot run.
    fn device(&self) -> Result<&Device> {
        match &self.exec {
            Exec::Device(d) => Ok(d),
            Exec::Plan(_) => Err(Error::backend(
                "cuda",
                "a planner has no device (this operation needs one)",
            )),
        }
    }

    /// Records `call` on a planner (true), or says the call is to be made
    /// (false).
    fn planned(&self, call: plan::Call, flops: f64) -> bool {
        self.planned_products(call, flops, 0)
    }

    /// [`CudaBackend::planned`] for a GEMM of `products` matrix products.
    fn planned_products(&self, call: plan::Call, flops: f64, products: usize) -> bool {
        match &self.exec {
            Exec::Plan(r) => {
                r.record(call, flops, products);
                true
            }
            Exec::Device(_) => false,
        }
    }

    /// Launches kernel `k` (its `dtype` entry point) with `grid` blocks of
    /// [`kernels::THREADS`] threads on the backend's stream.
    fn launch(&self, k: Kernel, dtype: DType, grid: u32, args: &mut Args) -> Result<()> {
        if grid == 0 || self.planned(plan::Call::Kernel(k), 0.0) {
            return Ok(());
        }
        let d = self.device()?;
        kernels::launch_raw(d.kernels.get(k, dtype), grid, d.stream.0, args, k)
    }

    /// `bytes` bytes from `src` to `dst`, both device memory, on the stream.
    fn copy_device(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 || self.planned(plan::Call::DeviceCopy, 0.0) {
            return Ok(());
        }
        let d = self.device()?;
        // SAFETY: the callers pass device ranges of at least `bytes` bytes.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, d.stream.0) }
            .map_err(|e| Error::backend("copy", e))
    }

    fn libs(&self) -> Result<std::sync::MutexGuard<'_, libs::Libs>> {
        Ok(self
            .device()?
            .libs
            .lock()
            .unwrap_or_else(|e| e.into_inner()))
    }

    /// The device address of `words`, uploaded once and kept (see
    /// [`tables`]).
    fn device_table(&self, words: Vec<u64>) -> Result<u64> {
        match &self.exec {
            Exec::Plan(r) => Ok(r.table(words)),
            Exec::Device(d) => d
                .tables
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(words, d.stream.0),
        }
    }
}

/// Runs of consecutive selected indices: `(first, len)`, ascending.
pub(crate) fn runs(select: Selection<'_>, count: usize) -> Vec<(usize, usize)> {
    let Some(sel) = select else {
        return if count == 0 {
            Vec::new()
        } else {
            vec![(0, count)]
        };
    };
    let mut idx: Vec<usize> = sel.iter().map(|&i| i as usize).collect();
    idx.sort_unstable();
    idx.dedup();
    let mut out: Vec<(usize, usize)> = Vec::new();
    for i in idx {
        match out.last_mut() {
            Some((s, l)) if *s + *l == i => *l += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// The runs of `0..count` that a selection leaves out.
pub(crate) fn complement(runs: &[(usize, usize)], count: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(s, l) in runs {
        if s > pos {
            out.push((pos, s - pos));
        }
        pos = s + l;
    }
    if pos < count {
        out.push((pos, count - pos));
    }
    out
}

/// Device address of element `i` of a view.
pub(crate) fn at(ptr: u64, dtype: DType, i: usize) -> u64 {
    ptr + (i * dtype.size()) as u64
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    type View<'a> = CudaView<'a>;
    type ViewMut<'a> = CudaViewMut<'a>;
    type BlockTable = CudaBlockTable;

    fn name(&self) -> String {
        format!("cuda ({}, {})", self.device, self.arch)
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuffer> {
        let bytes = len * dtype.size();
        let d = match &self.exec {
            Exec::Plan(r) => {
                return Ok(CudaBuffer {
                    ptr: if bytes == 0 { 0 } else { r.alloc(bytes) },
                    len,
                    dtype,
                    ctx: None,
                });
            }
            Exec::Device(d) => d,
        };
        self.bind()?;
        let ptr = if bytes == 0 {
            0
        } else {
            // SAFETY: a plain device allocation, zeroed below before use.
            let p = unsafe { drv::malloc_sync(bytes) }.map_err(|e| {
                Error::backend(
                    "alloc",
                    format!("{len} {dtype} elements ({bytes} bytes): {e}"),
                )
            })?;
            // Zeroed on the backend's stream (not the legacy default
            // stream), so that it is ordered with the work that uses it.
            // SAFETY: `p` is a fresh allocation of `bytes` bytes; the
            // stream belongs to this backend's context, current here.
            unsafe { drv::memset_d8_async(p, 0, bytes, d.stream.0) }
                .map_err(|e| Error::backend("alloc", e))?;
            p
        };
        Ok(CudaBuffer {
            ptr,
            len,
            dtype,
            ctx: Some(d.ctx.clone()),
        })
    }

    fn view<'a>(&self, buf: &'a CudaBuffer) -> CudaView<'a> {
        CudaView {
            ptr: buf.ptr,
            len: buf.len,
            dtype: buf.dtype,
            _life: PhantomData,
        }
    }

    fn view_mut<'a>(&self, buf: &'a mut CudaBuffer) -> CudaViewMut<'a> {
        CudaViewMut {
            ptr: buf.ptr,
            len: buf.len,
            dtype: buf.dtype,
            _life: PhantomData,
        }
    }

    fn shorten<'b, 'a: 'b>(v: CudaView<'a>) -> CudaView<'b> {
        v
    }

    fn as_view<'b>(&self, v: &'b CudaViewMut<'_>) -> CudaView<'b> {
        CudaView {
            ptr: v.ptr,
            len: v.len,
            dtype: v.dtype,
            _life: PhantomData,
        }
    }

    fn reborrow<'b>(&self, v: &'b mut CudaViewMut<'_>) -> CudaViewMut<'b> {
        CudaViewMut {
            ptr: v.ptr,
            len: v.len,
            dtype: v.dtype,
            _life: PhantomData,
        }
    }

    fn upload(&self, dst: CudaViewMut<'_>, src: HostView<'_>) -> Result<()> {
        if dst.dtype != src.dtype() || dst.len != src.len() {
            return Err(Error::backend(
                "upload",
                format!(
                    "{} {} elements into {} {}",
                    src.len(),
                    src.dtype(),
                    dst.len,
                    dst.dtype
                ),
            ));
        }
        if dst.len == 0 {
            return Ok(());
        }
        if self.planned(plan::Call::Upload, 0.0) {
            return self.synchronize();
        }
        let stream = self.device()?.stream.0;
        self.bind()?;
        // SAFETY: `dst` holds `len` elements of the same dtype (checked);
        // the stream is synchronised before the host memory can go away.
        unsafe {
            match src {
                HostView::F32(s) => drv::memcpy_htod_async(dst.ptr, s, stream),
                HostView::F64(s) => drv::memcpy_htod_async(dst.ptr, s, stream),
            }
        }
        .map_err(|e| Error::backend("upload", e))?;
        self.synchronize()
    }

    fn download(&self, src: CudaView<'_>, dst: HostViewMut<'_>) -> Result<()> {
        self.download_all(vec![(src, dst)])
    }

    fn download_all<'a>(&self, pairs: Vec<(CudaView<'a>, HostViewMut<'a>)>) -> Result<()> {
        for (src, dst) in &pairs {
            if dst.dtype() != src.dtype || dst.len() != src.len {
                return Err(Error::backend(
                    "download",
                    format!(
                        "{} {} elements into {} {}",
                        src.len,
                        src.dtype,
                        dst.len(),
                        dst.dtype()
                    ),
                ));
            }
        }
        if pairs.iter().all(|(src, _)| src.len == 0) {
            return Ok(());
        }
        if let Exec::Plan(_) = &self.exec {
            // A planner reads back ones: flags say "finite", counts "one".
            for (src, dst) in pairs {
                if src.len > 0 {
                    self.planned(plan::Call::Download, 0.0);
                    match dst {
                        HostViewMut::F32(d) => d.fill(1.0),
                        HostViewMut::F64(d) => d.fill(1.0),
                    }
                }
            }
            return self.synchronize();
        }
        let stream = self.device()?.stream.0;
        self.bind()?;
        for (src, dst) in pairs {
            if src.len == 0 {
                continue;
            }
            // SAFETY: sizes and dtypes checked above; the stream is
            // synchronised below, before any host buffer is handed back.
            unsafe {
                match dst {
                    HostViewMut::F32(d) => drv::memcpy_dtoh_async(d, src.ptr, stream),
                    HostViewMut::F64(d) => drv::memcpy_dtoh_async(d, src.ptr, stream),
                }
            }
            .map_err(|e| Error::backend("download", e))?;
        }
        self.synchronize()
    }

    fn synchronize(&self) -> Result<()> {
        if self.planned(plan::Call::HostWait, 0.0) {
            return Ok(());
        }
        let stream = self.device()?.stream.0;
        self.bind()?;
        // SAFETY: the stream is valid for the backend's life.
        unsafe { drv::stream::synchronize(stream) }.map_err(|e| Error::backend("synchronize", e))
    }

    fn phase(&self, name: &'static str) {
        if let Exec::Plan(r) = &self.exec {
            r.set_phase(name);
        }
    }

    fn block_table(&self, entries: Vec<TableEntry>) -> Result<CudaBlockTable> {
        CudaBlockTable::new(entries)
    }

    fn gather(&self, jobs: &mut [GatherJob<'_, '_, Self>]) -> Result<()> {
        self.bind()?;
        ops::gather(self, jobs)
    }

    fn scatter(&self, jobs: &mut [ScatterJob<'_, Self>]) -> Result<()> {
        self.bind()?;
        ops::scatter(self, jobs)
    }

    fn mode_gram(&self, jobs: &mut [GramJob<'_, Self>]) -> Result<()> {
        self.bind()?;
        blas::mode_gram(self, jobs)
    }

    fn mode_product(&self, jobs: &mut [ModeProductJob<'_, Self>]) -> Result<()> {
        self.bind()?;
        blas::mode_product(self, jobs)
    }

    fn matmul(&self, jobs: &mut [MatmulJob<'_, Self>]) -> Result<()> {
        self.bind()?;
        blas::matmul(self, jobs)
    }

    fn eigh(&self, jobs: &mut [EighJob<'_, Self>]) -> Result<()> {
        self.bind()?;
        eigh::eigh(self, jobs)
    }

    fn map(&self, jobs: &mut [Map<'_, Self>]) -> Result<()> {
        self.bind()?;
        ops::map(self, jobs)
    }

    fn reduce(&self, jobs: &mut [ReduceJob<'_, Self>]) -> Result<()> {
        self.bind()?;
        ops::reduce(self, jobs)
    }

    fn wire(&self, jobs: &mut [WireJob<'_, Self>]) -> Result<()> {
        self.bind()?;
        wire::wire(self, jobs)
    }

    fn qr(&self, jobs: &mut [QrJob<'_, Self>]) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        Err(Error::backend(
            "qr",
            "the QR eigendecomposition is not implemented on the CUDA backend yet",
        ))
    }

    fn orthogonalize(&self, jobs: &mut [OrthogonalizeJob<'_, Self>]) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        Err(Error::backend(
            "orthogonalize",
            "spectral descent by SVD is not implemented on the CUDA backend yet",
        ))
    }

    fn supports(&self, op: Op) -> bool {
        implements(op)
    }
}

/// What the CUDA backend implements of the optional operations: everything
/// but the QR factorization, the SVD and the two pieces of the adaptive and
/// QR eigendecompositions (the off-diagonal ratio and the eigenpairs of a
/// rotated factor).
pub fn implements(op: Op) -> bool {
    match op {
        Op::EigenRules
        | Op::CoupledInit
        | Op::FilterOptions
        | Op::EigenvalueOptions
        | Op::TraceReductions
        | Op::RidgeMaps
        | Op::DirectionMaps
        | Op::AveragingMaps => true,
        Op::Qr | Op::Orthogonalize | Op::OffDiagonalRatio | Op::Eigenpairs => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{complement, runs};

    #[test]
    fn selections_become_sorted_runs_and_their_complement() {
        assert_eq!(runs(None, 5), vec![(0, 5)]);
        assert_eq!(runs(None, 0), vec![]);
        assert_eq!(
            runs(Some(&[4, 1, 2, 7, 2]), 9),
            vec![(1, 2), (4, 1), (7, 1)]
        );
        assert_eq!(
            complement(&[(1, 2), (4, 1), (7, 1)], 9),
            vec![(0, 1), (3, 1), (5, 2), (8, 1)]
        );
        assert_eq!(complement(&[(0, 3)], 3), vec![]);
    }
}
