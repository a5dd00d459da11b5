//! Batched orthogonal polar factor `U V^T` of the reduced SVD with faer,
//! one matrix per task, in per-thread scratch.

use std::sync::atomic::{AtomicBool, Ordering};

use faer::dyn_stack::StackReq;
use faer::linalg::matmul::matmul as gemm;
use faer::linalg::svd::{self, ComputeSvdVectors};
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, MatMut, MatRef, Par};

use super::eigh::with_scratch;
use super::linalg::CpuFloat;
use super::{CpuBackend, check_len, check_select, chunks, take_mut, typed, typed_mut};
use crate::backend::OrthogonalizeJob;
use crate::{DType, Error, Result};

struct PolarTask<'a, 'f, T> {
    input: &'a [T],
    out: &'a mut [T],
    nuclear: Option<&'a mut T>,
    rows: usize,
    cols: usize,
    failed: &'f AtomicBool,
}

fn polar_task<T: CpuFloat>(t: PolarTask<'_, '_, T>) {
    let (m, n) = (t.rows, t.cols);
    let k = m.min(n);
    if k == 0 {
        return;
    }
    let par = Par::Seq;
    let req = StackReq::all_of(&[
        StackReq::new::<T>(m * k),
        StackReq::new::<T>(n * k),
        StackReq::new::<T>(k),
        svd::svd_scratch::<T>(
            m,
            n,
            ComputeSvdVectors::Thin,
            ComputeSvdVectors::Thin,
            par,
            Default::default(),
        ),
    ]);
    with_scratch(req, |stack| {
        let (mut u, stack) = stack.make_with::<T>(m * k, |_| T::ZERO);
        let (mut v, stack) = stack.make_with::<T>(n * k, |_| T::ZERO);
        let (mut s, stack) = stack.make_with::<T>(k, |_| T::ZERO);
        let a = MatRef::from_row_major_slice(t.input, m, n);
        let mut um = MatMut::from_column_major_slice_mut(&mut u, m, k);
        let mut vm = MatMut::from_column_major_slice_mut(&mut v, n, k);
        let ok = svd::svd(
            a,
            faer::diag::DiagMut::from_slice_mut(&mut s),
            Some(um.rb_mut()),
            Some(vm.rb_mut()),
            par,
            stack,
            Default::default(),
        )
        .is_ok();
        if !ok {
            t.failed.store(true, Ordering::Relaxed);
            return;
        }
        let out = MatMut::from_row_major_slice_mut(t.out, m, n);
        gemm(
            out,
            Accum::Replace,
            um.rb(),
            vm.rb().transpose(),
            T::ONE,
            par,
        );
        if let Some(nu) = t.nuclear {
            let mut sum = T::ZERO;
            for &x in s.iter() {
                sum += x;
            }
            *nu = sum;
        }
    });
}

fn polar_job<'a, 'f, T: CpuFloat>(
    job: &mut OrthogonalizeJob<'a, CpuBackend>,
    failed: &'f AtomicBool,
    tasks: &mut Vec<(u64, PolarTask<'a, 'f, T>)>,
) -> Result<()> {
    const OP: &str = "orthogonalize";
    check_select(OP, job.select, job.count)?;
    let (m, n) = (job.rows, job.cols);
    let input = typed::<T>(job.input, OP)?;
    let out = typed_mut::<T>(take_mut(&mut job.out), OP)?;
    check_len(OP, "input", input.len(), job.count, m * n)?;
    check_len(OP, "output", out.len(), job.count, m * n)?;
    let mut nuclear: Vec<Option<&'a mut T>> = match job.nuclear.as_mut() {
        Some(v) => {
            let v = typed_mut::<T>(take_mut(v), OP)?;
            check_len(OP, "nuclear", v.len(), job.count, 1)?;
            v.iter_mut().map(Some).collect()
        }
        None => (0..job.count).map(|_| None).collect(),
    };
    for (i, o) in chunks(out, m * n, job.select) {
        tasks.push((
            (m * n * m.min(n)) as u64,
            PolarTask {
                input: &input[i * m * n..(i + 1) * m * n],
                out: o,
                nuclear: nuclear[i].take(),
                rows: m,
                cols: n,
                failed,
            },
        ));
    }
    Ok(())
}

pub(super) fn orthogonalize(
    be: &CpuBackend,
    jobs: &mut [OrthogonalizeJob<'_, CpuBackend>],
) -> Result<()> {
    let failed = AtomicBool::new(false);
    {
        let mut t32 = Vec::new();
        let mut t64 = Vec::new();
        for job in jobs.iter_mut() {
            match job.input.dtype() {
                DType::F32 => polar_job::<f32>(job, &failed, &mut t32)?,
                DType::F64 => polar_job::<f64>(job, &failed, &mut t64)?,
            }
        }
        be.run(t32, polar_task, t64, polar_task);
    }
    if failed.into_inner() {
        return Err(Error::backend(
            "orthogonalize",
            "the SVD did not converge (non-finite gradient?)",
        ));
    }
    Ok(())
}
