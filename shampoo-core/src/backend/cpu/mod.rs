//! The CPU backend: faer for matrix products and eigendecompositions, rayon
//! across blocks.
//!
//! Every primitive call turns its jobs into one task per block (or per
//! matrix), orders the tasks by cost (longest first, a greedy
//! longest-processing-time schedule) and runs them on the backend's own
//! thread pool. Inside a task, faer runs sequentially: a block's result never
//! depends on the number of threads or on the other blocks, which is what
//! makes results bitwise reproducible across thread and rank counts.

mod copy;
mod eigh;
mod kernels;
mod linalg;
mod map;
mod qr;
mod reduce;
mod svd;
pub(crate) mod wire;

use crate::backend::{
    Backend, EighJob, GatherJob, GramJob, Map, MatmulJob, ModeProductJob, Op, OrthogonalizeJob,
    QrJob, ReduceJob, ScatterJob, TableEntry, ViewMutOps, ViewOps, WireJob,
};
use crate::{DType, Error, Float, HostView, HostViewMut, Result};

pub use copy::CpuBlockTable;

/// Owned host memory of one dtype.
#[derive(Debug, Clone)]
pub enum CpuBuffer {
    /// `f32` elements.
    F32(Vec<f32>),
    /// `f64` elements.
    F64(Vec<f64>),
}

/// The CPU backend.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl CpuBackend {
    /// A backend with its own pool of `threads` threads (0: one per core, or
    /// `SHAMPOO_THREADS` / `RAYON_NUM_THREADS` when set).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            ["SHAMPOO_THREADS", "RAYON_NUM_THREADS"]
                .iter()
                .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                })
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("shampoo-cpu-{i}"))
            .build()
            .map_err(|e| {
                Error::BackendUnavailable(format!("cannot start {threads} CPU threads: {e}"))
            })?;
        Ok(CpuBackend { pool, threads })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs typed tasks longest-first on the pool.
    pub(crate) fn run<T: Send, U: Send>(
        &self,
        mut a: Vec<(u64, T)>,
        fa: impl Fn(T) + Sync,
        mut b: Vec<(u64, U)>,
        fb: impl Fn(U) + Sync,
    ) {
        use rayon::prelude::*;
        a.sort_by_key(|x| std::cmp::Reverse(x.0));
        b.sort_by_key(|x| std::cmp::Reverse(x.0));
        let serial = self.threads == 1 || a.len() + b.len() <= 1;
        if serial {
            a.into_iter().for_each(|(_, t)| fa(t));
            b.into_iter().for_each(|(_, t)| fb(t));
            return;
        }
        self.pool.install(|| {
            rayon::join(
                || a.into_par_iter().with_max_len(1).for_each(|(_, t)| fa(t)),
                || b.into_par_iter().with_max_len(1).for_each(|(_, t)| fb(t)),
            );
        });
    }
}

impl ViewOps for HostView<'_> {
    fn dtype(&self) -> DType {
        HostView::dtype(self)
    }
    fn len(&self) -> usize {
        HostView::len(self)
    }
    fn slice(self, start: usize, len: usize) -> Self {
        HostView::slice(self, start, len)
    }
}

impl ViewMutOps for HostViewMut<'_> {
    fn dtype(&self) -> DType {
        HostViewMut::dtype(self)
    }
    fn len(&self) -> usize {
        HostViewMut::len(self)
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        HostViewMut::split_at(self, mid)
    }
}

/// Typed access to a view, or an error naming the operation.
pub(crate) fn typed<'a, T: Float>(v: HostView<'a>, op: &'static str) -> Result<&'a [T]> {
    let dt = v.dtype();
    v.typed::<T>()
        .ok_or_else(|| Error::backend(op, format!("expected {} data, got {dt}", T::DTYPE)))
}

/// Typed mutable access to a view, or an error naming the operation.
pub(crate) fn typed_mut<'a, T: Float>(v: HostViewMut<'a>, op: &'static str) -> Result<&'a mut [T]> {
    let dt = v.dtype();
    v.typed::<T>()
        .ok_or_else(|| Error::backend(op, format!("expected {} data, got {dt}", T::DTYPE)))
}

use crate::backend::checks::{check_len, check_select};

/// Splits `data` into `count` chunks of `per` and keeps the selected ones,
/// with their index.
pub(crate) fn chunks<'a, T>(
    data: &'a mut [T],
    per: usize,
    select: Option<&[u32]>,
) -> impl Iterator<Item = (usize, &'a mut [T])> {
    let mut keep: Option<Vec<bool>> = None;
    if let Some(s) = select {
        let count = data.len().checked_div(per).unwrap_or(0);
        let mut k = vec![false; count];
        for &i in s {
            k[i as usize] = true;
        }
        keep = Some(k);
    }
    data.chunks_mut(per.max(1))
        .enumerate()
        .filter(move |(i, _)| keep.as_ref().is_none_or(|k| k[*i]))
}

/// `vec![0.0; len]`, but an allocation failure is an error instead of an
/// abort (a configuration that asks for terabytes of factors).
fn zeroed_vec<T: crate::Float>(len: usize) -> Result<Vec<T>> {
    let too_large = || {
        Error::backend(
            "alloc",
            format!(
                "cannot allocate {} ({len} elements)",
                crate::memory::human_bytes((len as u64).saturating_mul(size_of::<T>() as u64))
            ),
        )
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| too_large())?;
    // SAFETY: `layout` has a non-zero size (len > 0 and T is f32 or f64).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(too_large());
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of
    // `len` values of `T`, and all-zero bytes are the valid value 0.0.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;
    type View<'a> = HostView<'a>;
    type ViewMut<'a> = HostViewMut<'a>;
    type BlockTable = CpuBlockTable;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CpuBuffer> {
        Ok(match dtype {
            DType::F32 => CpuBuffer::F32(zeroed_vec(len)?),
            DType::F64 => CpuBuffer::F64(zeroed_vec(len)?),
        })
    }

    fn view<'a>(&self, buf: &'a CpuBuffer) -> HostView<'a> {
        match buf {
            CpuBuffer::F32(v) => HostView::F32(v),
            CpuBuffer::F64(v) => HostView::F64(v),
        }
    }

    fn view_mut<'a>(&self, buf: &'a mut CpuBuffer) -> HostViewMut<'a> {
        match buf {
            CpuBuffer::F32(v) => HostViewMut::F32(v),
            CpuBuffer::F64(v) => HostViewMut::F64(v),
        }
    }

    fn shorten<'b, 'a: 'b>(v: HostView<'a>) -> HostView<'b> {
        v
    }

    fn as_view<'b>(&self, v: &'b HostViewMut<'_>) -> HostView<'b> {
        v.as_view()
    }

    fn reborrow<'b>(&self, v: &'b mut HostViewMut<'_>) -> HostViewMut<'b> {
        v.reborrow()
    }

    fn upload(&self, dst: HostViewMut<'_>, src: HostView<'_>) -> Result<()> {
        match (dst, src) {
            (HostViewMut::F32(d), HostView::F32(s)) if d.len() == s.len() => d.copy_from_slice(s),
            (HostViewMut::F64(d), HostView::F64(s)) if d.len() == s.len() => d.copy_from_slice(s),
            (d, s) => {
                return Err(Error::backend(
                    "upload",
                    format!(
                        "{} {} elements into {} {}",
                        s.len(),
                        s.dtype(),
                        d.len(),
                        d.dtype()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn download(&self, src: HostView<'_>, dst: HostViewMut<'_>) -> Result<()> {
        self.upload(dst, src)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn block_table(&self, entries: Vec<TableEntry>) -> Result<CpuBlockTable> {
        CpuBlockTable::new(entries)
    }

    fn gather(&self, jobs: &mut [GatherJob<'_, '_, Self>]) -> Result<()> {
        copy::gather(self, jobs)
    }

    fn scatter(&self, jobs: &mut [ScatterJob<'_, Self>]) -> Result<()> {
        copy::scatter(self, jobs)
    }

    fn mode_gram(&self, jobs: &mut [GramJob<'_, Self>]) -> Result<()> {
        linalg::mode_gram(self, jobs)
    }

    fn mode_product(&self, jobs: &mut [ModeProductJob<'_, Self>]) -> Result<()> {
        linalg::mode_product(self, jobs)
    }

    fn matmul(&self, jobs: &mut [MatmulJob<'_, Self>]) -> Result<()> {
        linalg::matmul(self, jobs)
    }

    fn eigh(&self, jobs: &mut [EighJob<'_, Self>]) -> Result<()> {
        eigh::eigh(self, jobs)
    }

    fn map(&self, jobs: &mut [Map<'_, Self>]) -> Result<()> {
        map::map(self, jobs)
    }

    fn reduce(&self, jobs: &mut [ReduceJob<'_, Self>]) -> Result<()> {
        reduce::reduce(self, jobs)
    }

    fn wire(&self, jobs: &mut [WireJob<'_, Self>]) -> Result<()> {
        wire::wire(self, jobs)
    }

    fn qr(&self, jobs: &mut [QrJob<'_, Self>]) -> Result<()> {
        qr::qr(self, jobs)
    }

    fn orthogonalize(&self, jobs: &mut [OrthogonalizeJob<'_, Self>]) -> Result<()> {
        svd::orthogonalize(self, jobs)
    }

    fn supports(&self, _op: Op) -> bool {
        true
    }
}

/// Moves the views out of a job slice (jobs are consumed by a call).
pub(crate) fn take_mut<'a>(v: &mut HostViewMut<'a>) -> HostViewMut<'a> {
    std::mem::replace(v, HostViewMut::F32(&mut []))
}
