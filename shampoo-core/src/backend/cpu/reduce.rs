//! Per-matrix reductions.

use super::linalg::CpuFloat;
use super::{CpuBackend, check_len, check_select, take_mut, typed, typed_mut};
use crate::backend::{ReduceJob, Reduction};
use crate::{DType, Result};

struct Task<'a, T> {
    input: &'a [T],
    out: &'a mut T,
    kind: Reduction,
}

fn run_task<T: CpuFloat>(t: Task<'_, T>) {
    *t.out = match t.kind {
        Reduction::SumSquares | Reduction::FrobeniusNorm => {
            let s = super::kernels::sum_squares(t.input);
            if t.kind == Reduction::FrobeniusNorm {
                T::from_f64(s.sqrt())
            } else {
                T::from_f64(s)
            }
        }
        Reduction::MaxAbsDevIdentity => {
            let n = (t.input.len() as f64).sqrt().round() as usize;
            let mut m = T::ZERO;
            let mut nan = false;
            for (k, &x) in t.input.iter().enumerate() {
                let e = if k / n == k % n { x - T::ONE } else { x }.abs();
                nan |= e.to_f64().is_nan();
                if e > m {
                    m = e;
                }
            }
            if nan { T::from_f64(f64::NAN) } else { m }
        }
        Reduction::AllFinite => {
            if t.input.iter().all(|x| x.is_finite()) {
                T::ONE
            } else {
                T::ZERO
            }
        }
        Reduction::Trace => {
            let n = side(t.input);
            let mut s = T::ZERO;
            for i in 0..n {
                s += t.input[i * n + i];
            }
            s
        }
        Reduction::MaxRowAbsSum => {
            let n = side(t.input);
            let mut m = T::ZERO;
            let mut nan = false;
            for row in t.input.chunks(n.max(1)) {
                let mut s = T::ZERO;
                for &x in row {
                    s += x.abs();
                }
                nan |= s.to_f64().is_nan();
                if s > m {
                    m = s;
                }
            }
            if nan { T::from_f64(f64::NAN) } else { m }
        }
        Reduction::OffDiagonalRatio => {
            let n = side(t.input);
            let all = super::kernels::sum_squares(t.input);
            let mut diag = 0.0f64;
            for i in 0..n {
                let d = t.input[i * n + i].to_f64();
                diag += d * d;
            }
            // As published: rounding can make `all - diag` negative, and
            // then the ratio is NaN (never below a tolerance).
            if all == 0.0 {
                T::ZERO
            } else {
                T::from_f64((all - diag).sqrt() / all.sqrt())
            }
        }
    };
}

/// The side of a square matrix stored in `m`.
fn side<T>(m: &[T]) -> usize {
    (m.len() as f64).sqrt().round() as usize
}

fn reduce_job<'a, T: CpuFloat>(
    job: &mut ReduceJob<'a, CpuBackend>,
    tasks: &mut Vec<(u64, Task<'a, T>)>,
) -> Result<()> {
    const OP: &str = "reduce";
    check_select(OP, job.select, job.count)?;
    let input = typed::<T>(job.input, OP)?;
    let out = typed_mut::<T>(take_mut(&mut job.out), OP)?;
    check_len(OP, "input", input.len(), job.count, job.numel)?;
    check_len(OP, "output", out.len(), job.count, 1)?;
    let mut keep = vec![job.select.is_none(); job.count];
    for &i in job.select.unwrap_or(&[]) {
        keep[i as usize] = true;
    }
    for (i, o) in out.iter_mut().enumerate() {
        if keep[i] {
            tasks.push((
                job.numel as u64,
                Task {
                    input: &input[i * job.numel..(i + 1) * job.numel],
                    out: o,
                    kind: job.kind,
                },
            ));
        }
    }
    Ok(())
}

pub(super) fn reduce(be: &CpuBackend, jobs: &mut [ReduceJob<'_, CpuBackend>]) -> Result<()> {
    let mut t32 = Vec::new();
    let mut t64 = Vec::new();
    for job in jobs.iter_mut() {
        match job.input.dtype() {
            DType::F32 => reduce_job::<f32>(job, &mut t32)?,
            DType::F64 => reduce_job::<f64>(job, &mut t64)?,
        }
    }
    be.run(t32, run_task, t64, run_task);
    Ok(())
}
