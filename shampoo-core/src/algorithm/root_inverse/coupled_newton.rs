//! The coupled inverse Newton iteration (`p = 1/e`, an integer):
//! `z = (p + 1) / (2 ||A||_F)`, `X = z^(1/p) I`, `M = z A`; while
//! `max |M - I| > tol` and under the iteration cap:
//! `M' = (1 + 1/p) I - M / p`, `X <- X M'`, `M <- M'^p M` (`M'^p` by
//! binary exponentiation, as `torch.linalg.matrix_power`). Convergence is
//! decided per block; not converging within the cap is not a failure.

use super::products::{Product, power_plan, products};
use crate::Result;
use crate::algorithm::Shampoo;
use crate::algorithm::state::{FactorState, Role, active_factors, download_f64, pick3};
use crate::backend::{Backend, EighStatus, Map, ReduceJob, Reduction, ViewMutOps};

/// The coupled inverse Newton iteration, batched; per-block convergence.
pub(super) fn coupled_newton<B: Backend>(
    opt: &mut Shampoo<B>,
    max_iterations: u32,
    tolerance: f64,
) -> Result<()> {
    let backend = &opt.backend;
    let fdtype = opt.config.factor_dtype_for(opt.dtype);
    // ||A||_F into `values`.
    let mut jobs: Vec<ReduceJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let n = f.spec.size;
            let (norms, _) = backend.view_mut(&mut f.values).split_at(count);
            ReduceJob {
                input: backend.view(&f.work),
                numel: n * n,
                count,
                kind: Reduction::FrobeniusNorm,
                out: norms,
                select,
            }
        })
        .collect();
    backend.reduce(&mut jobs)?;
    drop(jobs);
    // X = z^(1/p) I, M = z A; every active block iterates.
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            f.roles = [0, 1, 2, 3, 4, 5];
            f.accept.clear();
            match select {
                Some(s) => f.accept.extend_from_slice(s),
                None => f.accept.extend(0..count as u32),
            }
            let FactorState {
                work,
                values,
                scratch,
                spec,
                ..
            } = f;
            let (x, rest) = scratch.split_at_mut(1);
            Map::NewtonInit {
                a: backend.view(work),
                norms: backend.view(values),
                x: backend.view_mut(&mut x[0]),
                m: backend.view_mut(&mut rest[0]),
                p: (1.0 / spec.exponent).round() as u32,
                n: spec.size,
                count,
                select,
            }
        })
        .collect();
    backend.map(&mut jobs)?;
    drop(jobs);
    let mut iteration = 0u32;
    loop {
        let backend = &opt.backend;
        // Errors max |M - I| into the flags' second half, read back.
        let mut jobs: Vec<ReduceJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
            .filter(|(f, _, _)| !f.accept.is_empty())
            .map(|(f, count, _)| {
                let n = f.spec.size;
                let m = f.roles[Role::M as usize];
                let FactorState {
                    flags,
                    scratch,
                    accept,
                    ..
                } = f;
                let (_, second) = backend.view_mut(flags).split_at(count);
                ReduceJob {
                    input: backend.view(&scratch[m]),
                    numel: n * n,
                    count,
                    kind: Reduction::MaxAbsDevIdentity,
                    out: second,
                    select: Some(&accept[..]),
                }
            })
            .collect();
        backend.reduce(&mut jobs)?;
        drop(jobs);
        let mut any = false;
        for (f, count, _) in active_factors(&mut opt.groups, &opt.layout) {
            if f.accept.is_empty() {
                continue;
            }
            download_f64(backend, backend.view(&f.flags), &mut f.host_flags, fdtype)?;
            let errors = &f.host_flags[count..];
            // NaN errors stop iterating; the finiteness check reports them.
            f.accept.retain(|&s| errors[s as usize] > tolerance);
            if iteration == max_iterations && !f.accept.is_empty() {
                tracing::warn!(
                    dim = f.spec.dim,
                    blocks = f.accept.len(),
                    max_iterations,
                    "coupled Newton reached max_iterations without converging"
                );
                f.accept.clear();
            }
            any |= !f.accept.is_empty();
        }
        if !any {
            break;
        }
        iteration += 1;
        newton_iteration(opt)?;
    }
    // Every active block produced a root (convergence is not a failure).
    for (f, _, select) in active_factors(&mut opt.groups, &opt.layout) {
        match select {
            Some(s) => {
                f.status.fill(EighStatus::Skipped);
                s.iter()
                    .for_each(|&i| f.status[i as usize] = EighStatus::Ok);
            }
            None => f.status.fill(EighStatus::Ok),
        }
    }
    Ok(())
}

/// One iteration on the blocks in each factor's `accept` list.
fn newton_iteration<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    // M' = M (-1/p) + (1 + 1/p) I
    {
        let backend = &opt.backend;
        let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
            .filter(|(f, _, _)| !f.accept.is_empty())
            .map(|(f, count, _)| {
                let (m, mp) = (f.roles[Role::M as usize], f.roles[Role::Mp as usize]);
                let p = (1.0 / f.spec.exponent).round() as u32;
                let n = f.spec.size;
                let FactorState {
                    scratch, accept, ..
                } = f;
                let (src, _, dst) = pick3(scratch, m, m, mp);
                Map::NewtonCoefficient {
                    m: backend.view(src),
                    out: backend.view_mut(dst),
                    p,
                    n,
                    count,
                    select: Some(&accept[..]),
                }
            })
            .collect();
        backend.map(&mut jobs)?;
    }
    // X <- X M'
    products(opt, |_| Some(Product::Mul(Role::X, Role::Mp, Role::X)))?;
    // R = M'^p by binary exponentiation: Z starts as M'.
    products(opt, |_| Some(Product::Copy(Role::Mp, Role::Z)))?;
    let plans: Vec<Vec<Product>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, _, _)| power_plan((1.0 / f.spec.exponent).round() as u32))
        .collect();
    let longest = plans.iter().map(Vec::len).max().unwrap_or(0);
    for step in 0..longest {
        let mut i = 0;
        products(opt, |_| {
            let p = plans[i].get(step).copied();
            i += 1;
            p
        })?;
    }
    // M <- R M
    products(opt, |_| Some(Product::Mul(Role::R, Role::M, Role::M)))
}
