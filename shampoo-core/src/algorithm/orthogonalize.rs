//! Spectral descent's direction: each 2-D block's filtered gradient,
//! orthogonalized.
//!
//! - Newton-Schulz with coefficients `(a, b, c)`: `X = Gf / max(||Gf||_F,
//!   1e-8)`, transposed when it has fewer rows than columns; `n` times
//!   `B = X^T X`, `B <- b B + c B B`, `X <- a X + X B`; transposed back.
//!   The transposes are not formed: a wide block uses `B = X X^T` and
//!   `X <- a X + B^T X` instead.
//! - SVD: `Gf = U S V^T` (reduced), `P_sh = U V^T`, times `sum S` with
//!   `scale_by_nuclear_norm`.

use super::Shampoo;
use super::state::{GroupState, Loc, active_groups};
use crate::Result;
use crate::backend::{
    Backend, GramJob, Map, MatmulJob, ModeProductJob, OrthogonalizeJob, ReduceJob, Reduction,
};
use crate::config::Orthogonalization;

/// Norm floor of the Newton-Schulz normalization.
const NORM_FLOOR: f64 = 1e-8;

/// `P_sh = orth(Gf)` for every active group.
pub(super) fn orthogonalize<B: Backend>(
    opt: &mut Shampoo<B>,
    method: Orthogonalization,
) -> Result<()> {
    match method {
        Orthogonalization::NewtonSchulz {
            num_iterations,
            coefficients,
        } => newton_schulz(opt, num_iterations, coefficients),
        Orthogonalization::Svd {
            scale_by_nuclear_norm,
        } => svd(opt, scale_by_nuclear_norm),
    }
}

/// Rows, columns and the mode of the smaller side of a 2-D block.
fn sides(dims: &[usize]) -> (usize, usize, usize) {
    let (m, n) = (dims[0], dims[1]);
    (m, n, if m >= n { 1 } else { 0 })
}

fn newton_schulz<B: Backend>(
    opt: &mut Shampoo<B>,
    iterations: u32,
    [a, b, c]: [f64; 3],
) -> Result<()> {
    let backend = &opt.backend;
    // ||Gf||_F, then X = Gf / max(||Gf||, floor) into work[0].
    let mut jobs: Vec<ReduceJob<'_, B>> = Vec::new();
    for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
        let GroupState {
            grad,
            filtered,
            scalars,
            active,
            ..
        } = g;
        jobs.push(ReduceJob {
            input: backend.view(filtered.as_ref().map_or(&*grad, |(_, gf)| gf)),
            numel: spec.numel,
            count: spec.count(),
            kind: Reduction::FrobeniusNorm,
            out: backend.view_mut(scalars),
            select: active.as_deref(),
        });
    }
    backend.reduce(&mut jobs)?;
    drop(jobs);
    let mut jobs: Vec<Map<'_, B>> = Vec::new();
    for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
        let GroupState {
            grad,
            filtered,
            scalars,
            work,
            active,
            p_sh,
            ..
        } = g;
        jobs.push(Map::ScaleByNorm {
            src: backend.view(filtered.as_ref().map_or(&*grad, |(_, gf)| gf)),
            dst: backend.view_mut(&mut work[0]),
            norms: backend.view(scalars),
            floor: NORM_FLOOR,
            numel: spec.numel,
            count: spec.count(),
            select: active.as_deref(),
        });
        *p_sh = Loc::Work(0);
    }
    backend.map(&mut jobs)?;
    drop(jobs);
    for _ in 0..iterations {
        // B = X^T X (or X X^T) into ortho[0].
        let mut jobs: Vec<GramJob<'_, B>> = Vec::new();
        for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
            let x = loc_index(g.p_sh);
            let (_, _, small) = sides(&spec.dims);
            let GroupState {
                work,
                ortho,
                active,
                ..
            } = g;
            let [bm, _] = ortho.as_mut().expect("Newton-Schulz scratch");
            jobs.push(GramJob {
                input: backend.view(&work[x]),
                dims: &spec.dims,
                count: spec.count(),
                mode: small,
                out: backend.view_mut(bm),
                beta: 0.0,
                alpha: 1.0,
                full: true,
                precision: opt.config.preconditioning_precision(),
                select: active.as_deref(),
            });
        }
        backend.mode_gram(&mut jobs)?;
        drop(jobs);
        // T = B B into ortho[1]; B <- b B + c T.
        let mut jobs: Vec<MatmulJob<'_, B>> = Vec::new();
        for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
            let k = spec.dims[sides(&spec.dims).2];
            let GroupState { ortho, active, .. } = g;
            let [bm, tm] = ortho.as_mut().expect("Newton-Schulz scratch");
            jobs.push(MatmulJob {
                a: backend.view(bm),
                b: backend.view(bm),
                c: backend.view_mut(tm),
                n: k,
                count: spec.count(),
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                accumulate: false,
                precision: opt.config.preconditioning_precision(),
                select: active.as_deref(),
            });
        }
        backend.matmul(&mut jobs)?;
        drop(jobs);
        let mut jobs: Vec<Map<'_, B>> = Vec::new();
        for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
            let k = spec.dims[sides(&spec.dims).2];
            let GroupState { ortho, active, .. } = g;
            let [bm, tm] = ortho.as_mut().expect("Newton-Schulz scratch");
            jobs.push(Map::Axpby {
                x: backend.view_mut(bm),
                y: backend.view(tm),
                a: b,
                b: c,
                numel: k * k,
                count: spec.count(),
                select: active.as_deref(),
            });
        }
        backend.map(&mut jobs)?;
        drop(jobs);
        // Y = X B (or B^T X) into the other work buffer; X <- a X + Y.
        let mut jobs: Vec<ModeProductJob<'_, B>> = Vec::new();
        for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
            let x = loc_index(g.p_sh);
            let (_, _, small) = sides(&spec.dims);
            let GroupState {
                work,
                ortho,
                active,
                ..
            } = g;
            let [w0, w1] = work;
            let (src, dst) = if x == 0 { (&*w0, w1) } else { (&*w1, w0) };
            let [bm, _] = ortho.as_ref().expect("Newton-Schulz scratch");
            jobs.push(ModeProductJob {
                input: backend.view(src),
                dims: &spec.dims,
                count: spec.count(),
                mode: small,
                matrices: backend.view(bm),
                transpose: true,
                out: backend.view_mut(dst),
                precision: opt.config.preconditioning_precision(),
                select: active.as_deref(),
            });
        }
        backend.mode_product(&mut jobs)?;
        drop(jobs);
        let mut jobs: Vec<Map<'_, B>> = Vec::new();
        for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
            let x = loc_index(g.p_sh);
            let GroupState { work, active, .. } = g;
            let [w0, w1] = work;
            let (xb, yb) = if x == 0 { (w0, &*w1) } else { (w1, &*w0) };
            jobs.push(Map::Axpby {
                x: backend.view_mut(xb),
                y: backend.view(yb),
                a,
                b: 1.0,
                numel: spec.numel,
                count: spec.count(),
                select: active.as_deref(),
            });
        }
        backend.map(&mut jobs)?;
    }
    Ok(())
}

/// The work buffer a `Loc::Work` names.
fn loc_index(loc: Loc) -> usize {
    match loc {
        Loc::Work(i) => i,
        _ => 0,
    }
}

fn svd<B: Backend>(opt: &mut Shampoo<B>, scale: bool) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<OrthogonalizeJob<'_, B>> = Vec::new();
    for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
        let GroupState {
            grad,
            filtered,
            work,
            scalars,
            active,
            p_sh,
            ..
        } = g;
        jobs.push(OrthogonalizeJob {
            input: backend.view(filtered.as_ref().map_or(&*grad, |(_, gf)| gf)),
            out: backend.view_mut(&mut work[0]),
            nuclear: scale.then(|| backend.view_mut(scalars)),
            rows: spec.dims[0],
            cols: spec.dims[1],
            count: spec.count(),
            select: active.as_deref(),
        });
        *p_sh = Loc::Work(0);
    }
    backend.orthogonalize(&mut jobs)?;
    drop(jobs);
    if !scale {
        return Ok(());
    }
    let mut jobs: Vec<Map<'_, B>> = Vec::new();
    for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
        let GroupState {
            work,
            scalars,
            active,
            ..
        } = g;
        jobs.push(Map::ScaleBlocks {
            x: backend.view_mut(&mut work[0]),
            scales: backend.view(scalars),
            numel: spec.numel,
            count: spec.count(),
            select: active.as_deref(),
        });
    }
    backend.map(&mut jobs)
}
