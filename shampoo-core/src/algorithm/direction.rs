//! Steps 4-7: grafting accumulators, the filtered gradient,
//! preconditioning, grafting, weight decay and momentum.
//!
//! - `Gf = (beta3 M1 + (1 - beta3) G) / (1 - beta3 beta1^(t-1))` with `M1`
//!   before its update `M1 <- beta1 M1 + (1 - beta1) G` (`beta3 = beta1`:
//!   `M1 / (1 - beta1^t)`; `Gf = G` when `beta1 == 0`); statistics used the
//!   raw `G`.
//! - root-inverse, eigendecomposed and KL-Shampoo:
//!   `P_sh = Gf x_1 X_1 ... x_k X_k`;
//! - eigenvalue-corrected: `D <- beta2 D + (1 - beta2) (G x_k Q_k^T)^2`,
//!   `P_sh = [(Gf x_k Q_k^T) / ((D / bc2)^e + eps)] x_k Q_k`;
//! - spectral descent: `P_sh = orth(Gf)` ([`super::orthogonalize`]); sign
//!   descent: `P_sh = sign(Gf)`;
//! - grafting: `P = P_sh ||graft(Gf)|| / (||P_sh|| + 1e-16)` per block, or
//!   `P = graft(Gf)` before preconditioning starts;
//! - `P += alpha W` (decoupled, corrected or independent weight decay),
//!   momentum, and the direction `-lr P`; with iterate averaging, the
//!   increment of the parameters instead ([`super::averaging`]).

use super::Shampoo;
use super::chain::chain;
use super::state::{GroupState, Loc, active_groups};
use crate::Result;
use crate::backend::{
    Backend, DirectionSource, GraftKernel, Map, MomentumKernel, ReduceJob, Reduction, ViewMutOps,
};
use crate::config::{Grafting, Preconditioner, ShampooConfig};
use crate::schedule::StepScalars;

/// The grafting kernel of this step.
fn graft_kernel(config: &ShampooConfig, sc: &StepScalars) -> GraftKernel {
    match config.grafting {
        None => GraftKernel::None,
        Some(Grafting::Sgd) => GraftKernel::Sgd,
        Some(Grafting::Adagrad { epsilon }) => GraftKernel::Adagrad { eps: epsilon },
        Some(Grafting::Rmsprop {
            beta2,
            epsilon,
            drop_weighting_factor_on_gsquare,
        }) => GraftKernel::Ema {
            beta2,
            weight: if drop_weighting_factor_on_gsquare {
                1.0
            } else {
                1.0 - beta2
            },
            eps: epsilon,
            bc: 1.0,
        },
        Some(Grafting::Adam {
            beta2,
            epsilon,
            drop_weighting_factor_on_gsquare,
        }) => GraftKernel::Ema {
            beta2,
            weight: if drop_weighting_factor_on_gsquare {
                1.0
            } else {
                1.0 - beta2
            },
            eps: epsilon,
            bc: sc.graft_bc,
        },
    }
}

fn source(config: &ShampooConfig, sc: &StepScalars) -> DirectionSource {
    if sc.graft_only(config) {
        DirectionSource::Graft
    } else if config.grafting.is_some() {
        DirectionSource::GraftedShampoo
    } else {
        DirectionSource::Shampoo
    }
}

/// Grafting accumulators, filtered gradient and the grafting norms.
pub(super) fn gradient_statistics<B: Backend>(
    opt: &mut Shampoo<B>,
    sc: &StepScalars,
) -> Result<()> {
    let graft = graft_kernel(&opt.config, sc);
    let want_norms = source(&opt.config, sc) == DirectionSource::GraftedShampoo;
    let beta1 = opt.config.betas[0];
    let beta3 = opt.config.beta3();
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = active_groups(&mut opt.groups, &opt.layout)
        .filter(|(g, _)| g.graft.is_some() || g.filtered.is_some() || want_norms)
        .map(|(g, spec)| {
            let count = spec.count();
            let GroupState {
                grad,
                graft: v,
                filtered,
                sq_norms,
                active,
                ..
            } = g;
            Map::GradientStatistics {
                g: backend.view(grad),
                v: v.as_mut().map(|v| backend.view_mut(v)),
                graft,
                filtered: filtered
                    .as_mut()
                    .map(|(m1, gf)| (backend.view_mut(m1), backend.view_mut(gf))),
                beta1,
                beta3,
                bc1: sc.bc1,
                graft_sq_norms: want_norms.then(|| backend.view_mut(sq_norms).split_at(count).0),
                numel: spec.numel,
                count,
                select: active.as_deref(),
            }
        })
        .collect();
    backend.map(&mut jobs)
}

/// Computes `P_sh` for every active group (when this step uses it).
pub(super) fn precondition<B: Backend>(opt: &mut Shampoo<B>, sc: &StepScalars) -> Result<()> {
    for g in opt.groups.iter_mut() {
        g.p_sh = Loc::Gf;
    }
    if !sc.uses_preconditioner(&opt.config) {
        return Ok(());
    }
    let n = opt.groups.len();
    match opt.config.preconditioner {
        Preconditioner::RootInv { .. }
        | Preconditioner::Eigendecomposed { .. }
        | Preconditioner::KlShampoo { .. } => {
            let mut locs = vec![Loc::Gf; n];
            chain(opt, false, &mut locs, None)?;
            for (g, loc) in opt.groups.iter_mut().zip(locs) {
                g.p_sh = loc;
            }
        }
        Preconditioner::EigenvalueCorrected { .. } => eigenvalue_corrected(opt, sc)?,
        Preconditioner::SpectralDescent { orthogonalization } => {
            super::orthogonalize::orthogonalize(opt, orthogonalization)?
        }
        Preconditioner::SignDescent => sign(opt)?,
    }
    Ok(())
}

/// Sign descent: `P_sh = sign(Gf)` into the first work buffer.
fn sign<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    let backend = &opt.backend;
    let mut jobs: Vec<Map<'_, B>> = Vec::new();
    for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
        let GroupState {
            grad,
            filtered,
            work,
            active,
            p_sh,
            ..
        } = g;
        let gf = filtered.as_ref().map_or(&*grad, |(_, gf)| gf);
        jobs.push(Map::Sign {
            src: backend.view(gf),
            dst: backend.view_mut(&mut work[0]),
            numel: spec.numel,
            count: spec.count(),
            select: active.as_deref(),
        });
        *p_sh = Loc::Work(0);
    }
    backend.map(&mut jobs)
}

/// Eigenvalue-corrected Shampoo's direction (the eigenbases are the
/// factors' roots; identity before the first basis).
fn eigenvalue_corrected<B: Backend>(opt: &mut Shampoo<B>, sc: &StepScalars) -> Result<()> {
    let beta2 = opt.config.betas[1];
    let drop = opt
        .config
        .shampoo_options()
        .is_some_and(|o| o.drop_weighting_factor);
    let weight = if drop || beta2 == 1.0 {
        1.0
    } else {
        1.0 - beta2
    };
    let eps = opt.config.epsilon;
    let n = opt.groups.len();
    // The raw gradient in the eigenbasis updates D.
    let mut raw = vec![Loc::Grad; n];
    chain(opt, false, &mut raw, None)?;
    {
        let backend = &opt.backend;
        let mut jobs: Vec<Map<'_, B>> = Vec::new();
        for (gi, (g, spec)) in opt.groups.iter_mut().zip(&opt.layout.groups).enumerate() {
            if !g.any_active {
                continue;
            }
            let (r, d, active) = rotated_and_corrected(g, raw[gi]);
            jobs.push(Map::EigenvalueUpdate {
                r: backend.view(r),
                d: backend.view_mut(d),
                beta2,
                weight,
                numel: spec.numel,
                count: spec.count(),
                select: active,
            });
        }
        backend.map(&mut jobs)?;
    }
    // The filtered gradient in the eigenbasis (the same rotation when
    // beta1 == 0), scaled in place, then rotated back.
    let mut locs = if opt.config.betas[0] == 0.0 {
        raw
    } else {
        let mut f = vec![Loc::Gf; n];
        chain(opt, false, &mut f, None)?;
        f
    };
    {
        let backend = &opt.backend;
        let mut jobs: Vec<Map<'_, B>> = Vec::new();
        for (gi, (g, spec)) in opt.groups.iter_mut().zip(&opt.layout.groups).enumerate() {
            if !g.any_active {
                continue;
            }
            let exponent = opt.config.eigenvalue_exponent(spec.dims.len());
            let (r, d, active) = rotated_and_corrected_mut(g, locs[gi]);
            jobs.push(Map::EigenvalueScale {
                r: backend.view_mut(r),
                d: backend.view(d),
                bc2: sc.bc2,
                eps,
                exponent,
                numel: spec.numel,
                count: spec.count(),
                select: active,
            });
        }
        backend.map(&mut jobs)?;
    }
    chain(opt, true, &mut locs, None)?;
    for (g, loc) in opt.groups.iter_mut().zip(locs) {
        g.p_sh = loc;
    }
    Ok(())
}

type Split<'a, B> = (
    &'a <B as Backend>::Buffer,
    &'a mut <B as Backend>::Buffer,
    Option<&'a [u32]>,
);

/// The buffer at `loc` (shared), `D` (exclusive) and the selection.
fn rotated_and_corrected<B: Backend>(g: &mut GroupState<B>, loc: Loc) -> Split<'_, B> {
    let GroupState {
        grad,
        filtered,
        work,
        corrected,
        active,
        ..
    } = g;
    (
        loc.of::<B>(grad, filtered, work),
        corrected.as_mut().expect("eigenvalue-corrected state"),
        active.as_deref(),
    )
}

type SplitMut<'a, B> = (
    &'a mut <B as Backend>::Buffer,
    &'a <B as Backend>::Buffer,
    Option<&'a [u32]>,
);

/// The buffer at `loc` (exclusive), `D` (shared) and the selection.
fn rotated_and_corrected_mut<B: Backend>(g: &mut GroupState<B>, loc: Loc) -> SplitMut<'_, B> {
    let GroupState {
        grad,
        filtered,
        work,
        corrected,
        active,
        ..
    } = g;
    (
        loc.of_mut::<B>(grad, filtered, work),
        corrected.as_ref().expect("eigenvalue-corrected state"),
        active.as_deref(),
    )
}

/// The final direction `-lr P` of every block into the owned-directions
/// buffer (`-0.0` for blocks without a gradient).
pub(super) fn finish<B: Backend>(opt: &mut Shampoo<B>, sc: &StepScalars) -> Result<()> {
    let config = &opt.config;
    let graft = graft_kernel(config, sc);
    let source = source(config, sc);
    let backend = &opt.backend;
    let grafted = source == DirectionSource::GraftedShampoo;
    // ||P_sh||^2 into the second half of the norms.
    if grafted {
        let mut jobs: Vec<ReduceJob<'_, B>> = Vec::new();
        for (g, spec) in active_groups(&mut opt.groups, &opt.layout) {
            let count = spec.count();
            let p_sh = g.p_sh;
            let GroupState {
                grad,
                filtered,
                work,
                sq_norms,
                active,
                ..
            } = g;
            jobs.push(ReduceJob {
                input: backend.view(p_sh.of::<B>(grad, filtered, work)),
                numel: spec.numel,
                count,
                kind: Reduction::SumSquares,
                out: backend.view_mut(sq_norms).split_at(count).1,
                select: active.as_deref(),
            });
        }
        backend.reduce(&mut jobs)?;
    }
    // With iterate averaging, weight decay shrinks Z instead.
    let wd = sc.decay.filter(|_| sc.averaging.is_none());
    let momentum = config.momentum.map(|m| MomentumKernel {
        mu: m.momentum,
        dampening: m.dampening,
        nesterov: m.nesterov,
    });
    let mut out = backend.view_mut(&mut opt.directions);
    let mut jobs: Vec<Map<'_, B>> = Vec::new();
    for (g, spec) in opt.groups.iter_mut().zip(&opt.layout.groups) {
        let (mine, rest) = out.split_at(spec.len());
        out = rest;
        let count = spec.count();
        let p_sh = g.p_sh;
        let GroupState {
            grad,
            filtered,
            graft: v,
            work,
            sq_norms,
            weights,
            momentum: mbuf,
            active,
            any_active,
            ..
        } = g;
        if !*any_active {
            jobs.push(Map::Fill {
                dst: mine,
                value: -0.0,
                numel: spec.numel,
                count,
                select: None,
            });
            continue;
        }
        let gf = Loc::Gf.of::<B>(grad, filtered, work);
        let p = p_sh.of::<B>(grad, filtered, work);
        jobs.push(Map::Direction {
            source,
            gf: backend.view(gf),
            v: v.as_ref().map(|v| backend.view(v)),
            graft,
            p_sh: (source != DirectionSource::Graft).then(|| backend.view(p)),
            sq_norms: grafted.then(|| backend.view(sq_norms)),
            weight_decay: wd.map(|wd| {
                (
                    backend.view(weights.as_ref().expect("gathered weights")),
                    wd,
                )
            }),
            momentum: momentum
                .map(|m| (backend.view_mut(mbuf.as_mut().expect("momentum state")), m)),
            lr: sc.lr,
            out: mine,
            numel: spec.numel,
            count,
            select: active.as_deref(),
        });
    }
    backend.map(&mut jobs)?;
    drop(jobs);
    drop(out);
    match sc.averaging {
        Some(avg) => super::averaging::increments(opt, avg),
        None => Ok(()),
    }
}
