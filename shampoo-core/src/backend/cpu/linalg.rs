//! Factor statistics, mode products and batched matrix products with faer.
//!
//! A block tensor of shape `dims` seen along dimension `k` is
//! `A x d x B` (`A` = product of the dims before `k`, `B` after). When
//! `A = 1` it is a `d x B` matrix, when `B = 1` an `A x d` matrix; both are
//! one product. Otherwise the work is a sum (or a batch) of `A` products.

use std::borrow::Cow;

use faer::linalg::matmul::matmul as gemm;
use faer::traits::RealField;
use faer::{Accum, MatMut, MatRef, Par};

use super::{CpuBackend, check_len, check_select, chunks, take_mut, typed, typed_mut};
use crate::backend::{GramJob, MatmulJob, ModeProductJob, Precision};
use crate::{DType, Error, Float, Result};

/// Element types the CPU backend computes in.
pub(crate) trait CpuFloat: Float + RealField {}
impl CpuFloat for f32 {}
impl CpuFloat for f64 {}

/// `(A, d, B)` of a shape along `mode`.
fn split_dims(dims: &[usize], mode: usize) -> (usize, usize, usize) {
    let a = dims[..mode].iter().product();
    let b = dims[mode + 1..].iter().product();
    (a, dims[mode], b)
}

fn check_mode(op: &'static str, dims: &[usize], mode: usize) -> Result<()> {
    if mode >= dims.len() {
        return Err(Error::backend(
            op,
            format!("mode {mode} of a tensor of order {}", dims.len()),
        ));
    }
    Ok(())
}

/// `x` as a product reads it at `precision`: rounded (a copy) for
/// float32 data at TF32 or bf16, else `x` itself (the same rounding as the
/// GPU's matrix units; [`Precision`]).
fn operand<T: CpuFloat>(x: &[T], precision: Precision) -> Cow<'_, [T]> {
    let format = match precision.operand_mantissa(T::DTYPE) {
        None => return Cow::Borrowed(x),
        Some(10) => super::wire::TF32,
        Some(_) => super::wire::BF16,
    };
    Cow::Owned(
        x.iter()
            .map(|&v| T::from_f64(f64::from(super::wire::round_f32(v.to_f64() as f32, format))))
            .collect(),
    )
}

struct GramTask<'a, T: Clone> {
    input: Cow<'a, [T]>,
    out: &'a mut [T],
    shape: (usize, usize, usize),
    beta: T,
    alpha: T,
    replace: bool,
    full: bool,
}

/// Column-panel width of the statistics products: a panel of a 512 x 512
/// factor is 128 KiB, so scaling it and accumulating into it happen while it
/// is in the core's cache, instead of two passes over the whole factor.
const PANEL: usize = 64;

fn gram_task<T: CpuFloat>(t: GramTask<'_, T>) {
    let (a, d, b) = t.shape;
    // Row-major views of the whole input as `a` slabs of `d x b`.
    let slab = |i: usize| MatRef::from_row_major_slice(&t.input[i * d * b..(i + 1) * d * b], d, b);
    let mut p0 = 0;
    while p0 < d {
        let w = PANEL.min(d - p0);
        // The panel: rows p0..d, columns p0..p0+w (the lower part of these
        // columns plus the upper corner of the diagonal block).
        if !t.replace && t.beta != T::ONE {
            // L *= beta (rounded) before accumulating, as the published
            // code does.
            for row in t.out.chunks_exact_mut(d).skip(p0) {
                super::kernels::scale(&mut row[p0..p0 + w], t.beta);
            }
        }
        let mut accum = if t.replace {
            Accum::Replace
        } else {
            Accum::Add
        };
        let mut out =
            MatMut::from_row_major_slice_mut(t.out, d, d).submatrix_mut(p0, p0, d - p0, w);
        if b == 1 {
            // (A x d)^T (A x d): columns p0.. of the A x d matrix.
            let m = MatRef::from_row_major_slice(&t.input, a, d);
            gemm(
                out.rb_mut(),
                accum,
                m.subcols(p0, d - p0).transpose(),
                m.subcols(p0, w),
                t.alpha,
                Par::Seq,
            );
        } else {
            for i in 0..a {
                let m = slab(i);
                gemm(
                    out.rb_mut(),
                    accum,
                    m.subrows(p0, d - p0),
                    m.subrows(p0, w).transpose(),
                    t.alpha,
                    Par::Seq,
                );
                accum = Accum::Add;
            }
        }
        p0 += w;
    }
    if t.full {
        crate::matrix::mirror_lower(t.out, d);
    }
}

use faer::reborrow::ReborrowMut;

fn gram_job<'a, T: CpuFloat>(
    job: &mut GramJob<'a, CpuBackend>,
    tasks: &mut Vec<(u64, GramTask<'a, T>)>,
) -> Result<()> {
    const OP: &str = "mode_gram";
    check_mode(OP, job.dims, job.mode)?;
    check_select(OP, job.select, job.count)?;
    let numel: usize = job.dims.iter().product();
    let (a, d, b) = split_dims(job.dims, job.mode);
    job.precision.check_statistics(OP)?;
    let input = typed::<T>(job.input, OP)?;
    let out = typed_mut::<T>(take_mut(&mut job.out), OP)?;
    check_len(OP, "input", input.len(), job.count, numel)?;
    check_len(OP, "output", out.len(), job.count, d * d)?;
    for (i, o) in chunks(out, d * d, job.select) {
        tasks.push((
            (d * d * a * b) as u64,
            GramTask {
                input: operand(&input[i * numel..(i + 1) * numel], job.precision),
                out: o,
                shape: (a, d, b),
                beta: T::from_f64(job.beta),
                alpha: T::from_f64(job.alpha),
                replace: job.beta == 0.0,
                full: job.full,
            },
        ));
    }
    Ok(())
}

pub(super) fn mode_gram(be: &CpuBackend, jobs: &mut [GramJob<'_, CpuBackend>]) -> Result<()> {
    let mut t32 = Vec::new();
    let mut t64 = Vec::new();
    for job in jobs.iter_mut() {
        match job.out.dtype() {
            DType::F32 => gram_job::<f32>(job, &mut t32)?,
            DType::F64 => gram_job::<f64>(job, &mut t64)?,
        }
    }
    be.run(t32, gram_task, t64, gram_task);
    Ok(())
}

struct ProductTask<'a, T: Clone> {
    input: Cow<'a, [T]>,
    matrix: Cow<'a, [T]>,
    out: &'a mut [T],
    shape: (usize, usize, usize),
    transpose: bool,
}

fn product_task<T: CpuFloat>(t: ProductTask<'_, T>) {
    let (a, d, b) = t.shape;
    let m = MatRef::from_row_major_slice(&t.matrix, d, d);
    let m = if t.transpose { m.transpose() } else { m };
    if b == 1 {
        // out (A x d) = in (A x d) M^T
        let x = MatRef::from_row_major_slice(&t.input, a, d);
        let o = MatMut::from_row_major_slice_mut(t.out, a, d);
        gemm(o, Accum::Replace, x, m.transpose(), T::ONE, Par::Seq);
    } else {
        for i in 0..a {
            let r = i * d * b..(i + 1) * d * b;
            let x = MatRef::from_row_major_slice(&t.input[r.clone()], d, b);
            let o = MatMut::from_row_major_slice_mut(&mut t.out[r], d, b);
            gemm(o, Accum::Replace, m, x, T::ONE, Par::Seq);
        }
    }
}

fn product_job<'a, T: CpuFloat>(
    job: &mut ModeProductJob<'a, CpuBackend>,
    tasks: &mut Vec<(u64, ProductTask<'a, T>)>,
) -> Result<()> {
    const OP: &str = "mode_product";
    check_mode(OP, job.dims, job.mode)?;
    check_select(OP, job.select, job.count)?;
    let numel: usize = job.dims.iter().product();
    let (a, d, b) = split_dims(job.dims, job.mode);
    job.precision.check(OP, T::DTYPE)?;
    let input = typed::<T>(job.input, OP)?;
    let matrices = typed::<T>(job.matrices, OP)?;
    let out = typed_mut::<T>(take_mut(&mut job.out), OP)?;
    check_len(OP, "input", input.len(), job.count, numel)?;
    check_len(OP, "matrices", matrices.len(), job.count, d * d)?;
    check_len(OP, "output", out.len(), job.count, numel)?;
    for (i, o) in chunks(out, numel, job.select) {
        tasks.push((
            (numel * d) as u64,
            ProductTask {
                input: operand(&input[i * numel..(i + 1) * numel], job.precision),
                matrix: operand(&matrices[i * d * d..(i + 1) * d * d], job.precision),
                out: o,
                shape: (a, d, b),
                transpose: job.transpose,
            },
        ));
    }
    Ok(())
}

pub(super) fn mode_product(
    be: &CpuBackend,
    jobs: &mut [ModeProductJob<'_, CpuBackend>],
) -> Result<()> {
    let mut t32 = Vec::new();
    let mut t64 = Vec::new();
    for job in jobs.iter_mut() {
        match job.out.dtype() {
            DType::F32 => product_job::<f32>(job, &mut t32)?,
            DType::F64 => product_job::<f64>(job, &mut t64)?,
        }
    }
    be.run(t32, product_task, t64, product_task);
    Ok(())
}

struct MatmulTask<'a, T: Clone> {
    a: Cow<'a, [T]>,
    b: Cow<'a, [T]>,
    c: &'a mut [T],
    n: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: T,
    accumulate: bool,
}

fn matmul_task<T: CpuFloat>(t: MatmulTask<'_, T>) {
    let n = t.n;
    let a = MatRef::from_row_major_slice(&t.a, n, n);
    let b = MatRef::from_row_major_slice(&t.b, n, n);
    let a = if t.trans_a { a.transpose() } else { a };
    let b = if t.trans_b { b.transpose() } else { b };
    let c = MatMut::from_row_major_slice_mut(t.c, n, n);
    let accum = if t.accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    gemm(c, accum, a, b, t.alpha, Par::Seq);
}

fn matmul_job<'a, T: CpuFloat>(
    job: &mut MatmulJob<'a, CpuBackend>,
    tasks: &mut Vec<(u64, MatmulTask<'a, T>)>,
) -> Result<()> {
    const OP: &str = "matmul";
    check_select(OP, job.select, job.count)?;
    let nn = job.n * job.n;
    job.precision.check(OP, T::DTYPE)?;
    let a = typed::<T>(job.a, OP)?;
    let b = typed::<T>(job.b, OP)?;
    let c = typed_mut::<T>(take_mut(&mut job.c), OP)?;
    check_len(OP, "a", a.len(), job.count, nn)?;
    check_len(OP, "b", b.len(), job.count, nn)?;
    check_len(OP, "c", c.len(), job.count, nn)?;
    for (i, c) in chunks(c, nn, job.select) {
        tasks.push((
            (nn * job.n) as u64,
            MatmulTask {
                a: operand(&a[i * nn..(i + 1) * nn], job.precision),
                b: operand(&b[i * nn..(i + 1) * nn], job.precision),
                c,
                n: job.n,
                trans_a: job.trans_a,
                trans_b: job.trans_b,
                alpha: T::from_f64(job.alpha),
                accumulate: job.accumulate,
            },
        ));
    }
    Ok(())
}

pub(super) fn matmul(be: &CpuBackend, jobs: &mut [MatmulJob<'_, CpuBackend>]) -> Result<()> {
    let mut t32 = Vec::new();
    let mut t64 = Vec::new();
    for job in jobs.iter_mut() {
        match job.c.dtype() {
            DType::F32 => matmul_job::<f32>(job, &mut t32)?,
            DType::F64 => matmul_job::<f64>(job, &mut t64)?,
        }
    }
    be.run(t32, matmul_task, t64, matmul_task);
    Ok(())
}
