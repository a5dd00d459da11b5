//! Step 3: the amortized matrix functions of the factors, on root-inverse
//! steps.
//!
//! For each factor, with `bc2` this step's bias correction, the input is
//! `A = L / bc2`, scaled by `max(trace A, eps)^-tau` with trace scaling
//! ([`input`]), then:
//!
//! - **root inverses** `X = A^-e` ([`Amortized::RootInverse`]):
//!   - [`eigh`]: `A + eps I = Q diag(lambda) Q^T` (or `A` itself when the
//!     damping comes after, or for the pseudo-inverse), the eigenvalues
//!     made safe by the [`rank_deficient`] rule, `X = Q diag(h) Q^T`;
//!   - [`coupled_newton`]: `p = 1/e` an integer; `z = (p + 1) / (2
//!     ||A + eps I||_F)`, `X = z^(1/p) I`, `M = z A`, then
//!     `M' = (1 + 1/p) I - M / p`, `X <- X M'`, `M <- M'^p M` until
//!     `max |M - I| <= tol`;
//!   - [`batched_newton`]: the coupled Newton step a fixed number of times
//!     for every block, from `z = (p + 1) / (2 s)` with
//!     `s = trace(B^8)^(1/8) ||A||_F >= lambda_max(A)` (`B = A / ||A||_F`),
//!     and no read-back inside; the final `max |M - I|` is checked against
//!     the tolerance with the finiteness flags;
//!   - [`coupled_higher_order`]: `1/e = p/q`; the same coupled iteration
//!     with a ridge relative to `||A||_inf`, `z = 1 / trace`, and Horner
//!     steps of the given order after the first Newton step; `X^q` at the
//!     end;
//! - **eigenpairs** (eigendecomposed Shampoo, [`Amortized::Eigenpairs`]):
//!   `(Q, lambda)` of `A (+ eps I)` by [`eigendecomposition`] (eigh,
//!   adaptive eigh, or warm-started [`qr`]) are kept, and `X` is formed from
//!   them with the [`rank_deficient`] rule;
//! - **eigenbases** (eigenvalue-corrected Shampoo,
//!   [`Amortized::Eigenbasis`]): the eigenvectors `Q` of `A + eps I`.
//!
//! The [`failures`] rules decide which results replace the current ones:
//! NaN/Inf in `A` or in a result is an error (for the batched Newton
//! iteration a non-finite result is a failure); a solver failure keeps the
//! previous result and counts; more than
//! [`failures::MAX_CONSECUTIVE_FAILURES`] in a row is an error. The checks
//! of a step happen after one synchronisation (the other iterations also
//! read their errors once per iteration; the batched Newton iteration does
//! not).

mod batched_newton;
mod coupled_higher_order;
mod coupled_newton;
mod eigendecomposition;
mod eigh;
mod failures;
mod products;
mod qr;
pub(crate) mod rank_deficient;

use super::Shampoo;
use super::state::{FactorState, Role, active_factors};
use crate::Result;
use crate::backend::{Backend, Map, ReduceJob, Reduction, ViewMutOps};
use crate::config::{Amortized, RootInverse};
use crate::schedule::StepScalars;

/// Runs the configured amortized computation for every active block.
pub(super) fn compute<B: Backend>(opt: &mut Shampoo<B>, sc: &StepScalars) -> Result<()> {
    let eps = opt.config.epsilon;
    let before = opt.config.rank_deficient_stability().perturbs_before();
    match opt.config.amortized() {
        Amortized::RootInverse(RootInverse::Eigh { .. }) => {
            input(opt, sc, if before { eps } else { 0.0 })?;
            finite_flags(opt, Section::Input, Which::Work)?;
            eigh::eigh(opt)?;
            eigh::eigh_inverse_root(opt)?;
            finite_flags(opt, Section::Output, Which::X)?;
            failures::check(opt, sc, None)?;
            commit(opt, Which::X)
        }
        Amortized::RootInverse(RootInverse::CoupledNewton {
            max_iterations,
            tolerance,
        }) => {
            input(opt, sc, eps)?;
            finite_flags(opt, Section::Input, Which::Work)?;
            coupled_newton::coupled_newton(opt, max_iterations, tolerance)?;
            finite_flags(opt, Section::Output, Which::X)?;
            failures::check(opt, sc, None)?;
            commit(opt, Which::X)
        }
        Amortized::RootInverse(RootInverse::BatchedNewton {
            iterations,
            tolerance,
        }) => {
            input(opt, sc, eps)?;
            finite_flags(opt, Section::Input, Which::Work)?;
            batched_newton::compute(opt, iterations)?;
            finite_flags(opt, Section::Output, Which::X)?;
            // The one read-back of the step: flags and residuals together.
            failures::check(opt, sc, Some(tolerance))?;
            commit(opt, Which::X)
        }
        Amortized::RootInverse(method @ RootInverse::CoupledHigherOrder { .. }) => {
            // The group epsilon is not used: the iteration has its ridge.
            input(opt, sc, 0.0)?;
            finite_flags(opt, Section::Input, Which::Work)?;
            coupled_higher_order::compute(opt, method)?;
            finite_flags(opt, Section::Output, Which::X)?;
            failures::check(opt, sc, None)?;
            commit(opt, Which::X)
        }
        Amortized::Eigenpairs(method) => {
            input(opt, sc, if before { eps } else { 0.0 })?;
            finite_flags(opt, Section::Input, Which::Work)?;
            eigendecomposition::compute(opt, method, Current::Eigenpairs)?;
            eigh::form_roots(opt, Source::Candidate)?;
            finite_flags(opt, Section::Output, Which::X)?;
            failures::check(opt, sc, None)?;
            commit_eigenpairs(opt)?;
            commit(opt, Which::X)
        }
        Amortized::Eigenbasis(method) => {
            input(opt, sc, if before { eps } else { 0.0 })?;
            finite_flags(opt, Section::Input, Which::Work)?;
            eigendecomposition::compute(opt, method, Current::Root)?;
            finite_flags(opt, Section::Output, Which::Work)?;
            failures::check(opt, sc, None)?;
            commit(opt, Which::Work)
        }
        Amortized::None => Ok(()),
    }
}

pub(super) use coupled_higher_order::check_roots as check_higher_order_roots;

/// Forms every block's root from its kept eigenpairs (eigendecomposed
/// Shampoo; at construction and after loading a checkpoint).
pub(crate) fn form_all_roots<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    if !matches!(opt.config.amortized(), Amortized::Eigenpairs(_)) {
        return Ok(());
    }
    for g in opt.groups.iter_mut() {
        g.active = None;
        g.any_active = true;
    }
    eigh::form_roots(opt, Source::Kept)?;
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, _)| {
            let n = f.spec.size;
            let x = f.roles[Role::X as usize];
            Map::Copy {
                src: backend.view(&f.scratch[x]),
                dst: backend.view_mut(&mut f.root),
                numel: n * n,
                count,
                select: None,
            }
        })
        .collect();
    backend.map(&mut jobs)
}

/// Where the current eigenvectors of a factor are kept.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Current {
    /// `FactorState::eigen` (eigendecomposed Shampoo).
    Eigenpairs,
    /// `FactorState::root` (eigenvalue-corrected Shampoo's basis).
    Root,
}

/// Which eigenpairs a root is formed from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// This step's candidates (`work`, `values`).
    Candidate,
    /// The kept ones (`FactorState::eigen`).
    Kept,
}

/// `A = L / bc2` (full, symmetric) into each factor's work buffer, trace
/// scaled when configured, plus `damping I`.
fn input<B: Backend>(opt: &mut Shampoo<B>, sc: &StepScalars, damping: f64) -> Result<()> {
    let trace = opt.config.shampoo_options().and_then(|o| o.trace_scaling);
    let eps = opt.config.epsilon;
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| Map::RootInput {
            factors: backend.view(&f.stats),
            out: backend.view_mut(&mut f.work),
            n: f.spec.size,
            count,
            divisor: sc.bc2,
            eps: if trace.is_some() { 0.0 } else { damping },
            select,
        })
        .collect();
    backend.map(&mut jobs)?;
    drop(jobs);
    let Some(exponent) = trace else {
        return Ok(());
    };
    reduce_into_values(opt, Reduction::Trace)?;
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let FactorState {
                work, values, spec, ..
            } = f;
            Map::TraceScale {
                x: backend.view_mut(work),
                traces: crate::backend::ViewOps::slice(backend.view(values), 0, count),
                eps,
                exponent,
                n: spec.size,
                count,
                select,
            }
        })
        .collect();
    backend.map(&mut jobs)?;
    drop(jobs);
    if damping == 0.0 {
        return Ok(());
    }
    // `+ damping I` (a ridge with no relative part).
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let FactorState {
                work, values, spec, ..
            } = f;
            Map::AddRidge {
                x: backend.view_mut(work),
                values: crate::backend::ViewOps::slice(backend.view(values), 0, count),
                rel: 0.0,
                abs: damping,
                n: spec.size,
                count,
                select,
            }
        })
        .collect();
    backend.map(&mut jobs)
}

/// A per-matrix reduction of each factor's work buffer into the first
/// `count` entries of its `values`.
pub(super) fn reduce_into_values<B: Backend>(opt: &mut Shampoo<B>, kind: Reduction) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<ReduceJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let n = f.spec.size;
            let (out, _) = backend.view_mut(&mut f.values).split_at(count);
            ReduceJob {
                input: backend.view(&f.work),
                numel: n * n,
                count,
                kind,
                out,
                select,
            }
        })
        .collect();
    backend.reduce(&mut jobs)
}

/// The sections of a factor's flags (`count` values each).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Section {
    /// Finiteness of the input `A`.
    Input = 0,
    /// Finiteness of the result; the iterations' per-block errors and
    /// scalars while they run.
    Output = 1,
    /// The batched Newton iteration's final residual `max |M - I|`, and its
    /// per-block scalars while it runs.
    Residual = 2,
}

/// Section `section` (`count` values) of a factor's flags.
pub(super) fn flag_section<'a, B: Backend>(
    backend: &B,
    flags: &'a mut B::Buffer,
    count: usize,
    section: Section,
) -> B::ViewMut<'a> {
    let (_, rest) = backend.view_mut(flags).split_at(section as usize * count);
    rest.split_at(count).0
}

/// Which matrices of a factor hold a result.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
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

/// Finiteness of each factor's `which` matrices into one section of its
/// flags.
pub(super) fn finite_flags<B: Backend>(
    opt: &mut Shampoo<B>,
    section: Section,
    which: Which,
) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<ReduceJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let n = f.spec.size;
            let (flags, input) = flags_and(f, which);
            ReduceJob {
                input: backend.view(input),
                numel: n * n,
                count,
                kind: Reduction::AllFinite,
                out: flag_section(backend, flags, count, section),
                select,
            }
        })
        .collect();
    backend.reduce(&mut jobs)
}

/// Copies the accepted blocks' results (from `which`) into the roots,
/// casting to the parameter dtype.
fn commit<B: Backend>(opt: &mut Shampoo<B>, which: Which) -> Result<()> {
    let backend = &opt.backend;
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

/// Copies the accepted blocks' eigenvectors (`work`) and eigenvalues
/// (`values`) into the kept eigenpairs.
fn commit_eigenpairs<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = Vec::new();
    for (f, count, _) in active_factors(&mut opt.groups, &opt.layout) {
        if f.accept.is_empty() {
            continue;
        }
        let n = f.spec.size;
        let FactorState {
            eigen,
            accept,
            work,
            values,
            ..
        } = f;
        let (vectors, lambdas) = eigen.as_mut().expect("eigendecomposed state");
        jobs.push(Map::Copy {
            src: backend.view(work),
            dst: backend.view_mut(vectors),
            numel: n * n,
            count,
            select: Some(&accept[..]),
        });
        jobs.push(Map::Copy {
            src: backend.view(values),
            dst: backend.view_mut(lambdas),
            numel: n,
            count,
            select: Some(&accept[..]),
        });
    }
    backend.map(&mut jobs)
}
