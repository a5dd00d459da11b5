//! The eigh root inverse: `A = Q diag(lambda) Q^T`; if `min lambda < eps`
//! every eigenvalue is shifted by `eps - min lambda`; then
//! `X = Q diag(lambda^-e) Q^T`, formed as `W^T W` with
//! `W = diag(lambda^(-e/2)) Q^T` (half the products).

use crate::Result;
use crate::algorithm::Shampoo;
use crate::algorithm::state::{FactorState, Role, active_factors};
use crate::backend::{Backend, EighJob, EighStatus, GramJob, Map};

/// In-place eigendecomposition of each factor's work buffer.
pub(super) fn eigh<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
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
pub(super) fn eigh_inverse_root<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
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
