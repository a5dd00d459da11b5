//! The QR eigendecomposition: warm-started simultaneous iteration. With `Q`
//! the current eigenvectors and `A` the factor: `V = Q`, `B = V^T A V`;
//! then at most `max_iterations` times, stopping before an iteration once
//! `r(B) <= tolerance` (the off-diagonal ratio of the adaptive criterion, so
//! tolerance 0 runs them all): `(Qb, Rb) = qr(B)`, `B <- Rb Qb`,
//! `V <- V Qb`. The eigenvalues are `diag(B)` sorted ascending (stable),
//! the eigenvectors `V`'s columns in the same order. Every use of the
//! result is invariant to the signs of the eigenvector columns, so the QR
//! factorization's sign convention does not matter.

use std::cmp::Ordering;

use super::Current;
use super::eigendecomposition::{
    eigenpairs_from_rotation, load_current, off_diagonal_ratios, rotate,
};
use super::eigh::Blocks;
use super::products::{Product, products};
use crate::Result;
use crate::algorithm::Shampoo;
use crate::algorithm::state::{FactorState, Role, active_factors, pick2_mut};
use crate::backend::{Backend, QrJob};

/// Runs the iteration for every active block (per-block stopping).
pub(super) fn compute<B: Backend>(
    opt: &mut Shampoo<B>,
    max_iterations: u32,
    tolerance: f64,
    current: Current,
) -> Result<()> {
    load_current(opt, current)?;
    rotate(opt)?;
    for (f, count, select) in active_factors(&mut opt.groups, &opt.layout) {
        f.accept.clear();
        match select {
            Some(s) => f.accept.extend_from_slice(s),
            None => f.accept.extend(0..count as u32),
        }
    }
    for _ in 0..max_iterations {
        off_diagonal_ratios(opt)?;
        let mut any = false;
        for (f, count, _) in active_factors(&mut opt.groups, &opt.layout) {
            let FactorState {
                accept, host_flags, ..
            } = f;
            // A NaN ratio keeps iterating, as the published criterion does.
            accept.retain(|&s| {
                let r = host_flags[count + s as usize];
                matches!(r.partial_cmp(&tolerance), Some(Ordering::Greater) | None)
            });
            any |= !accept.is_empty();
        }
        if !any {
            break;
        }
        // (Qb, Rb) = qr(B): Qb in M, Rb in R.
        let backend = &opt.backend;
        let mut jobs: Vec<QrJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
            .filter(|(f, _, _)| !f.accept.is_empty())
            .map(|(f, count, _)| {
                let (m, r) = (f.roles[Role::M as usize], f.roles[Role::R as usize]);
                let n = f.spec.size;
                let FactorState {
                    scratch, accept, ..
                } = f;
                let (qb, rb) = pick2_mut(scratch, m, r);
                QrJob {
                    a: backend.view_mut(qb),
                    r: backend.view_mut(rb),
                    n,
                    count,
                    select: Some(&accept[..]),
                }
            })
            .collect();
        backend.qr(&mut jobs)?;
        drop(jobs);
        // V <- V Qb, i.e. the rows V^T <- Qb^T V^T; then B <- Rb Qb.
        products(opt, |_| {
            Some(Product::MulTransposed(Role::M, Role::Z, Role::Z))
        })?;
        products(opt, |_| Some(Product::Mul(Role::R, Role::M, Role::M)))?;
    }
    eigenpairs_from_rotation(opt, true, Blocks::Active)
}
