//! cuBLAS: statistics (`mode_gram`), preconditioning (`mode_product`) and
//! the Newton iteration's products (`matmul`), one batched GEMM per run of
//! same-shape blocks and mode:
//!
//! - a first or last mode is a plain strided-batched GEMM;
//! - a middle mode's statistics move the mode to the front first (one
//!   `swap_axes` launch into scratch), then one GEMM contracts everything
//!   else;
//! - a middle mode's product multiplies every slab of every block by its
//!   block's matrix: one pointer-array batched GEMM, its pointer arrays
//!   uploaded once and reused (every address is fixed after construction);
//! - the statistics' EMA `beta F + alpha C` is the GEMM's own `beta` (one
//!   rounding where the CPU backend rounds twice).
//!
//! cuBLAS is column-major; the backend's matrices are row-major. A
//! row-major `r x c` matrix is the column-major `c x r` matrix of its
//! transpose, with the same leading dimension `c`. Each call below states
//! the column-major product it computes and why that equals the row-major
//! definition in `backend/mod.rs`.

use cudarc::cublas::sys as bsys;

use super::kernels::{Args, Kernel, grid_for};
use super::libs::blas_ok;
use super::{CudaBackend, at, plan, runs};
use crate::backend::checks::same_dtype;
use crate::backend::checks::{check_len, check_select};
use std::ffi::c_void;

use crate::backend::{GramJob, MatmulJob, ModeProductJob, Precision, ViewMutOps, ViewOps};
use crate::{DType, Error, Result};

fn int(op: &'static str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::backend(op, format!("dimension {x} exceeds cuBLAS's int")))
}

/// One batched GEMM, column-major:
/// `C_i = alpha op(A_i) op(B_i) + beta C_i`, `i < batch`. Operands are
/// `(address, leading dimension, stride between matrices)`, the last two in
/// elements; with `pointers`, each operand's address is instead that of a
/// device array of `batch` addresses (a pointer-array batched GEMM).
#[derive(Debug, Clone)]
struct Gemm {
    /// The pointer arrays of a pointer-array GEMM (A's, B's, C's), on the
    /// host; the addresses below are then ignored until they are uploaded.
    pointers: Option<Box<[Vec<u64>; 3]>>,
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

/// Where an operand's bf16 copy lives: `(base, elements, copy)`; an
/// address `x` inside `base..` maps to `copy + (x - base) / size * 2`.
type Copy16 = (u64, usize, u64);

fn to_copy(x: u64, size: usize, copies: &[Copy16]) -> u64 {
    for &(base, len, copy) in copies {
        if x >= base && x < base + (len * size) as u64 {
            return copy + (x - base) / size as u64 * 2;
        }
    }
    x
}

impl CudaBackend {
    /// Queues one batched GEMM at `precision`: TF32 sets the tensor-core
    /// math mode (float32 data); bf16 first rounds the operand `regions`
    /// (`(address, elements)` of float32 data holding every A and B the
    /// GEMM reads) into bf16 copies (one `pack16` launch each) and runs the
    /// GEMM on them with float32 accumulation and output.
    fn gemm(
        &self,
        dt: DType,
        precision: Precision,
        g: &Gemm,
        regions: &[(u64, usize)],
    ) -> Result<()> {
        const OP: &str = "gemm";
        if g.batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(());
        }
        precision.check(OP, dt)?;
        let mut g = g.clone();
        if precision == Precision::Bf16 {
            let mut copies: Vec<Copy16> = Vec::new();
            for (i, &(base, len)) in regions.iter().enumerate() {
                if copies.iter().any(|c| c.0 == base && c.1 == len) {
                    continue;
                }
                let copy = self.bf16_scratch(i, len)?;
                self.launch(
                    Kernel::Pack16,
                    dt,
                    grid_for(len),
                    Args::new()
                        .u(base)
                        .u(copy)
                        .u(len as u64)
                        .u(len as u64)
                        .u(super::kernels::kernel_defines::WIRE_BF16),
                )?;
                copies.push((base, len, copy));
            }
            let size = dt.size();
            g.a.0 = to_copy(g.a.0, size, &copies);
            g.b.0 = to_copy(g.b.0, size, &copies);
            if let Some(arrays) = g.pointers.as_deref_mut() {
                let [a, b, _] = arrays;
                for x in a.iter_mut().chain(b.iter_mut()) {
                    *x = to_copy(*x, size, &copies);
                }
            }
        }
        // The pointer arrays on the device (uploaded once; a planner records
        // the upload the first time, as a device does it).
        if let Some(arrays) = g.pointers.as_deref() {
            let base = self.device_table(arrays.concat())?;
            let step = 8 * g.batch as u64;
            g.a.0 = base;
            g.b.0 = base + step;
            g.c.0 = base + 2 * step;
        }
        let flops = 2.0 * (g.m * g.n * g.k * g.batch) as f64;
        if self.planned_products(plan::Call::Gemm, flops, g.batch) {
            return Ok(());
        }
        let libs = self.libs()?;
        let h = libs.blas;
        set_math(h, dt, precision == Precision::Tf32)?;
        let (m, n, k) = (int(OP, g.m)?, int(OP, g.n)?, int(OP, g.k)?);
        let (lda, ldb, ldc) = (int(OP, g.a.1)?, int(OP, g.b.1)?, int(OP, g.c.1)?);
        let batch = int(OP, g.batch)?;
        let (sa, sb, sc) = (g.a.2 as i64, g.b.2 as i64, g.c.2 as i64);
        let (ta, tb) = (op(g.ta), op(g.tb));
        // SAFETY: the callers checked every operand's length against the
        // extents the GEMM reads and writes (count x matrix size), the
        // pointer arrays hold `batch` such addresses, and every address is
        // device memory of this context.
        let s = unsafe {
            match (dt, g.pointers.is_some()) {
                (DType::F32, pointers) if precision == Precision::Bf16 => {
                    let (al, be) = (g.alpha as f32, g.beta as f32);
                    let (bf, f32t) = (
                        bsys::cudaDataType::CUDA_R_16BF,
                        bsys::cudaDataType::CUDA_R_32F,
                    );
                    let (compute, algo) = (
                        bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    );
                    let (alpha, beta) = (
                        &al as *const f32 as *const c_void,
                        &be as *const f32 as *const c_void,
                    );
                    if pointers {
                        bsys::cublasGemmBatchedEx(
                            h,
                            ta,
                            tb,
                            m,
                            n,
                            k,
                            alpha,
                            g.a.0 as *const *const c_void,
                            bf,
                            lda,
                            g.b.0 as *const *const c_void,
                            bf,
                            ldb,
                            beta,
                            g.c.0 as *const *mut c_void,
                            f32t,
                            ldc,
                            batch,
                            compute,
                            algo,
                        )
                    } else {
                        bsys::cublasGemmStridedBatchedEx(
                            h,
                            ta,
                            tb,
                            m,
                            n,
                            k,
                            alpha,
                            g.a.0 as *const c_void,
                            bf,
                            lda,
                            sa,
                            g.b.0 as *const c_void,
                            bf,
                            ldb,
                            sb,
                            beta,
                            g.c.0 as *mut c_void,
                            f32t,
                            ldc,
                            sc,
                            batch,
                            compute,
                            algo,
                        )
                    }
                }
                (DType::F32, false) => {
                    let (al, be) = (g.alpha as f32, g.beta as f32);
                    bsys::cublasSgemmStridedBatched(
                        h,
                        ta,
                        tb,
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
                (DType::F64, false) => bsys::cublasDgemmStridedBatched(
                    h,
                    ta,
                    tb,
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
                (DType::F32, true) => {
                    let (al, be) = (g.alpha as f32, g.beta as f32);
                    bsys::cublasSgemmBatched(
                        h,
                        ta,
                        tb,
                        m,
                        n,
                        k,
                        &al,
                        g.a.0 as *const *const f32,
                        lda,
                        g.b.0 as *const *const f32,
                        ldb,
                        &be,
                        g.c.0 as *const *mut f32,
                        ldc,
                        batch,
                    )
                }
                (DType::F64, true) => bsys::cublasDgemmBatched(
                    h,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    &g.alpha,
                    g.a.0 as *const *const f64,
                    lda,
                    g.b.0 as *const *const f64,
                    ldb,
                    &g.beta,
                    g.c.0 as *const *mut f64,
                    ldc,
                    batch,
                ),
            }
        };
        blas_ok(OP, s)
    }

    /// Device scratch `i` (0 or 1) for `len` bf16 operand values (grown on
    /// demand; a planner's is a fresh fake address).
    fn bf16_scratch(&self, i: usize, len: usize) -> Result<u64> {
        match &self.exec {
            super::Exec::Plan(r) => Ok(r.alloc(2 * len)),
            super::Exec::Device(_) => self.libs()?.bf16[i.min(1)].ensure(2 * len.max(1)),
        }
    }

    /// Device scratch of at least `bytes` bytes for the statistics' mode
    /// moves (grown on demand; a planner's is a fresh fake address).
    fn moved_scratch(&self, bytes: usize) -> Result<u64> {
        match &self.exec {
            super::Exec::Plan(r) => Ok(r.alloc(bytes)),
            super::Exec::Device(_) => self.libs()?.moved.ensure(bytes),
        }
    }
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

/// One queued operation of a statistics or product plan.
#[derive(Debug, Clone)]
enum Step {
    /// `swap_axes`: `batch` tensors `(a, d, b)` at `input` rewritten as
    /// `(d, a, b)` at `out` (addresses in bytes, element size `size`).
    SwapAxes {
        input: u64,
        out: u64,
        a: usize,
        d: usize,
        b: usize,
        batch: usize,
    },
    Gemm(Gemm),
}

/// `mode_gram` for a run of `batch` tensors of shape `(a, d, b)` (see
/// [`split_dims`]) at `input`: `out <- beta out + alpha gram` in one GEMM,
/// after moving a middle mode to the front into `scratch` (`batch` tensors'
/// room). `size` is the element size in bytes.
#[allow(clippy::too_many_arguments)]
fn gram_plan(
    (a, d, b): (usize, usize, usize),
    alpha: f64,
    beta: f64,
    input: u64,
    out: u64,
    scratch: u64,
    batch: usize,
) -> Vec<Step> {
    let numel = a * d * b;
    if b == 1 {
        // The block is a row-major A x d matrix, i.e. the column-major
        // d x A matrix X = T^T (ld d). Gram = X X^T.
        return vec![Step::Gemm(Gemm {
            pointers: None,
            ta: false,
            tb: true,
            m: d,
            n: d,
            k: a,
            alpha,
            a: (input, d, numel),
            b: (input, d, numel),
            beta,
            c: (out, d, d * d),
            batch,
        })];
    }
    let mut steps = Vec::new();
    let mut src = input;
    if a > 1 {
        // A middle mode: (a, d, b) -> (d, a, b), the mode in front.
        steps.push(Step::SwapAxes {
            input,
            out: scratch,
            a,
            d,
            b,
            batch,
        });
        src = scratch;
    }
    // The block is now a row-major d x K matrix S (K = a b), i.e. the
    // column-major K x d matrix Y = S^T (ld K). Gram = S S^T = Y^T Y.
    let k = a * b;
    steps.push(Step::Gemm(Gemm {
        pointers: None,
        ta: true,
        tb: false,
        m: d,
        n: d,
        k,
        alpha,
        a: (src, k, numel),
        b: (src, k, numel),
        beta,
        c: (out, d, d * d),
        batch,
    }));
    steps
}

/// The GEMM of `mode_product` for a run of `batch` tensors of shape
/// `(a, d, b)` at `input`, matrices at `mats`, results at `out`.
#[allow(clippy::too_many_arguments)]
fn product_plan(
    (a, d, b): (usize, usize, usize),
    transpose: bool,
    input: u64,
    mats: u64,
    out: u64,
    size: usize,
    batch: usize,
) -> Gemm {
    let numel = a * d * b;
    // The row-major matrix M read column-major is Mc = M^T.
    if b == 1 {
        // Row-major A x d blocks: out = in M^T (or in M). Column-major,
        // with X = in^T (d x A, ld d): out^T = M X = Mc^T X (or Mc X).
        return Gemm {
            pointers: None,
            ta: !transpose,
            tb: false,
            m: d,
            n: a,
            k: d,
            alpha: 1.0,
            a: (mats, d, d * d),
            b: (input, d, numel),
            beta: 0.0,
            c: (out, d, numel),
            batch,
        };
    }
    // Slab i, row-major d x B: out_i = M S_i. Column-major, Y = S_i^T
    // (B x d, ld B): out_i^T = Y M^T = Y Mc (or Y M = Y Mc^T).
    let slab = |t: usize, i: usize| ((t * numel + i * d * b) * size) as u64;
    let mut g = Gemm {
        pointers: None,
        ta: false,
        tb: transpose,
        m: b,
        n: d,
        k: d,
        alpha: 1.0,
        a: (input, b, numel),
        b: (mats, d, d * d),
        beta: 0.0,
        c: (out, b, numel),
        batch,
    };
    if a > 1 {
        // A middle mode: every slab of every block, one pointer-array GEMM.
        let mut arrays = [Vec::new(), Vec::new(), Vec::new()];
        for t in 0..batch {
            for i in 0..a {
                arrays[0].push(input + slab(t, i));
                arrays[1].push(mats + ((t * d * d) * size) as u64);
                arrays[2].push(out + slab(t, i));
            }
        }
        g.pointers = Some(Box::new(arrays));
        g.batch = batch * a;
    }
    g
}

/// The GEMM of `matmul` for a run of `batch` products of `n x n` matrices.
/// Row-major `C = op(A) op(B)`; column-major (everything read as its
/// transpose): `C^T = op(B)^T op(A)^T = op(Bc) op(Ac)`, with the same
/// transposition flags.
#[allow(clippy::too_many_arguments)]
fn matmul_plan(
    n: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: f64,
    accumulate: bool,
    a: u64,
    b: u64,
    c: u64,
    batch: usize,
) -> Gemm {
    Gemm {
        pointers: None,
        ta: trans_b,
        tb: trans_a,
        m: n,
        n,
        k: n,
        alpha,
        a: (b, n, n * n),
        b: (a, n, n * n),
        beta: if accumulate { 1.0 } else { 0.0 },
        c: (c, n, n * n),
        batch,
    }
}

pub(super) fn mode_gram(be: &CudaBackend, jobs: &mut [GramJob<'_, CudaBackend>]) -> Result<()> {
    const OP: &str = "mode_gram";
    for job in jobs.iter_mut() {
        job.precision.check_statistics(OP)?;
        let (a, d, b) = split_dims(OP, job.dims, job.mode)?;
        check_select(OP, job.select, job.count)?;
        let numel = a * d * b;
        let dt = job.out.dtype();
        same_dtype(OP, dt, &[("input", job.input.dtype())])?;
        check_len(OP, "input", job.input.len(), job.count, numel)?;
        check_len(OP, "output", job.out.len(), job.count, d * d)?;
        for (s, l) in runs(job.select, job.count) {
            let input = at(job.input.ptr, dt, s * numel);
            let out = at(job.out.ptr, dt, s * d * d);
            let scratch = if a > 1 && b > 1 {
                be.moved_scratch(l * numel * dt.size())?
            } else {
                0
            };
            for step in gram_plan((a, d, b), job.alpha, job.beta, input, out, scratch, l) {
                match step {
                    Step::SwapAxes {
                        input,
                        out,
                        a,
                        d,
                        b,
                        batch,
                    } => be.launch(
                        Kernel::SwapAxes,
                        dt,
                        grid_for(batch * a * d * b),
                        Args::new()
                            .u(input)
                            .u(out)
                            .u(a as u64)
                            .u(d as u64)
                            .u(b as u64)
                            .u(batch as u64),
                    )?,
                    Step::Gemm(g) => be.gemm(dt, job.precision, &g, &[])?,
                }
            }
            // The product is symmetric up to rounding, so the column-major
            // result read row-major is the Gram matrix; its lower triangle
            // is the defined part. Mirror it when the full matrix is wanted.
            if job.full {
                be.launch(
                    Kernel::Symmetrize,
                    dt,
                    grid_for(l * d * d),
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
        for (s, l) in runs(job.select, job.count) {
            let input = at(job.input.ptr, dt, s * numel);
            let mats = at(job.matrices.ptr, dt, s * d * d);
            let out = at(job.out.ptr, dt, s * numel);
            let g = product_plan((a, d, b), job.transpose, input, mats, out, dt.size(), l);
            be.gemm(
                dt,
                job.precision,
                &g,
                &[(input, l * numel), (mats, l * d * d)],
            )?;
        }
    }
    Ok(())
}

pub(super) fn matmul(be: &CudaBackend, jobs: &mut [MatmulJob<'_, CudaBackend>]) -> Result<()> {
    const OP: &str = "matmul";
    // Every job is checked before any GEMM is queued.
    let mut plans: Vec<Product> = Vec::new();
    for job in jobs.iter_mut() {
        check_select(OP, job.select, job.count)?;
        let (n, nn) = (job.n, job.n * job.n);
        let dt = job.c.dtype();
        same_dtype(OP, dt, &[("a", job.a.dtype()), ("b", job.b.dtype())])?;
        check_len(OP, "a", job.a.len(), job.count, nn)?;
        check_len(OP, "b", job.b.len(), job.count, nn)?;
        check_len(OP, "c", job.c.len(), job.count, nn)?;
        for (s, l) in runs(job.select, job.count) {
            let (a, b) = (at(job.a.ptr, dt, s * nn), at(job.b.ptr, dt, s * nn));
            let g = matmul_plan(
                n,
                job.trans_a,
                job.trans_b,
                job.alpha,
                job.accumulate,
                a,
                b,
                at(job.c.ptr, dt, s * nn),
                l,
            );
            plans.push((dt, job.precision, g, [(a, l * nn), (b, l * nn)]));
        }
    }
    for (dt, precision, g, regions) in merge_products(plans) {
        be.gemm(dt, precision, &g, &regions)?;
    }
    Ok(())
}

/// One job run's GEMM for `matmul`: its dtype, precision, plan and operand
/// regions `(address, elements)`.
type Product = (DType, Precision, Gemm, [(u64, usize); 2]);

/// A GEMM to queue, maybe several products merged: its operand regions are
/// empty when merged (merging leaves bf16 GEMMs apart).
type MergedProduct = (DType, Precision, Gemm, Vec<(u64, usize)>);

/// The jobs' GEMMs with every set of the same size, flags and scalars
/// (e.g. one size class of factors spread over several groups) merged into
/// one pointer-array GEMM, its arrays uploaded once (the addresses are the
/// same at every iteration). bf16 GEMMs stay apart (each rounds its own
/// operand regions).
fn merge_products(plans: Vec<Product>) -> Vec<MergedProduct> {
    let key = |(dt, p, g, _): &Product| {
        (
            *dt,
            *p,
            g.ta,
            g.tb,
            g.m,
            g.n,
            g.k,
            g.alpha.to_bits(),
            g.beta.to_bits(),
        )
    };
    let mut out: Vec<MergedProduct> = Vec::new();
    let mut done = vec![false; plans.len()];
    for i in 0..plans.len() {
        if done[i] {
            continue;
        }
        let group: Vec<usize> = if plans[i].1 == Precision::Bf16 {
            vec![i]
        } else {
            (i..plans.len())
                .filter(|&k| !done[k] && key(&plans[k]) == key(&plans[i]))
                .collect()
        };
        group.iter().for_each(|&k| done[k] = true);
        let (dt, precision, first, regions) = &plans[i];
        if group.len() == 1 {
            out.push((*dt, *precision, first.clone(), regions.to_vec()));
            continue;
        }
        let size = dt.size() as u64;
        let mut arrays = [Vec::new(), Vec::new(), Vec::new()];
        for &k in &group {
            let g = &plans[k].2;
            for t in 0..g.batch as u64 {
                arrays[0].push(g.a.0 + t * g.a.2 as u64 * size);
                arrays[1].push(g.b.0 + t * g.b.2 as u64 * size);
                arrays[2].push(g.c.0 + t * g.c.2 as u64 * size);
            }
        }
        let mut g = first.clone();
        g.batch = arrays[0].len();
        g.pointers = Some(Box::new(arrays));
        out.push((*dt, *precision, g, Vec::new()));
    }
    out
}

/// The GEMM plans executed on the host with cuBLAS's column-major
/// semantics, against the CPU backend's row-major definitions: checks the
/// transposition flags, leading dimensions, strides and offsets without a
/// GPU.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::{CpuBackend, HostView, HostViewMut};

    /// Operand addresses: `(operand << 40) + element offset` (size 1).
    const X: u64 = 0;
    const M: u64 = 1 << 40;
    const OUT: u64 = 2 << 40;

    fn decode(addr: u64) -> (usize, usize) {
        ((addr >> 40) as usize, (addr & ((1 << 40) - 1)) as usize)
    }

    /// Scratch of the statistics' mode moves.
    const SCRATCH: u64 = 3 << 40;

    /// `C_t = alpha op(A_t) op(B_t) + beta C_t`, column-major, as cuBLAS
    /// defines it (`beta = 0` ignores C's old values); a pointer-array GEMM
    /// reads each product's operands from its arrays.
    fn host_gemm(g: &Gemm, mem: &mut [Vec<f64>; 4]) {
        let operand = |which: usize, t: usize| -> (usize, usize) {
            match g.pointers.as_deref() {
                Some(arrays) => decode(arrays[which][t]),
                None => {
                    let (addr, _, stride) = [g.a, g.b, g.c][which];
                    let (i, o) = decode(addr);
                    (i, o + t * stride)
                }
            }
        };
        for t in 0..g.batch {
            let ((ia, ba), (ib, bb), (ic, bc)) = (operand(0, t), operand(1, t), operand(2, t));
            let (a, b) = (mem[ia].clone(), mem[ib].clone());
            let c = &mut mem[ic];
            // op(A)[i, l] and op(B)[l, j] of column-major storage.
            let ea = |i: usize, l: usize| a[ba + if g.ta { l + i * g.a.1 } else { i + l * g.a.1 }];
            let eb = |l: usize, j: usize| b[bb + if g.tb { j + l * g.b.1 } else { l + j * g.b.1 }];
            for i in 0..g.m {
                for j in 0..g.n {
                    let s: f64 = (0..g.k).map(|l| ea(i, l) * eb(l, j)).sum();
                    let idx = bc + i + j * g.c.1;
                    c[idx] = if g.beta == 0.0 {
                        g.alpha * s
                    } else {
                        g.alpha * s + g.beta * c[idx]
                    };
                }
            }
        }
    }

    /// The `swap_axes` kernel's definition (kernels/copy.cu).
    fn host_swap(step: &Step, mem: &mut [Vec<f64>; 4]) {
        let Step::SwapAxes {
            input,
            out,
            a,
            d,
            b,
            batch,
        } = *step
        else {
            unreachable!()
        };
        let ((ii, io), (oi, oo)) = (decode(input), decode(out));
        let numel = a * d * b;
        let src = mem[ii].clone();
        let dst = &mut mem[oi];
        dst.resize(oo + batch * numel, f64::NAN);
        for t in 0..batch {
            for j in 0..a {
                for k in 0..d {
                    for q in 0..b {
                        dst[oo + t * numel + (k * a + j) * b + q] =
                            src[io + t * numel + (j * d + k) * b + q];
                    }
                }
            }
        }
    }

    fn values(seed: u64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i as f64 + 1.0) * (seed as f64 * 0.37 + 1.3)).sin())
            .collect()
    }

    fn assert_close(what: &str, a: &[f64], b: &[f64]) {
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-12 * scale,
                "{what}: element {i}: cpu {x} vs plan {y}"
            );
        }
    }

    const SHAPES: [&[usize]; 4] = [&[6, 5, 4], &[7], &[5, 3], &[2, 3, 4, 5]];

    #[test]
    fn gram_plans_compute_the_cpu_backends_statistics() {
        let cpu = CpuBackend::new(1).unwrap();
        let count = 3;
        for dims in SHAPES {
            let numel: usize = dims.iter().product();
            for mode in 0..dims.len() {
                let (a, d, b) = split_dims("test", dims, mode).unwrap();
                for beta in [0.0, 1.0, 0.5] {
                    let x = values(1, count * numel);
                    let f0 = values(2, count * d * d);
                    let mut want = f0.clone();
                    cpu.mode_gram(&mut [GramJob {
                        input: HostView::F64(&x),
                        dims,
                        count,
                        mode,
                        out: HostViewMut::F64(&mut want),
                        beta,
                        alpha: 0.25,
                        full: false,
                        precision: Precision::F32,
                        select: None,
                    }])
                    .unwrap();
                    let mut mem = [x, Vec::new(), f0, Vec::new()];
                    let steps = gram_plan((a, d, b), 0.25, beta, X, OUT, SCRATCH, count);
                    let moves = steps
                        .iter()
                        .filter(|s| matches!(s, Step::SwapAxes { .. }))
                        .count();
                    assert_eq!(moves, usize::from(a > 1 && b > 1), "{dims:?} mode {mode}");
                    assert_eq!(steps.len(), moves + 1, "one GEMM per mode");
                    for step in &steps {
                        match step {
                            Step::Gemm(g) => host_gemm(g, &mut mem),
                            swap => host_swap(swap, &mut mem),
                        }
                    }
                    // Only the row-major lower triangle is defined.
                    let lower = |v: &[f64]| -> Vec<f64> {
                        (0..count * d * d)
                            .filter(|k| (k % (d * d)) / d >= k % d)
                            .map(|k| v[k])
                            .collect()
                    };
                    assert_close(
                        &format!("gram {dims:?} mode {mode} beta {beta}"),
                        &lower(&want),
                        &lower(&mem[2]),
                    );
                }
            }
        }
    }

    #[test]
    fn product_plans_compute_the_cpu_backends_mode_products() {
        let cpu = CpuBackend::new(1).unwrap();
        let count = 3;
        for dims in SHAPES {
            let numel: usize = dims.iter().product();
            for mode in 0..dims.len() {
                let (a, d, b) = split_dims("test", dims, mode).unwrap();
                for transpose in [false, true] {
                    let x = values(3, count * numel);
                    let m = values(4, count * d * d);
                    let mut want = vec![0.0; count * numel];
                    cpu.mode_product(&mut [ModeProductJob {
                        input: HostView::F64(&x),
                        dims,
                        count,
                        mode,
                        matrices: HostView::F64(&m),
                        transpose,
                        out: HostViewMut::F64(&mut want),
                        precision: Precision::F32,
                        select: None,
                    }])
                    .unwrap();
                    let mut mem = [x, m, vec![f64::NAN; count * numel], Vec::new()];
                    host_gemm(
                        &product_plan((a, d, b), transpose, X, M, OUT, 1, count),
                        &mut mem,
                    );
                    assert_close(
                        &format!("product {dims:?} mode {mode} transpose {transpose}"),
                        &want,
                        &mem[2],
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_copies_take_every_operand_address_to_its_place_in_the_copy() {
        // A middle-mode product (pointer arrays) of 2 blocks (3, 4, 5),
        // f32 input at 0x1000 and matrices at 0x9000, copies at 0x100000 and
        // 0x200000.
        let (a, d, b, count, size) = (3usize, 4usize, 5usize, 2usize, 4usize);
        let numel = a * d * b;
        let (input, mats) = (0x1000u64, 0x9000u64);
        let copies = [
            (input, count * numel, 0x10_0000u64),
            (mats, count * d * d, 0x20_0000u64),
        ];
        let g = product_plan((a, d, b), false, input, mats, 0x5_0000, size, count);
        let arrays = g.pointers.as_deref().unwrap();
        for t in 0..count {
            for i in 0..a {
                let k = t * a + i;
                let elem = t * numel + i * d * b;
                assert_eq!(
                    to_copy(arrays[0][k], size, &copies),
                    0x10_0000 + 2 * elem as u64
                );
                assert_eq!(
                    to_copy(arrays[1][k], size, &copies),
                    0x20_0000 + 2 * (t * d * d) as u64
                );
                // Outputs stay float32, where they were.
                assert_eq!(to_copy(arrays[2][k], size, &copies), arrays[2][k]);
            }
        }
        // A strided product's operands map the same way.
        let g = product_plan((a * d, b, 1), true, input, mats, 0x5_0000, size, count);
        assert_eq!(to_copy(g.a.0, size, &copies), 0x20_0000);
        assert_eq!(to_copy(g.b.0, size, &copies), 0x10_0000);
    }

    #[test]
    fn products_of_one_size_merge_into_one_pointer_array_gemm() {
        let cpu = CpuBackend::new(1).unwrap();
        let nn = 25usize;
        let (a, b) = (values(11, 8 * nn), values(12, 8 * nn));
        let mut want = vec![0.0; 8 * nn];
        cpu.matmul(&mut [MatmulJob {
            a: HostView::F64(&a),
            b: HostView::F64(&b),
            c: HostViewMut::F64(&mut want),
            n: 5,
            count: 8,
            trans_a: false,
            trans_b: true,
            alpha: 1.0,
            accumulate: false,
            precision: Precision::F32,
            select: None,
        }])
        .unwrap();
        // Products 0..3 and 5..8 of the batch as two jobs (byte addresses
        // of f64 data), and a 4 x 4 product that stays apart.
        let job = |first: usize, batch: usize, n: usize| {
            let off = (first * nn * 8) as u64;
            let g = matmul_plan(
                n,
                false,
                true,
                1.0,
                false,
                X + off,
                M + off,
                OUT + off,
                batch,
            );
            let len = batch * n * n;
            (
                DType::F64,
                Precision::F32,
                g,
                [(X + off, len), (M + off, len)],
            )
        };
        let merged = merge_products(vec![job(0, 3, 5), job(0, 1, 4), job(5, 3, 5)]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[1].2.m, 4);
        assert!(merged[1].2.pointers.is_none());
        let mut g = merged[0].2.clone();
        assert_eq!(g.batch, 6);
        // The arrays hold byte addresses; this test's memory counts elements.
        for v in g.pointers.as_deref_mut().unwrap().iter_mut() {
            for p in v.iter_mut() {
                let (op, off) = decode(*p);
                *p = ((op as u64) << 40) + (off / 8) as u64;
            }
        }
        let mut mem = [a, b, vec![f64::NAN; 8 * nn], Vec::new()];
        host_gemm(&g, &mut mem);
        for k in (0..3).chain(5..8) {
            assert_close(
                &format!("product {k}"),
                &want[k * nn..(k + 1) * nn],
                &mem[2][k * nn..(k + 1) * nn],
            );
        }
    }

    #[test]
    fn matmul_plans_compute_the_cpu_backends_products() {
        let cpu = CpuBackend::new(1).unwrap();
        let (n, count) = (5, 3);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for accumulate in [false, true] {
                let (a, b, c0) = (
                    values(5, count * n * n),
                    values(6, count * n * n),
                    values(7, count * n * n),
                );
                let mut want = c0.clone();
                cpu.matmul(&mut [MatmulJob {
                    a: HostView::F64(&a),
                    b: HostView::F64(&b),
                    c: HostViewMut::F64(&mut want),
                    n,
                    count,
                    trans_a: ta,
                    trans_b: tb,
                    alpha: -0.75,
                    accumulate,
                    precision: Precision::F32,
                    select: None,
                }])
                .unwrap();
                let mut mem = [a, b, c0, Vec::new()];
                host_gemm(
                    &matmul_plan(n, ta, tb, -0.75, accumulate, X, M, OUT, count),
                    &mut mem,
                );
                assert_close(&format!("matmul {ta} {tb} {accumulate}"), &want, &mem[2]);
            }
        }
    }
}
