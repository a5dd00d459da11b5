//! Roots from eigendecompositions: `A = Q diag(lambda) Q^T` (faer's or
//! cuSOLVER's eigh), the eigenvalues made safe by the [`rank_deficient`]
//! rule (`h(lambda)`), then `X = Q diag(h) Q^T`, formed as `W^T W` with
//! `W = diag(h^(1/2)) Q^T` (half the products of a general product, `h`
//! is never negative).
//!
//! [`rank_deficient`]: super::rank_deficient

use super::Source;
use super::rank_deficient::rule;
use crate::Result;
use crate::algorithm::Shampoo;
use crate::algorithm::state::{FactorState, Role, active_factors};
use crate::backend::{Backend, EighJob, EighStatus, GramJob, Map, Selection};

/// Which blocks an eigendecomposition runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Blocks {
    /// Every active block.
    Active,
    /// The blocks in each factor's `accept` list.
    Listed,
}

/// In-place eigendecomposition of each factor's work buffer (eigenvalues
/// into `values`); statuses of the other blocks are `Skipped`.
pub(super) fn eigh<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    eigh_of(opt, Blocks::Active)
}

/// [`eigh`] of some blocks.
pub(super) fn eigh_of<B: Backend>(opt: &mut Shampoo<B>, blocks: Blocks) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<EighJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .filter(|(f, _, _)| blocks == Blocks::Active || !f.accept.is_empty())
        .map(|(f, count, select)| {
            let FactorState {
                work,
                values,
                status,
                spec,
                accept,
                ..
            } = f;
            status.fill(EighStatus::Skipped);
            let select: Selection<'_> = match blocks {
                Blocks::Active => select,
                Blocks::Listed => Some(&accept[..]),
            };
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

/// The root inverse from this step's eigendecomposition, in place:
/// `h(lambda)^(1/2)` into `values`, `W` into `work`, `X = W^T W` into
/// `Role::X`.
pub(super) fn eigh_inverse_root<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    let rule = rule(&opt.config);
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| Map::EigenPower {
            values: backend.view_mut(&mut f.values),
            n: f.spec.size,
            count,
            rule,
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
    gram_into_x(opt, None)
}

/// The root `X` of eigenpairs that are kept (this step's candidates in
/// `work` and `values`, or the kept ones), into `Role::X`, through copies
/// (`Role::T` for `W`, `powers` for `h`).
pub(super) fn form_roots<B: Backend>(opt: &mut Shampoo<B>, source: Source) -> Result<()> {
    let rule = rule(&opt.config);
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = Vec::new();
    for (f, count, select) in active_factors(&mut opt.groups, &opt.layout) {
        let n = f.spec.size;
        let t = f.roles[Role::T as usize];
        let FactorState {
            work,
            values,
            eigen,
            scratch,
            powers,
            ..
        } = f;
        let (vectors, lambdas) = match source {
            Source::Candidate => (&*work, &*values),
            Source::Kept => {
                let (v, l) = eigen.as_ref().expect("eigendecomposed state");
                (v, l)
            }
        };
        jobs.push(Map::Copy {
            src: backend.view(vectors),
            dst: backend.view_mut(&mut scratch[t]),
            numel: n * n,
            count,
            select,
        });
        jobs.push(Map::Copy {
            src: backend.view(lambdas),
            dst: backend.view_mut(powers.as_mut().expect("eigenvalue powers")),
            numel: n,
            count,
            select,
        });
    }
    backend.map(&mut jobs)?;
    drop(jobs);
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| Map::EigenPower {
            values: backend.view_mut(f.powers.as_mut().expect("eigenvalue powers")),
            n: f.spec.size,
            count,
            rule,
            exponent: f.spec.exponent,
            half: true,
            select,
        })
        .collect();
    backend.map(&mut jobs)?;
    drop(jobs);
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let t = f.roles[Role::T as usize];
            let FactorState {
                scratch,
                powers,
                spec,
                ..
            } = f;
            Map::ScaleRows {
                x: backend.view_mut(&mut scratch[t]),
                d: backend.view(powers.as_ref().expect("eigenvalue powers")),
                n: spec.size,
                count,
                select,
            }
        })
        .collect();
    backend.map(&mut jobs)?;
    drop(jobs);
    gram_into_x(opt, Some(Role::T))
}

/// `X = W^T W` into `Role::X`, `W` in `work` (`None`) or a role.
fn gram_into_x<B: Backend>(opt: &mut Shampoo<B>, from: Option<Role>) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<GramJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let x = f.roles[Role::X as usize];
            let src = from.map(|r| f.roles[r as usize]);
            let FactorState {
                work,
                scratch,
                square,
                ..
            } = f;
            let (input, out) = match src {
                None => (&*work, &mut scratch[x]),
                Some(s) => {
                    let (a, _, out) = crate::algorithm::state::pick3(scratch, s, s, x);
                    (a, out)
                }
            };
            GramJob {
                input: backend.view(input),
                dims: &square[..],
                count,
                mode: 1,
                out: backend.view_mut(out),
                beta: 0.0,
                alpha: 1.0,
                full: true,
                // Roots are formed in full precision.
                precision: crate::backend::Precision::F32,
                select,
            }
        })
        .collect();
    backend.mode_gram(&mut jobs)
}
