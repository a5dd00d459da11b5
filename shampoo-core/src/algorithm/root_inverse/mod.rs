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
//! counts; more than [`failures::MAX_CONSECUTIVE_FAILURES`] in a row is an
//! error.
//! The checks of a root-inverse step happen after one synchronisation
//! (coupled Newton also reads its errors once per iteration).
//!
//! One file per method: [`eigh`], [`coupled_newton`]; [`products`] holds
//! the batched matrix products the iterations share, [`failures`] the
//! accept and failure rules.

mod coupled_newton;
mod eigh;
mod failures;
mod products;

use super::Shampoo;
use super::state::{FactorState, Role, active_factors};
use crate::Result;
use crate::backend::{Backend, Map, ReduceJob, Reduction, ViewMutOps};
use crate::config::{Preconditioner, RootInverse};
use crate::schedule::StepScalars;

/// Runs the configured root inverse for every active block.
pub(super) fn compute<B: Backend>(opt: &mut Shampoo<B>, sc: &StepScalars) -> Result<()> {
    damped_factors(opt, sc)?;
    finite_flags(opt, Half::Input, Which::Work)?;
    match opt.config.preconditioner.clone() {
        Preconditioner::EigenvalueCorrected => {
            eigh::eigh(opt)?;
            finite_flags(opt, Half::Output, Which::Work)?;
            failures::accept(opt, sc, Which::Work)
        }
        Preconditioner::RootInv {
            root_inverse: RootInverse::Eigh,
            ..
        } => {
            eigh::eigh(opt)?;
            eigh::eigh_inverse_root(opt)?;
            finite_flags(opt, Half::Output, Which::X)?;
            failures::accept(opt, sc, Which::X)
        }
        Preconditioner::RootInv {
            root_inverse:
                RootInverse::CoupledNewton {
                    max_iterations,
                    tolerance,
                },
            ..
        } => {
            coupled_newton::coupled_newton(opt, max_iterations, tolerance)?;
            finite_flags(opt, Half::Output, Which::X)?;
            failures::accept(opt, sc, Which::X)
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
pub(super) enum Half {
    Input,
    Output,
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

/// Finiteness of each factor's `which` matrices into one half of its flags.
pub(super) fn finite_flags<B: Backend>(
    opt: &mut Shampoo<B>,
    half: Half,
    which: Which,
) -> Result<()> {
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
