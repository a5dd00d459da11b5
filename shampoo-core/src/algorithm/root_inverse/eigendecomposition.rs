//! Eigendecompositions of the factors for the preconditioners that keep
//! eigenvectors (eigendecomposed and eigenvalue-corrected Shampoo): the
//! eigenvectors go into `work` (column-major), the eigenvalues into
//! `values`.
//!
//! - eigh with tolerance 0: a fresh eigendecomposition ([`super::eigh`]);
//! - eigh with tolerance `tau > 0` (adaptive, the Purifying Shampoo
//!   criterion): with `Q` the current eigenvectors, `B = Q^T A Q` and
//!   `r = sqrt(||B||_F^2 - ||diag B||^2) / ||B||_F`; if `r <= tau` the basis
//!   still fits: the eigenvectors stay `Q` and the eigenvalues become
//!   `diag(B)`, in `Q`'s column order; otherwise eigh as usual;
//! - QR: warm-started simultaneous iteration ([`super::qr`]).

use super::eigh::{Blocks, eigh, eigh_of};
use super::{Current, Section, flag_section, qr};
use crate::Result;
use crate::algorithm::Shampoo;
use crate::algorithm::state::{FactorState, Role, active_factors, download_f64, pick3};
use crate::backend::{Backend, EighStatus, Map, MatmulJob, ReduceJob, Reduction};
use crate::config::Eigendecomposition;

/// Eigendecomposes every active block's factor (in `work`) with `method`,
/// warm-started from the `current` eigenvectors.
pub(super) fn compute<B: Backend>(
    opt: &mut Shampoo<B>,
    method: Eigendecomposition,
    current: Current,
) -> Result<()> {
    for (f, _, _) in active_factors(&mut opt.groups, &opt.layout) {
        f.roles = std::array::from_fn(|i| i);
    }
    match method {
        Eigendecomposition::Eigh { tolerance: 0.0, .. } => eigh(opt),
        Eigendecomposition::Eigh { tolerance, .. } => adaptive(opt, tolerance, current),
        Eigendecomposition::Qr {
            max_iterations,
            tolerance,
            ..
        } => qr::compute(opt, max_iterations, tolerance, current),
    }
}

/// The adaptive eigh: keep the basis where it still fits.
fn adaptive<B: Backend>(opt: &mut Shampoo<B>, tolerance: f64, current: Current) -> Result<()> {
    load_current(opt, current)?;
    rotate(opt)?;
    off_diagonal_ratios(opt)?;
    for (f, count, select) in active_factors(&mut opt.groups, &opt.layout) {
        let FactorState {
            accept,
            keep,
            host_flags,
            ..
        } = f;
        accept.clear();
        keep.clear();
        let slots: Box<dyn Iterator<Item = u32>> = match select {
            Some(s) => Box::new(s.iter().copied()),
            None => Box::new(0..count as u32),
        };
        for s in slots {
            // A NaN ratio recomputes (and the finiteness checks report it).
            if host_flags[count + s as usize] <= tolerance {
                keep.push(s);
            } else {
                accept.push(s);
            }
        }
    }
    eigh_of(opt, Blocks::Listed)?;
    eigenpairs_from_rotation(opt, false, Blocks::Listed)
}

/// The current eigenvectors (rows: `FactorState::eigen`'s or the root)
/// into `Role::Z`, in the factor dtype.
pub(super) fn load_current<B: Backend>(opt: &mut Shampoo<B>, current: Current) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let n = f.spec.size;
            let z = f.roles[Role::Z as usize];
            let FactorState {
                eigen,
                root,
                scratch,
                ..
            } = f;
            let src = match current {
                Current::Eigenpairs => &eigen.as_ref().expect("eigendecomposed state").0,
                Current::Root => &*root,
            };
            Map::Copy {
                src: backend.view(src),
                dst: backend.view_mut(&mut scratch[z]),
                numel: n * n,
                count,
                select,
            }
        })
        .collect();
    backend.map(&mut jobs)
}

/// `B = Q^T A Q` into `Role::M`, with `A` in `work` and `Q^T` (eigenvectors
/// as rows) in `Role::Z`: `T = Q^T A`, then `B = T Q`.
pub(super) fn rotate<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<MatmulJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let (z, t) = (f.roles[Role::Z as usize], f.roles[Role::T as usize]);
            let FactorState {
                work,
                scratch,
                spec,
                ..
            } = f;
            let (q, _, out) = pick3(scratch, z, z, t);
            MatmulJob {
                a: backend.view(q),
                b: backend.view(work),
                c: backend.view_mut(out),
                n: spec.size,
                count,
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                accumulate: false,
                precision: crate::backend::Precision::F32,
                select,
            }
        })
        .collect();
    backend.matmul(&mut jobs)?;
    drop(jobs);
    let mut jobs: Vec<MatmulJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let r = &f.roles;
            let (z, t, m) = (
                r[Role::Z as usize],
                r[Role::T as usize],
                r[Role::M as usize],
            );
            let n = f.spec.size;
            let (a, b, out) = pick3(&mut f.scratch, t, z, m);
            MatmulJob {
                a: backend.view(a),
                b: backend.view(b),
                c: backend.view_mut(out),
                n,
                count,
                trans_a: false,
                trans_b: true,
                alpha: 1.0,
                accumulate: false,
                precision: crate::backend::Precision::F32,
                select,
            }
        })
        .collect();
    backend.matmul(&mut jobs)
}

/// The off-diagonal ratio of `B` (`Role::M`) of the blocks in each
/// factor's `accept` list (all active blocks when `accept` is stale: the
/// callers set it) into the second half of the flags, read back.
pub(super) fn off_diagonal_ratios<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    let backend = &opt.backend;
    let fdtype = opt.config.factor_dtype_for(opt.dtype);
    let mut jobs: Vec<ReduceJob<'_, B>> = active_factors(&mut opt.groups, &opt.layout)
        .map(|(f, count, select)| {
            let n = f.spec.size;
            let m = f.roles[Role::M as usize];
            let FactorState { flags, scratch, .. } = f;
            ReduceJob {
                input: backend.view(&scratch[m]),
                numel: n * n,
                count,
                kind: Reduction::OffDiagonalRatio,
                out: flag_section(backend, flags, count, Section::Output),
                select,
            }
        })
        .collect();
    backend.reduce(&mut jobs)?;
    drop(jobs);
    for (f, _, _) in active_factors(&mut opt.groups, &opt.layout) {
        download_f64(backend, backend.view(&f.flags), &mut f.host_flags, fdtype)?;
    }
    Ok(())
}

/// Eigenpairs from the rotated factor: `values = diag(B)` (sorted when
/// `sort`), the eigenvectors of `Role::Z` in the same order into `work`,
/// for the blocks in each factor's `keep` list (`Blocks::Listed`) or every
/// active block; marks them `Ok`.
pub(super) fn eigenpairs_from_rotation<B: Backend>(
    opt: &mut Shampoo<B>,
    sort: bool,
    blocks: Blocks,
) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = Vec::new();
    for (f, count, select) in active_factors(&mut opt.groups, &opt.layout) {
        if blocks == Blocks::Listed && f.keep.is_empty() {
            continue;
        }
        let n = f.spec.size;
        let (z, m) = (f.roles[Role::Z as usize], f.roles[Role::M as usize]);
        let FactorState {
            work,
            values,
            scratch,
            keep,
            status,
            ..
        } = f;
        let select = match blocks {
            Blocks::Listed => Some(&keep[..]),
            Blocks::Active => select,
        };
        match select {
            Some(s) => s.iter().for_each(|&i| status[i as usize] = EighStatus::Ok),
            None => status.fill(EighStatus::Ok),
        }
        jobs.push(Map::Eigenpairs {
            b: backend.view(&scratch[m]),
            vectors: backend.view(&scratch[z]),
            out_vectors: backend.view_mut(work),
            values: backend.view_mut(values),
            sort,
            n,
            count,
            select,
        });
    }
    backend.map(&mut jobs)
}
