//! The coupled inverse Newton iteration (`p = 1/e`, an integer):
//! `z = (p + 1) / (2 ||A||_F)`, `X = z^(1/p) I`, `M = z A`; while
//! `max |M - I| > tol` and under the iteration cap:
//! `M' = (1 + 1/p) I - M / p`, `X <- X M'`, `M <- M'^p M` (`M'^p` by
//! binary exponentiation, as `torch.linalg.matrix_power`). Convergence is
//! decided per block; not converging within the cap is not a failure.
//!
//! The start and the Newton step are shared with the higher-order method.

use super::products::{Product, power_plan, products};
use super::{Section, flag_section, reduce_into_values};
use crate::Result;
use crate::algorithm::Shampoo;
use crate::algorithm::state::{FactorState, Role, active_factors, download_f64, pick2_mut};
use crate::backend::{Backend, EighStatus, Map, ReduceJob, Reduction};
use crate::layout::FactorSpec;

/// The integer root `p` of a coupled Newton factor.
pub(super) fn newton_root(spec: &FactorSpec) -> u32 {
    (1.0 / spec.exponent).round() as u32
}

/// The coupled inverse Newton iteration, batched; per-block convergence.
pub(super) fn coupled_newton<B: Backend>(
    opt: &mut Shampoo<B>,
    max_iterations: u32,
    tolerance: f64,
) -> Result<()> {
    // ||A||_F into `values`; X = z^(1/p) I, M = z A.
    reduce_into_values(opt, Reduction::FrobeniusNorm)?;
    start(opt, |p| p as f64 + 1.0, 2.0, &newton_root)?;
    let mut iteration = 0u32;
    loop {
        errors(opt)?;
        let mut any = false;
        for (f, count, _) in active_factors(&mut opt.groups, &opt.layout) {
            if f.accept.is_empty() {
                continue;
            }
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
        newton_step(opt, &newton_root)?;
    }
    // Every active block produced a root (convergence is not a failure).
    set_status(opt);
    Ok(())
}

/// Marks every active block's computation as done (`Ok`).
pub(super) fn set_status<B: Backend>(opt: &mut Shampoo<B>) {
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
}

/// The coupled iterations' start, for every active block (which all go in
/// each factor's `accept` list): with `s` the block's scalar in `values`,
/// `z = numerator(p) / (scale * s)`, `X = z^(1/p) I`, `M = z A` (`A` in
/// `work`).
pub(super) fn start<B: Backend>(
    opt: &mut Shampoo<B>,
    numerator: impl Fn(u32) -> f64,
    scale: f64,
    root: &dyn Fn(&FactorSpec) -> u32,
) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            f.roles = std::array::from_fn(|i| i);
            f.accept.clear();
            match select {
                Some(s) => f.accept.extend_from_slice(s),
                None => f.accept.extend(0..count as u32),
            }
            let p = root(&f.spec);
            let FactorState {
                work,
                values,
                scratch,
                spec,
                ..
            } = f;
            let (xs, ms) = pick2_mut(scratch, Role::X as usize, Role::M as usize);
            Map::NewtonInit {
                a: backend.view(work),
                norms: backend.view(values),
                numerator: numerator(p),
                scale,
                x: backend.view_mut(xs),
                m: backend.view_mut(ms),
                p,
                n: spec.size,
                count,
                select,
            }
        })
        .collect();
    backend.map(&mut jobs)
}

/// `max |M - I|` of each factor's iterating blocks into the second half of
/// its flags, read back into `host_flags`.
pub(super) fn errors<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    max_dev_identity(opt, Role::M)
}

/// `max |role - I|` of each factor's blocks in `accept` into the second
/// half of its flags, read back into `host_flags` (one synchronisation).
pub(super) fn max_dev_identity<B: Backend>(opt: &mut Shampoo<B>, role: Role) -> Result<()> {
    reduce_role(opt, role, Reduction::MaxAbsDevIdentity)
}

/// A per-matrix reduction of each factor's `role` matrices of the blocks in
/// `accept` into the second section of its flags, read back into
/// `host_flags` (one synchronisation).
pub(super) fn reduce_role<B: Backend>(
    opt: &mut Shampoo<B>,
    role: Role,
    kind: Reduction,
) -> Result<()> {
    reduce_role_into(opt, role, kind, Section::Output)?;
    let backend = &opt.backend;
    let fdtype = opt.config.factor_dtype_for(opt.dtype);
    for (f, _, _) in active_factors(&mut opt.groups, &opt.layout) {
        if !f.accept.is_empty() {
            download_f64(backend, backend.view(&f.flags), &mut f.host_flags, fdtype)?;
        }
    }
    Ok(())
}

/// A per-matrix reduction of each factor's `role` matrices of the blocks in
/// `accept` into `section` of its flags, left on the device (no read-back).
pub(super) fn reduce_role_into<B: Backend>(
    opt: &mut Shampoo<B>,
    role: Role,
    kind: Reduction,
    section: Section,
) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<ReduceJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .filter(|(f, _, _)| !f.accept.is_empty())
        .map(|(f, count, _)| {
            let n = f.spec.size;
            let m = f.roles[role as usize];
            let FactorState {
                flags,
                scratch,
                accept,
                ..
            } = f;
            ReduceJob {
                input: backend.view(&scratch[m]),
                numel: n * n,
                count,
                kind,
                out: flag_section(backend, flags, count, section),
                select: Some(&accept[..]),
            }
        })
        .collect();
    backend.reduce(&mut jobs)
}

/// One Newton step on the blocks in each factor's `accept` list:
/// `M' = M (-1/p) + (1 + 1/p) I`, `X <- X M'`, `M <- M'^p M`.
pub(super) fn newton_step<B: Backend>(
    opt: &mut Shampoo<B>,
    root: &dyn Fn(&FactorSpec) -> u32,
) -> Result<()> {
    products(opt, |f| {
        let alpha = -1.0 / root(&f.spec) as f64;
        Some(Product::Affine(Role::M, Role::Mp, alpha, 1.0 - alpha))
    })?;
    // X <- X M'
    products(opt, |_| Some(Product::Mul(Role::X, Role::Mp, Role::X)))?;
    // M <- M'^p M
    power(opt, Role::Mp, root)?;
    products(opt, |_| Some(Product::Mul(Role::R, Role::M, Role::M)))
}

/// `R = base^p` by binary exponentiation (through `Z`), for the blocks in
/// each factor's `accept` list.
pub(super) fn power<B: Backend>(
    opt: &mut Shampoo<B>,
    base: Role,
    exponent: &dyn Fn(&FactorSpec) -> u32,
) -> Result<()> {
    products(opt, |_| Some(Product::Copy(base, Role::Z)))?;
    let plans: Vec<Vec<Product>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, _, _)| power_plan(exponent(&f.spec)))
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
    Ok(())
}
