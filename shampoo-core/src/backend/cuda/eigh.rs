//! Batched symmetric eigendecomposition with cuSOLVER.
//!
//! Row-major storage read column-major is the transpose, so the row-major
//! lower triangle the trait defines is cuSOLVER's column-major *upper*
//! triangle; cuSOLVER writes eigenvectors column-major (what the trait asks
//! for) and eigenvalues ascending.
//!
//! Status semantics follow the CPU backend (`backend/cpu/eigh.rs`): a matrix
//! whose lower triangle holds NaN or Inf is `Failed` without being solved;
//! a float32 failure is retried in float64 (`RetriedF64` when that
//! succeeds); a float64 failure is `Failed`. A failed matrix is left as it
//! was given. The statuses are host memory, so this is the one primitive
//! that waits for the device (it runs in amortized steps only).
//!
//! `cusolverDnXsyevBatched` solves a whole run of matrices in one call when
//! the library has it (CUDA 12.6.2 and later) and accepts the size: a run is
//! split into chunks of at most 2^31 - 1 matrix elements (the documented
//! limit `n * lda * batchSize <= INT32_MAX`, [`chunk_len`]); else (or when it returns an
//! error status, logged at warn level) each matrix is solved with
//! `cusolverDnXsyevd`.
//!
//! On a planner ([`super::CudaBackend::planner`]) the calls of a run are
//! recorded as the batched path would issue them and every status is `Ok`.

use std::ffi::c_void;

use cudarc::cusolver::sys as ssys;
use cudarc::driver::result as drv;

use super::kernels::{Args, Kernel, grid_for, grid_matrices};
use super::libs::solver_ok;
use super::scratch::Scratch;
use super::{CudaBackend, at, plan, runs};
use crate::backend::checks::{check_len, check_select};
use crate::backend::{EighJob, EighStatus, ViewMutOps};
use crate::{DType, Error, Result};

const OP: &str = "eigh";

fn data_type(dt: DType) -> ssys::cudaDataType {
    match dt {
        DType::F32 => ssys::cudaDataType::CUDA_R_32F,
        DType::F64 => ssys::cudaDataType::CUDA_R_64F,
    }
}

/// Whether the loaded cuSOLVER exports the batched solver.
fn has_batched() -> bool {
    // SAFETY: the library was probed and loaded before the backend was
    // built; looking a symbol up has no side effects.
    unsafe {
        ssys::culib()
            .get::<unsafe extern "C" fn()>(b"cusolverDnXsyevBatched\0")
            .is_ok()
    }
}

/// Matrices of `n x n` per `cusolverDnXsyevBatched` call: the most that
/// keep `n * lda * batchSize <= INT32_MAX` (its documented limit), and at
/// least one.
fn chunk_len(n: usize) -> usize {
    (i32::MAX as usize / (n * n).max(1)).max(1)
}

const JOBZ: ssys::cusolverEigMode_t = ssys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
const UPLO: ssys::cublasFillMode_t = ssys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER;

/// Solves `batch` matrices of `n` at `a` (values at `w`, infos at `info`),
/// in one batched call when possible, else one by one.
#[allow(clippy::too_many_arguments)]
fn solve(
    be: &CudaBackend,
    scratch: &mut Scratch,
    solver: ssys::cusolverDnHandle_t,
    params: ssys::cusolverDnParams_t,
    dt: DType,
    n: usize,
    batch: usize,
    a: u64,
    w: u64,
    info: u64,
    backup: u64,
) -> Result<()> {
    let t = data_type(dt);
    let ni = n as i64;
    let chunk = chunk_len(n);
    if batch > chunk {
        for first in (0..batch).step_by(chunk) {
            let len = chunk.min(batch - first);
            let (o, ov) = (first * n * n, first * n);
            solve(
                be,
                scratch,
                solver,
                params,
                dt,
                n,
                len,
                at(a, dt, o),
                at(w, dt, ov),
                info + 4 * first as u64,
                at(backup, dt, o),
            )?;
        }
        return Ok(());
    }
    if batch > 1 && has_batched() {
        let (mut dev, mut host) = (0usize, 0usize);
        // SAFETY: a size query on valid handles; no memory is touched.
        let s = unsafe {
            ssys::cusolverDnXsyevBatched_bufferSize(
                solver,
                params,
                JOBZ,
                UPLO,
                ni,
                t,
                a as *const c_void,
                ni,
                t,
                w as *const c_void,
                t,
                &mut dev,
                &mut host,
                batch as i64,
            )
        };
        if s == ssys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
            let work = scratch.work.ensure(dev.max(1))?;
            if scratch.host.len() < host {
                scratch.host.resize(host, 0);
            }
            // SAFETY: `a` holds `batch` column-major n x n matrices, `w`
            // batch x n values, `info` batch ints (checked by the caller);
            // the workspaces have the sizes the library asked for.
            let s = unsafe {
                ssys::cusolverDnXsyevBatched(
                    solver,
                    params,
                    JOBZ,
                    UPLO,
                    ni,
                    t,
                    a as *mut c_void,
                    ni,
                    t,
                    w as *mut c_void,
                    t,
                    work as *mut c_void,
                    dev,
                    scratch.host.as_mut_ptr() as *mut c_void,
                    host,
                    info as *mut i32,
                    batch as i64,
                )
            };
            if s == ssys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
                return Ok(());
            }
            tracing::warn!(
                ?s,
                n,
                batch,
                "batched eigensolver refused; solving one by one (slower)"
            );
            // It may have written before refusing: start again from the
            // input.
            be.copy_device(a, backup, batch * n * n * dt.size())?;
        }
    }
    let (mut dev, mut host) = (0usize, 0usize);
    // SAFETY: a size query.
    let s = unsafe {
        ssys::cusolverDnXsyevd_bufferSize(
            solver,
            params,
            JOBZ,
            UPLO,
            ni,
            t,
            a as *const c_void,
            ni,
            t,
            w as *const c_void,
            t,
            &mut dev,
            &mut host,
        )
    };
    solver_ok("cusolverDnXsyevd_bufferSize", s)?;
    let work = scratch.work.ensure(dev.max(1))?;
    if scratch.host.len() < host {
        scratch.host.resize(host, 0);
    }
    for j in 0..batch {
        // SAFETY: as above, for matrix j alone.
        let s = unsafe {
            ssys::cusolverDnXsyevd(
                solver,
                params,
                JOBZ,
                UPLO,
                ni,
                t,
                at(a, dt, j * n * n) as *mut c_void,
                ni,
                t,
                at(w, dt, j * n) as *mut c_void,
                t,
                work as *mut c_void,
                dev,
                scratch.host.as_mut_ptr() as *mut c_void,
                host,
                (info + 4 * j as u64) as *mut i32,
            )
        };
        solver_ok("cusolverDnXsyevd", s)?;
    }
    Ok(())
}

fn cast(be: &CudaBackend, kernel: Kernel, dst: u64, src: u64, n: usize) -> Result<()> {
    be.launch(
        kernel,
        DType::F32,
        grid_for(n),
        Args::new().u(dst).u(src).u(n as u64),
    )
}

/// What [`eigh`] issues for a run of `l` matrices, recorded on a planner:
/// the finiteness check, the input copy, the batched solver (chunked), the
/// two read-backs and the wait; every status `Ok`.
fn plan_eigh(be: &CudaBackend, jobs: &mut [EighJob<'_, CudaBackend>]) -> Result<()> {
    for job in jobs.iter_mut() {
        check_select(OP, job.select, job.count)?;
        check_len(OP, "status", job.status.len(), job.count, 1)?;
        for (s, l) in runs(job.select, job.count) {
            be.launch(
                Kernel::AllFinite,
                job.a.dtype(),
                grid_matrices(l),
                &mut Args::new(),
            )?;
            be.copy_device(0, 0, 1)?;
            let chunk = chunk_len(job.n);
            for _ in (0..l).step_by(chunk) {
                be.planned(plan::Call::Solver("cusolverDnXsyevBatched"), 0.0);
            }
            be.planned(plan::Call::Download, 0.0);
            be.planned(plan::Call::Download, 0.0);
            be.planned(plan::Call::HostWait, 0.0);
            job.status[s..s + l].fill(EighStatus::Ok);
        }
    }
    Ok(())
}

pub(super) fn eigh(be: &CudaBackend, jobs: &mut [EighJob<'_, CudaBackend>]) -> Result<()> {
    if be.is_planner() {
        return plan_eigh(be, jobs);
    }
    let stream = be.device()?.stream.0;
    let mut guard = be.libs()?;
    let libs = &mut *guard;
    let (solver, params) = (libs.solver, libs.params);
    let scratch = &mut libs.scratch;
    for job in jobs.iter_mut() {
        let (n, count) = (job.n, job.count);
        if n == 0 {
            continue;
        }
        check_select(OP, job.select, count)?;
        let dt = job.a.dtype();
        crate::backend::checks::same_dtype(OP, dt, &[("values", job.values.dtype())])?;
        check_len(OP, "matrices", job.a.len(), count, n * n)?;
        check_len(OP, "values", job.values.len(), count, n)?;
        check_len(OP, "status", job.status.len(), count, 1)?;
        let (nn, sz) = (n * n, dt.size());
        for (s, l) in runs(job.select, count) {
            let a = at(job.a.ptr, dt, s * nn);
            let w = at(job.values.ptr, dt, s * n);
            let backup = scratch.backup.ensure(l * nn * sz)?;
            let flags = scratch.flags.ensure(l * sz)?;
            let info = scratch.info.ensure(l * 4)?;
            // Finite check of the lower triangles, and a copy of the input
            // (restored into failed matrices, source of the float64 retry).
            be.launch(
                Kernel::AllFinite,
                dt,
                grid_matrices(l),
                Args::new()
                    .u(a)
                    .u(flags)
                    .u(nn as u64)
                    .u(n as u64)
                    .u(1)
                    .u(l as u64),
            )?;
            be.copy_device(backup, a, l * nn * sz)?;
            solve(be, scratch, solver, params, dt, n, l, a, w, info, backup)?;
            let mut infos = vec![0i32; l];
            let mut finite = vec![0u8; l * sz];
            // SAFETY: `info` holds `l` ints and `flags` `l` elements; the
            // stream is synchronised before the host buffers are read.
            unsafe {
                drv::memcpy_dtoh_async(&mut infos, info, stream)
                    .and_then(|_| drv::memcpy_dtoh_async(&mut finite, flags, stream))
                    .and_then(|_| drv::stream::synchronize(stream))
            }
            .map_err(|e| Error::backend(OP, e))?;
            let is_finite = |j: usize| match dt {
                DType::F32 => {
                    f32::from_ne_bytes(finite[4 * j..4 * j + 4].try_into().unwrap()) != 0.0
                }
                DType::F64 => {
                    f64::from_ne_bytes(finite[8 * j..8 * j + 8].try_into().unwrap()) != 0.0
                }
            };
            for (j, &info_j) in infos.iter().enumerate() {
                let st = &mut job.status[s + j];
                let (aj, bj) = (at(a, dt, j * nn), at(backup, dt, j * nn));
                if !is_finite(j) {
                    *st = EighStatus::Failed;
                    be.copy_device(aj, bj, nn * sz)?;
                } else if info_j == 0 {
                    *st = EighStatus::Ok;
                } else if dt == DType::F64 {
                    *st = EighStatus::Failed;
                    be.copy_device(aj, bj, nn * sz)?;
                } else {
                    *st = retry_f64(be, scratch, solver, params, n, aj, at(w, dt, j * n), bj)?;
                }
            }
        }
    }
    // The restores and retries queued above complete before the backup
    // can be overwritten by a later call (same stream).
    Ok(())
}

/// Solves one float32 matrix (input copy at `src`) in float64 and writes the
/// result back rounded to float32 (`RetriedF64`), or restores the input
/// (`Failed`).
#[allow(clippy::too_many_arguments)]
fn retry_f64(
    be: &CudaBackend,
    scratch: &mut Scratch,
    solver: ssys::cusolverDnHandle_t,
    params: ssys::cusolverDnParams_t,
    n: usize,
    a: u64,
    w: u64,
    src: u64,
) -> Result<EighStatus> {
    let nn = n * n;
    // float64 matrix, float64 values, one info.
    let base = scratch.retry.ensure(8 * (nn + n) + 8)?;
    let (a64, w64, info) = (base, base + 8 * nn as u64, base + 8 * (nn + n) as u64);
    cast(be, Kernel::CastF32F64, a64, src, nn)?;
    solve(
        be,
        scratch,
        solver,
        params,
        DType::F64,
        n,
        1,
        a64,
        w64,
        info,
        a64,
    )?;
    let mut ok = [0i32; 1];
    let stream = be.device()?.stream.0;
    // SAFETY: `info` is one int of the retry scratch; synchronised below.
    unsafe {
        drv::memcpy_dtoh_async(&mut ok, info, stream).and_then(|_| drv::stream::synchronize(stream))
    }
    .map_err(|e| Error::backend(OP, e))?;
    if ok[0] == 0 {
        cast(be, Kernel::CastF64F32, a, a64, nn)?;
        cast(be, Kernel::CastF64F32, w, w64, n)?;
        Ok(EighStatus::RetriedF64)
    } else {
        be.copy_device(a, src, nn * 4)?;
        Ok(EighStatus::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_len;

    #[test]
    fn batched_solver_chunks_stay_under_the_documented_limit() {
        for n in [1usize, 2, 32, 64, 1000, 1024, 4096, 46_341] {
            let c = chunk_len(n);
            assert!(c >= 1);
            assert!(n * n * c <= i32::MAX as usize || c == 1, "n {n}: {c}");
            assert!(
                n * n * (c + 1) > i32::MAX as usize,
                "n {n}: {c} is not the most"
            );
        }
        assert_eq!(chunk_len(1024), 2047);
    }
}
