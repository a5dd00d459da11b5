//! cuBLAS: statistics (`mode_gram`), preconditioning (`mode_product`) and
//! the Newton iteration's products (`matmul`), as strided-batched GEMMs
//! over runs of same-shape blocks.
//!
//! cuBLAS is column-major; the backend's matrices are row-major. A
//! row-major `r x c` matrix is the column-major `c x r` matrix of its
//! transpose, with the same leading dimension `c`. Each call below states
//! the column-major product it computes and why that equals the row-major
//! definition in `backend/mod.rs`.

use cudarc::cublas::sys as bsys;
use cudarc::cusolver::sys as ssys;
use cudarc::driver::sys as dsys;

use super::kernels::{Args, grid_for, launch};
use super::{CudaBackend, at, runs, same_dtype};
use crate::backend::cpu::{check_len, check_select};
use crate::backend::{GramJob, MatmulJob, ModeProductJob, ViewMutOps, ViewOps};
use crate::{DType, Error, Result};

/// The library handles of one backend (used under its mutex).
pub(super) struct Libs {
    pub(super) blas: bsys::cublasHandle_t,
    pub(super) solver: ssys::cusolverDnHandle_t,
    pub(super) params: ssys::cusolverDnParams_t,
    /// Scratch of the eigensolver, grown on demand.
    pub(super) scratch: super::eigh::Scratch,
}

// SAFETY: the handles are only used while the backend's mutex is held, so
// never from two threads at once; cuBLAS and cuSOLVER handles may move
// between threads.
unsafe impl Send for Libs {}

impl Libs {
    pub(super) fn new(stream: dsys::CUstream) -> Result<Self> {
        let mut blas = std::ptr::null_mut();
        // SAFETY: plain handle creation; the context is current.
        let s = unsafe { bsys::cublasCreate_v2(&mut blas) };
        blas_ok("cublasCreate", s)?;
        // SAFETY: `blas` was just created; the stream is the backend's.
        let s = unsafe { bsys::cublasSetStream_v2(blas, stream as bsys::cudaStream_t) };
        blas_ok("cublasSetStream", s)?;
        let mut solver = std::ptr::null_mut();
        // SAFETY: as above, for cuSOLVER.
        let s = unsafe { ssys::cusolverDnCreate(&mut solver) };
        solver_ok("cusolverDnCreate", s)?;
        // SAFETY: `solver` was just created.
        let s = unsafe { ssys::cusolverDnSetStream(solver, stream as ssys::cudaStream_t) };
        solver_ok("cusolverDnSetStream", s)?;
        let mut params = std::ptr::null_mut();
        // SAFETY: plain creation.
        let s = unsafe { ssys::cusolverDnCreateParams(&mut params) };
        solver_ok("cusolverDnCreateParams", s)?;
        Ok(Libs {
            blas,
            solver,
            params,
            scratch: super::eigh::Scratch::default(),
        })
    }
}

impl Drop for Libs {
    fn drop(&mut self) {
        // SAFETY: each handle was created once in `new` and is destroyed
        // once here.
        unsafe {
            let _ = ssys::cusolverDnDestroyParams(self.params);
            let _ = ssys::cusolverDnDestroy(self.solver);
            let _ = bsys::cublasDestroy_v2(self.blas);
        }
    }
}

pub(super) fn blas_ok(what: &str, s: bsys::cublasStatus_t) -> Result<()> {
    if s == bsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::backend("cublas", format!("{what}: {s:?}")))
    }
}

pub(super) fn solver_ok(what: &str, s: ssys::cusolverStatus_t) -> Result<()> {
    if s == ssys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::backend("cusolver", format!("{what}: {s:?}")))
    }
}

fn int(op: &'static str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::backend(op, format!("dimension {x} exceeds cuBLAS's int")))
}

/// One strided-batched GEMM, column-major:
/// `C_i = alpha op(A_i) op(B_i) + beta C_i`, `i < batch`.
struct Gemm {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: (u64, usize, usize),
    b: (u64, usize, usize),
    beta: f64,
    c: (u64, usize, usize),
    batch: usize,
}

fn op(t: bool) -> bsys::cublasOperation_t {
    if t {
        bsys::cublasOperation_t::CUBLAS_OP_T
    } else {
        bsys::cublasOperation_t::CUBLAS_OP_N
    }
}

fn set_math(h: bsys::cublasHandle_t, dt: DType, tf32: bool) -> Result<()> {
    let mode = if tf32 && dt == DType::F32 {
        bsys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
    } else {
        bsys::cublasMath_t::CUBLAS_DEFAULT_MATH
    };
    // SAFETY: a valid handle.
    blas_ok("cublasSetMathMode", unsafe {
        bsys::cublasSetMathMode(h, mode)
    })
}

fn gemm(h: bsys::cublasHandle_t, dt: DType, g: &Gemm) -> Result<()> {
    const OP: &str = "gemm";
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let (m, n, k) = (int(OP, g.m)?, int(OP, g.n)?, int(OP, g.k)?);
    let (lda, ldb, ldc) = (int(OP, g.a.1)?, int(OP, g.b.1)?, int(OP, g.c.1)?);
    let batch = int(OP, g.batch)?;
    let (sa, sb, sc) = (g.a.2 as i64, g.b.2 as i64, g.c.2 as i64);
    // SAFETY: the callers checked every operand's length against the
    // extents the GEMM reads and writes (count x matrix size), and the
    // pointers are device addresses of this context.
    let s = unsafe {
        match dt {
            DType::F32 => {
                let (al, be) = (g.alpha as f32, g.beta as f32);
                bsys::cublasSgemmStridedBatched(
                    h,
                    op(g.ta),
                    op(g.tb),
                    m,
                    n,
                    k,
                    &al,
                    g.a.0 as *const f32,
                    lda,
                    sa,
                    g.b.0 as *const f32,
                    ldb,
                    sb,
                    &be,
                    g.c.0 as *mut f32,
                    ldc,
                    sc,
                    batch,
                )
            }
            DType::F64 => bsys::cublasDgemmStridedBatched(
                h,
                op(g.ta),
                op(g.tb),
                m,
                n,
                k,
                &g.alpha,
                g.a.0 as *const f64,
                lda,
                sa,
                g.b.0 as *const f64,
                ldb,
                sb,
                &g.beta,
                g.c.0 as *mut f64,
                ldc,
                sc,
                batch,
            ),
        }
    };
    blas_ok("gemm", s)
}

/// `(A, d, B)` of a shape along `mode`.
fn split_dims(op: &'static str, dims: &[usize], mode: usize) -> Result<(usize, usize, usize)> {
    if mode >= dims.len() {
        return Err(Error::backend(
            op,
            format!("mode {mode} of a tensor of order {}", dims.len()),
        ));
    }
    let a = dims[..mode].iter().product();
    let b = dims[mode + 1..].iter().product();
    Ok((a, dims[mode], b))
}

fn elementwise(be: &CudaBackend, name: &str, dt: DType, n: usize, args: &mut Args) -> Result<()> {
    let f = be.kernel(name, dt)?;
    launch(f, grid_for(n), be.stream.0, args, name)
}

pub(super) fn mode_gram(be: &CudaBackend, jobs: &mut [GramJob<'_, CudaBackend>]) -> Result<()> {
    const OP: &str = "mode_gram";
    for job in jobs.iter_mut() {
        let (a, d, b) = split_dims(OP, job.dims, job.mode)?;
        check_select(OP, job.select, job.count)?;
        let numel = a * d * b;
        let dt = job.out.dtype();
        same_dtype(OP, dt, &[("input", job.input.dtype())])?;
        check_len(OP, "input", job.input.len(), job.count, numel)?;
        check_len(OP, "output", job.out.len(), job.count, d * d)?;
        let libs = be.libs();
        set_math(libs.blas, dt, job.tf32)?;
        for (s, l) in runs(job.select, job.count) {
            let input = at(job.input.ptr, dt, s * numel);
            let out = at(job.out.ptr, dt, s * d * d);
            if job.beta != 0.0 && job.beta != 1.0 {
                // F *= beta, rounded, before accumulating (two roundings).
                elementwise(
                    be,
                    "scale",
                    dt,
                    l * d * d,
                    Args::new().u(out).f(job.beta).u((l * d * d) as u64),
                )?;
            }
            let first_beta = if job.beta == 0.0 { 0.0 } else { 1.0 };
            if b == 1 {
                // The block is a row-major A x d matrix, i.e. the
                // column-major d x A matrix X = T^T (ld d). Gram = X X^T.
                gemm(
                    libs.blas,
                    dt,
                    &Gemm {
                        ta: false,
                        tb: true,
                        m: d,
                        n: d,
                        k: a,
                        alpha: job.alpha,
                        a: (input, d, numel),
                        b: (input, d, numel),
                        beta: first_beta,
                        c: (out, d, d * d),
                        batch: l,
                    },
                )?;
            } else {
                // Slab i is a row-major d x B matrix S_i, i.e. the
                // column-major B x d matrix Y = S_i^T (ld B).
                // Gram += S_i S_i^T = Y^T Y, summed over the A slabs.
                for i in 0..a {
                    gemm(
                        libs.blas,
                        dt,
                        &Gemm {
                            ta: true,
                            tb: false,
                            m: d,
                            n: d,
                            k: b,
                            alpha: job.alpha,
                            a: (at(input, dt, i * d * b), b, numel),
                            b: (at(input, dt, i * d * b), b, numel),
                            beta: if i == 0 { first_beta } else { 1.0 },
                            c: (out, d, d * d),
                            batch: l,
                        },
                    )?;
                }
            }
            // The product is symmetric up to rounding, so the column-major
            // result read row-major is the Gram matrix; its lower triangle
            // is the defined part. Mirror it when the full matrix is wanted.
            if job.full {
                elementwise(
                    be,
                    "symmetrize",
                    dt,
                    l * d * d,
                    Args::new().u(out).u(d as u64).u(l as u64),
                )?;
            }
        }
    }
    Ok(())
}

pub(super) fn mode_product(
    be: &CudaBackend,
    jobs: &mut [ModeProductJob<'_, CudaBackend>],
) -> Result<()> {
    const OP: &str = "mode_product";
    for job in jobs.iter_mut() {
        let (a, d, b) = split_dims(OP, job.dims, job.mode)?;
        check_select(OP, job.select, job.count)?;
        let numel = a * d * b;
        let dt = job.out.dtype();
        same_dtype(
            OP,
            dt,
            &[
                ("input", job.input.dtype()),
                ("matrices", job.matrices.dtype()),
            ],
        )?;
        check_len(OP, "input", job.input.len(), job.count, numel)?;
        check_len(OP, "matrices", job.matrices.len(), job.count, d * d)?;
        check_len(OP, "output", job.out.len(), job.count, numel)?;
        let libs = be.libs();
        set_math(libs.blas, dt, job.tf32)?;
        for (s, l) in runs(job.select, job.count) {
            let input = at(job.input.ptr, dt, s * numel);
            let mats = at(job.matrices.ptr, dt, s * d * d);
            let out = at(job.out.ptr, dt, s * numel);
            // The row-major matrix M read column-major is Mc = M^T.
            if b == 1 {
                // Row-major A x d blocks: out = in M^T (or in M). Column-
                // major, with X = in^T (d x A, ld d): out^T = M X = Mc^T X
                // (or M^T X = Mc X).
                gemm(
                    libs.blas,
                    dt,
                    &Gemm {
                        ta: !job.transpose,
                        tb: false,
                        m: d,
                        n: a,
                        k: d,
                        alpha: 1.0,
                        a: (mats, d, d * d),
                        b: (input, d, numel),
                        beta: 0.0,
                        c: (out, d, numel),
                        batch: l,
                    },
                )?;
            } else {
                // Slab i, row-major d x B: out_i = M S_i. Column-major,
                // Y = S_i^T (B x d, ld B): out_i^T = Y M^T = Y Mc
                // (or Y M = Y Mc^T).
                for i in 0..a {
                    gemm(
                        libs.blas,
                        dt,
                        &Gemm {
                            ta: false,
                            tb: job.transpose,
                            m: b,
                            n: d,
                            k: d,
                            alpha: 1.0,
                            a: (at(input, dt, i * d * b), b, numel),
                            b: (mats, d, d * d),
                            beta: 0.0,
                            c: (at(out, dt, i * d * b), b, numel),
                            batch: l,
                        },
                    )?;
                }
            }
        }
    }
    Ok(())
}

pub(super) fn matmul(be: &CudaBackend, jobs: &mut [MatmulJob<'_, CudaBackend>]) -> Result<()> {
    const OP: &str = "matmul";
    for job in jobs.iter_mut() {
        check_select(OP, job.select, job.count)?;
        let (n, nn) = (job.n, job.n * job.n);
        let dt = job.c.dtype();
        same_dtype(OP, dt, &[("a", job.a.dtype()), ("b", job.b.dtype())])?;
        check_len(OP, "a", job.a.len(), job.count, nn)?;
        check_len(OP, "b", job.b.len(), job.count, nn)?;
        check_len(OP, "c", job.c.len(), job.count, nn)?;
        let libs = be.libs();
        set_math(libs.blas, dt, job.tf32)?;
        for (s, l) in runs(job.select, job.count) {
            // Row-major C = op(A) op(B); column-major (everything read as
            // its transpose): C^T = op(B)^T op(A)^T = op(Bc) op(Ac), with
            // the same transposition flags.
            gemm(
                libs.blas,
                dt,
                &Gemm {
                    ta: job.trans_b,
                    tb: job.trans_a,
                    m: n,
                    n,
                    k: n,
                    alpha: job.alpha,
                    a: (at(job.b.ptr, dt, s * nn), n, nn),
                    b: (at(job.a.ptr, dt, s * nn), n, nn),
                    beta: if job.accumulate { 1.0 } else { 0.0 },
                    c: (at(job.c.ptr, dt, s * nn), n, nn),
                    batch: l,
                },
            )?;
        }
    }
    Ok(())
}
