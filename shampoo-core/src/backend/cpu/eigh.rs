//! Batched symmetric eigendecomposition with faer, one matrix per task,
//! with a float64 retry when float32 fails.

use std::cell::RefCell;

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::{MatMut, MatRef, Par};

use super::linalg::CpuFloat;
use super::{CpuBackend, check_len, check_select, take_mut, typed_mut};
use crate::backend::{EighJob, EighStatus};
use crate::{DType, Result};

thread_local! {
    /// Per-thread scratch, grown to the largest request seen.
    static SCRATCH: RefCell<(usize, Option<MemBuffer>)> = const { RefCell::new((0, None)) };
}

pub(super) fn with_scratch<R>(req: StackReq, f: impl FnOnce(&mut MemStack) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut cell = cell.borrow_mut();
        let need = req.size_bytes();
        if cell.1.is_none() || cell.0 < need {
            *cell = (need, Some(MemBuffer::new(req)));
        }
        let buf = cell.1.as_mut().expect("scratch allocated");
        f(MemStack::new(buf))
    })
}

/// Eigendecomposition of the symmetric matrix whose lower triangle is in
/// `a` (row-major): eigenvalues ascending into `values`, eigenvectors
/// column-major into `a`. Returns whether faer succeeded.
fn eigh_in_place<T: CpuFloat>(a: &mut [T], values: &mut [T], n: usize) -> bool {
    let par = Par::Seq;
    let evd_req =
        evd::self_adjoint_evd_scratch::<T>(n, ComputeEigenvectors::Yes, par, Default::default());
    let req = StackReq::all_of(&[StackReq::new::<T>(n * n), evd_req]);
    with_scratch(req, |stack| {
        let (mut tmp, stack) = stack.make_with::<T>(n * n, |_| T::ZERO);
        tmp.copy_from_slice(a);
        let input = MatRef::from_row_major_slice(&tmp, n, n);
        let u = MatMut::from_column_major_slice_mut(a, n, n);
        let s = faer::diag::DiagMut::from_slice_mut(values);
        evd::self_adjoint_evd(input, s, Some(u), par, stack, Default::default()).is_ok()
    })
}

struct EighTask<'a, T> {
    a: &'a mut [T],
    values: &'a mut [T],
    status: &'a mut EighStatus,
    n: usize,
}

fn eigh_task<T: CpuFloat>(t: EighTask<'_, T>) {
    let n = t.n;
    let finite = (0..n).all(|i| t.a[i * n..i * n + i + 1].iter().all(|x| x.is_finite()));
    if !finite {
        *t.status = EighStatus::Failed;
        return;
    }
    if eigh_in_place(t.a, t.values, n) {
        *t.status = EighStatus::Ok;
        return;
    }
    if T::DTYPE == DType::F64 {
        *t.status = EighStatus::Failed;
        return;
    }
    // Retry in float64.
    let mut a64: Vec<f64> = t.a.iter().map(|x| x.to_f64()).collect();
    let mut v64 = vec![0.0f64; n];
    if eigh_in_place(&mut a64, &mut v64, n) {
        for (d, s) in t.a.iter_mut().zip(&a64) {
            *d = T::from_f64(*s);
        }
        for (d, s) in t.values.iter_mut().zip(&v64) {
            *d = T::from_f64(*s);
        }
        *t.status = EighStatus::RetriedF64;
    } else {
        *t.status = EighStatus::Failed;
    }
}

fn eigh_job<'a, T: CpuFloat>(
    job: &mut EighJob<'a, CpuBackend>,
    tasks: &mut Vec<(u64, EighTask<'a, T>)>,
) -> Result<()> {
    const OP: &str = "eigh";
    check_select(OP, job.select, job.count)?;
    let n = job.n;
    let a = typed_mut::<T>(take_mut(&mut job.a), OP)?;
    let values = typed_mut::<T>(take_mut(&mut job.values), OP)?;
    check_len(OP, "matrices", a.len(), job.count, n * n)?;
    check_len(OP, "values", values.len(), job.count, n)?;
    check_len(OP, "status", job.status.len(), job.count, 1)?;
    let status = std::mem::take(&mut job.status);
    let mut keep = vec![job.select.is_none(); job.count];
    for &i in job.select.unwrap_or(&[]) {
        keep[i as usize] = true;
    }
    let iter = a
        .chunks_mut(n * n)
        .zip(values.chunks_mut(n))
        .zip(status.iter_mut())
        .zip(keep);
    for (((a, values), status), keep) in iter {
        if keep {
            tasks.push((
                (n * n * n) as u64,
                EighTask {
                    a,
                    values,
                    status,
                    n,
                },
            ));
        }
    }
    Ok(())
}

pub(super) fn eigh(be: &CpuBackend, jobs: &mut [EighJob<'_, CpuBackend>]) -> Result<()> {
    let mut t32 = Vec::new();
    let mut t64 = Vec::new();
    for job in jobs.iter_mut() {
        if job.n == 0 {
            continue;
        }
        match job.a.dtype() {
            DType::F32 => eigh_job::<f32>(job, &mut t32)?,
            DType::F64 => eigh_job::<f64>(job, &mut t64)?,
        }
    }
    be.run(t32, eigh_task, t64, eigh_task);
    Ok(())
}
