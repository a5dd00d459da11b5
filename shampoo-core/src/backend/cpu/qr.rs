//! Batched QR factorization with faer (Householder, no pivoting), one
//! matrix per task, in per-thread scratch.

use faer::dyn_stack::StackReq;
use faer::linalg::householder;
use faer::linalg::qr::no_pivoting::factor;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Conj, MatMut, Par};

use super::eigh::with_scratch;
use super::linalg::CpuFloat;
use super::{CpuBackend, check_len, check_select, chunks, take_mut, typed_mut};
use crate::backend::QrJob;
use crate::{DType, Result};

struct QrTask<'a, T> {
    a: &'a mut [T],
    r: &'a mut [T],
    n: usize,
}

/// `a = Q R`: `a` (row-major) is replaced by `Q`, `r` receives `R`.
fn qr_task<T: CpuFloat>(t: QrTask<'_, T>) {
    let n = t.n;
    if n == 0 {
        return;
    }
    let par = Par::Seq;
    let bs = factor::recommended_block_size::<T>(n, n);
    let req = StackReq::all_of(&[
        StackReq::new::<T>(n * n),
        StackReq::new::<T>(bs * n),
        factor::qr_in_place_scratch::<T>(n, n, bs, par, Default::default()),
        householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<T>(n, bs, n),
    ]);
    with_scratch(req, |stack| {
        let (mut qr, stack) = stack.make_with::<T>(n * n, |_| T::ZERO);
        let (mut coeff, stack) = stack.make_with::<T>(bs * n, |_| T::ZERO);
        // Column-major working copy of the row-major input.
        for i in 0..n {
            for j in 0..n {
                qr[j * n + i] = t.a[i * n + j];
            }
        }
        let mut m = MatMut::from_column_major_slice_mut(&mut qr, n, n);
        let mut c = MatMut::from_column_major_slice_mut(&mut coeff, bs, n);
        factor::qr_in_place(m.rb_mut(), c.rb_mut(), par, stack, Default::default());
        // R is the upper triangle; the Householder basis is the unit lower
        // triangle.
        for i in 0..n {
            for j in 0..n {
                t.r[i * n + j] = if j >= i { m[(i, j)] } else { T::ZERO };
            }
        }
        for j in 0..n {
            for i in 0..=j {
                m[(i, j)] = if i == j { T::ONE } else { T::ZERO };
            }
        }
        t.a.fill(T::ZERO);
        for i in 0..n {
            t.a[i * n + i] = T::ONE;
        }
        let q = MatMut::from_row_major_slice_mut(t.a, n, n);
        householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
            m.rb(),
            c.rb(),
            Conj::No,
            q,
            par,
            stack,
        );
    });
}

fn qr_job<'a, T: CpuFloat>(
    job: &mut QrJob<'a, CpuBackend>,
    tasks: &mut Vec<(u64, QrTask<'a, T>)>,
) -> Result<()> {
    const OP: &str = "qr";
    check_select(OP, job.select, job.count)?;
    let n = job.n;
    let a = typed_mut::<T>(take_mut(&mut job.a), OP)?;
    let r = typed_mut::<T>(take_mut(&mut job.r), OP)?;
    check_len(OP, "matrices", a.len(), job.count, n * n)?;
    check_len(OP, "r", r.len(), job.count, n * n)?;
    let mut rs: Vec<Option<&'a mut [T]>> = r.chunks_mut(n * n).map(Some).collect();
    for (i, a) in chunks(a, n * n, job.select) {
        let r = rs[i].take().expect("one task per matrix");
        tasks.push(((n * n * n) as u64, QrTask { a, r, n }));
    }
    Ok(())
}

pub(super) fn qr(be: &CpuBackend, jobs: &mut [QrJob<'_, CpuBackend>]) -> Result<()> {
    let mut t32 = Vec::new();
    let mut t64 = Vec::new();
    for job in jobs.iter_mut() {
        match job.a.dtype() {
            DType::F32 => qr_job::<f32>(job, &mut t32)?,
            DType::F64 => qr_job::<f64>(job, &mut t64)?,
        }
    }
    be.run(t32, qr_task, t64, qr_task);
    Ok(())
}
