//! Step 3: root inverses (or eigenbases), on root-inverse steps.
//!
//! For each factor, with `bc2` this step's bias correction:
//! `A = L / bc2 + eps I`, then
//! - **eigh**: `A = Q diag(lambda) Q^T`; if `min lambda < eps`, every
//!   eigenvalue is shifted by `eps - min lambda`; `X = Q diag(lambda^-e) Q^T`,
//!   formed as `W^T W` with `W = diag(lambda^(-e/2)) Q^T` (half the products);
//! - **coupled Newton** (`p = 1/e`): `z = (p + 1) / (2 ||A||_F)`,
//!   `X = z^(1/p) I`, `M = z A`; while `max |M - I| > tol` and under the
//!   iteration cap: `M' = (1 + 1/p) I - M / p`, `X <- X M'`, `M <- M'^p M`
//!   (`M'^p` by binary exponentiation, as `torch.linalg.matrix_power`);
//! - **eigenvalue-corrected**: the eigenvectors `Q` of `A` are the basis.
//!
//! Failure semantics: NaN/Inf in `A` or in the result is an error; an
//! eigensolver failure (after the float64 retry) keeps the previous root and
//! counts; more than [`MAX_CONSECUTIVE_FAILURES`] in a row is an error.
//! The checks of a root-inverse step happen after one synchronisation
//! (coupled Newton also reads its errors once per iteration).

use super::Shampoo;
use super::state::{FactorState, Role, active_factors, download_f64, pick3};
use crate::backend::{
    Backend, EighJob, EighStatus, GramJob, Map, MatmulJob, ReduceJob, Reduction, ViewMutOps,
};
use crate::config::{Preconditioner, RootInverse};
use crate::error::MatrixKind;
use crate::schedule::StepScalars;
use crate::{Error, Result};

/// Consecutive solver failures tolerated per factor.
pub const MAX_CONSECUTIVE_FAILURES: u32 = 3;

/// Runs the configured root inverse for every active block.
pub(super) fn compute<B: Backend>(opt: &mut Shampoo<B>, sc: &StepScalars) -> Result<()> {
    damped_factors(opt, sc)?;
    finite_flags(opt, Half::Input, Which::Work)?;
    match opt.config.preconditioner.clone() {
        Preconditioner::EigenvalueCorrected => {
            eigh(opt)?;
            finite_flags(opt, Half::Output, Which::Work)?;
            accept(opt, sc, Which::Work)
        }
        Preconditioner::RootInv {
            root_inverse: RootInverse::Eigh,
            ..
        } => {
            eigh(opt)?;
            eigh_inverse_root(opt)?;
            finite_flags(opt, Half::Output, Which::X)?;
            accept(opt, sc, Which::X)
        }
        Preconditioner::RootInv {
            root_inverse:
                RootInverse::CoupledNewton {
                    max_iterations,
                    tolerance,
                },
            ..
        } => {
            coupled_newton(opt, max_iterations, tolerance)?;
            finite_flags(opt, Half::Output, Which::X)?;
            accept(opt, sc, Which::X)
        }
    }
}

/// `A = L / bc2 + eps I` (full, symmetric) into each factor's work buffer.
fn damped_factors<B: Backend>(opt: &mut Shampoo<B>, sc: &StepScalars) -> Result<()> {
    let eps = opt.config.epsilon;
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| Map::RootInput {
            factors: backend.view(&f.stats),
            out: backend.view_mut(&mut f.work),
            n: f.spec.size,
            count,
            divisor: sc.bc2,
            eps,
            select,
        })
        .collect();
    backend.map(&mut jobs)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    Input,
    Output,
}

/// Which matrices of a factor hold a result.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    /// The work buffer (damped factor, then eigenvectors).
    Work,
    /// The candidate root.
    X,
}

/// Splits a factor into its flags (exclusive) and the `which` matrices.
fn flags_and<B: Backend>(f: &mut FactorState<B>, which: Which) -> (&mut B::Buffer, &B::Buffer) {
    let x = f.roles[Role::X as usize];
    let FactorState {
        flags,
        work,
        scratch,
        ..
    } = f;
    let m = match which {
        Which::Work => &*work,
        Which::X => &scratch[x],
    };
    (flags, m)
}

/// Finiteness of each factor's `which` matrices into one half of its flags.
fn finite_flags<B: Backend>(opt: &mut Shampoo<B>, half: Half, which: Which) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<ReduceJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let n = f.spec.size;
            let (flags, input) = flags_and(f, which);
            let (first, second) = backend.view_mut(flags).split_at(count);
            ReduceJob {
                input: backend.view(input),
                numel: n * n,
                count,
                kind: Reduction::AllFinite,
                out: if half == Half::Input { first } else { second },
                select,
            }
        })
        .collect();
    backend.reduce(&mut jobs)
}

/// In-place eigendecomposition of each factor's work buffer.
fn eigh<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<EighJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let FactorState {
                work,
                values,
                status,
                spec,
                ..
            } = f;
            status.fill(EighStatus::Skipped);
            EighJob {
                a: backend.view_mut(work),
                values: backend.view_mut(values),
                n: spec.size,
                count,
                status,
                select,
            }
        })
        .collect();
    backend.eigh(&mut jobs)
}

/// `X = W^T W` with `W = diag(shifted lambda^(-e/2)) Q^T` into `Role::X`.
fn eigh_inverse_root<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    let eps = opt.config.epsilon;
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| Map::EigenPower {
            values: backend.view_mut(&mut f.values),
            n: f.spec.size,
            count,
            eps,
            exponent: f.spec.exponent,
            half: true,
            select,
        })
        .collect();
    backend.map(&mut jobs)?;
    drop(jobs);
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| Map::ScaleRows {
            x: backend.view_mut(&mut f.work),
            d: backend.view(&f.values),
            n: f.spec.size,
            count,
            select,
        })
        .collect();
    backend.map(&mut jobs)?;
    drop(jobs);
    let mut jobs: Vec<GramJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let x = f.roles[Role::X as usize];
            let FactorState {
                work,
                scratch,
                square,
                ..
            } = f;
            GramJob {
                input: backend.view(work),
                dims: &square[..],
                count,
                mode: 1,
                out: backend.view_mut(&mut scratch[x]),
                beta: 0.0,
                alpha: 1.0,
                full: true,
                // Roots are formed in full precision.
                tf32: false,
                select,
            }
        })
        .collect();
    backend.mode_gram(&mut jobs)
}

/// Reads all flags with one synchronisation, applies the failure rules and
/// copies accepted results (from `which`) into the roots.
fn accept<B: Backend>(opt: &mut Shampoo<B>, sc: &StepScalars, which: Which) -> Result<()> {
    let backend = &opt.backend;
    let fdtype = opt.config.factor_dtype_for(opt.dtype);
    for (g, spec) in opt.groups.iter_mut().zip(&opt.layout.groups) {
        if !g.any_active {
            continue;
        }
        let count = spec.count();
        for f in g.factors.iter_mut() {
            download_f64(backend, backend.view(&f.flags), &mut f.host_flags, fdtype)?;
            f.accept.clear();
            let slots: Box<dyn Iterator<Item = u32>> = match g.active.as_deref() {
                Some(s) => Box::new(s.iter().copied()),
                None => Box::new(0..count as u32),
            };
            for slot in slots {
                let s = slot as usize;
                let block = spec.blocks[s];
                let info = &opt.layout.blocks[block];
                let nonfinite = |kind| Error::NonFinite {
                    kind,
                    block,
                    param: info.param,
                    shape: info.dims.clone(),
                    dim: f.spec.dim,
                    step: sc.t,
                };
                if f.host_flags[s] == 0.0 {
                    return Err(nonfinite(MatrixKind::Factor));
                }
                if f.status[s] == EighStatus::Failed {
                    f.failures[s] += 1;
                    f.counters[s].failures += 1;
                    tracing::warn!(
                        block,
                        dim = f.spec.dim,
                        failures = f.failures[s],
                        "eigendecomposition failed; keeping the previous root"
                    );
                    if f.failures[s] > MAX_CONSECUTIVE_FAILURES {
                        return Err(Error::RootInverseFailed {
                            block,
                            param: info.param,
                            shape: info.dims.clone(),
                            dim: f.spec.dim,
                            failures: f.failures[s],
                            step: sc.t,
                        });
                    }
                    f.counters[s].kept_previous += 1;
                    continue;
                }
                if f.host_flags[count + s] == 0.0 {
                    return Err(nonfinite(MatrixKind::Root));
                }
                if f.status[s] == EighStatus::RetriedF64 {
                    f.counters[s].f64_retries += 1;
                    tracing::warn!(
                        block,
                        dim = f.spec.dim,
                        "eigendecomposition needed the float64 retry"
                    );
                }
                f.failures[s] = 0;
                f.accept.push(slot);
            }
        }
    }
    // Copy accepted results into the roots (casting to the parameter dtype).
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .filter(|(f, _, _)| !f.accept.is_empty())
        .map(|(f, count, _)| {
            let n = f.spec.size;
            let x = f.roles[Role::X as usize];
            let FactorState {
                root,
                accept,
                work,
                scratch,
                ..
            } = f;
            let src = match which {
                Which::Work => &*work,
                Which::X => &scratch[x],
            };
            Map::Copy {
                src: backend.view(src),
                dst: backend.view_mut(root),
                numel: n * n,
                count,
                select: Some(&accept[..]),
            }
        })
        .collect();
    backend.map(&mut jobs)
}

/// The coupled inverse Newton iteration, batched; per-block convergence.
fn coupled_newton<B: Backend>(
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

/// One matrix operation per factor, on its still-iterating blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Product {
    /// `c <- a b` (through `T`, then the roles of `c` and `T` swap).
    Mul(Role, Role, Role),
    /// `b <- a`.
    Copy(Role, Role),
}

/// `torch.linalg.matrix_power`'s binary exponentiation over `Z` (holding
/// `M'`) into `R`.
fn power_plan(p: u32) -> Vec<Product> {
    let mut plan = Vec::new();
    let mut n = p;
    let mut first_z = true;
    let mut have_result = false;
    while n > 0 {
        if !first_z {
            plan.push(Product::Mul(Role::Z, Role::Z, Role::Z));
        }
        first_z = false;
        if n % 2 == 1 {
            plan.push(if have_result {
                Product::Mul(Role::R, Role::Z, Role::R)
            } else {
                Product::Copy(Role::Z, Role::R)
            });
            have_result = true;
        }
        n /= 2;
    }
    plan
}

/// Runs `op(factor)` for every still-iterating factor (the closure is called
/// once per active factor, in order, including those with nothing to do).
fn products<B: Backend>(
    opt: &mut Shampoo<B>,
    mut op: impl FnMut(&FactorState<B>) -> Option<Product>,
) -> Result<()> {
    let backend = &opt.backend;
    let mut muls: Vec<MatmulJob<'_, B>> = Vec::new();
    let mut copies: Vec<Map<'_, B>> = Vec::new();
    let mut swaps: Vec<(usize, Role)> = Vec::new();
    for (i, (f, count, _)) in active_factors(&mut opt.groups, &opt.layout).enumerate() {
        let Some(product) = op(f) else { continue };
        if f.accept.is_empty() {
            continue;
        }
        let n = f.spec.size;
        let roles = f.roles;
        let FactorState {
            scratch, accept, ..
        } = f;
        let select = Some(&accept[..]);
        match product {
            Product::Mul(a, b, c) => {
                let (a, b, t) = pick3(
                    scratch,
                    roles[a as usize],
                    roles[b as usize],
                    roles[Role::T as usize],
                );
                muls.push(MatmulJob {
                    a: backend.view(a),
                    b: backend.view(b),
                    c: backend.view_mut(t),
                    n,
                    count,
                    trans_a: false,
                    trans_b: false,
                    alpha: 1.0,
                    accumulate: false,
                    // Newton iterations are formed in full precision.
                    tf32: false,
                    select,
                });
                swaps.push((i, c));
            }
            Product::Copy(a, b) => {
                let (src, _, dst) = pick3(
                    scratch,
                    roles[a as usize],
                    roles[a as usize],
                    roles[b as usize],
                );
                copies.push(Map::Copy {
                    src: backend.view(src),
                    dst: backend.view_mut(dst),
                    numel: n * n,
                    count,
                    select,
                });
            }
        }
    }
    backend.matmul(&mut muls)?;
    backend.map(&mut copies)?;
    drop(muls);
    drop(copies);
    // The product landed in T: it now plays the target's role.
    for (i, (f, _, _)) in active_factors(&mut opt.groups, &opt.layout).enumerate() {
        for &(j, role) in &swaps {
            if i == j {
                f.swap(role, Role::T);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn power_by_plan(p: u32, base: f64) -> f64 {
        // Simulate the plan on scalars.
        let mut z = base;
        let mut r = f64::NAN;
        for step in power_plan(p) {
            match step {
                Product::Mul(Role::Z, Role::Z, Role::Z) => z *= z,
                Product::Mul(Role::R, Role::Z, Role::R) => r *= z,
                Product::Copy(Role::Z, Role::R) => r = z,
                other => panic!("unexpected {other:?}"),
            }
        }
        r
    }

    #[test]
    fn binary_exponentiation_plan_computes_powers() {
        for p in 1..=9 {
            assert_eq!(power_by_plan(p, 1.5), 1.5f64.powi(p as i32), "p = {p}");
        }
        assert_eq!(power_plan(4).len(), 3, "square, square, take");
    }
}
