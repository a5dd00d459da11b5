//! Steps 1-2: gather blocks (with L2 weight decay) and update the
//! Kronecker factor statistics.
//!
//! `L_k <- beta2 L_k + (1 - beta2) C_k` in two roundings (`L *= beta2`, then
//! `L += (1 - beta2) C`), or `L_k <- L_k + C_k` when `beta2 == 1` (and
//! `L_k <- beta2 L_k + C_k` when the weighting factor is dropped), where
//! `C_k` contracts the raw gradient with itself over every dimension but
//! `k` (`G G^T` and `G^T G` for a matrix). Only the lower triangle is
//! computed: half of the products.
//!
//! KL-Shampoo contracts instead `G_k = G x_j X_j` (every other factor's
//! current root `X_j`): `C_L = G X_R X_R G^T`, `C_R = G^T X_L X_L G`.

use super::Shampoo;
use super::chain::chain;
use super::state::Loc;
use crate::Result;
use crate::backend::{Backend, GatherJob, GramJob, Map};
use crate::config::WeightDecayType;

/// Gathers gradients (and parameters when weight decay needs them) into
/// the groups' packed buffers.
pub(super) fn gather<'s, B: Backend>(
    opt: &mut Shampoo<B>,
    params: &[B::View<'s>],
    grads: &[Option<B::View<'s>>],
) -> Result<()> {
    let wd = opt.config.weight_decay;
    let l2 = wd != 0.0 && opt.config.weight_decay_type == WeightDecayType::L2;
    let params_opt: Vec<Option<B::View<'s>>> = params.iter().map(|&p| Some(p)).collect();
    let backend = &opt.backend;
    let mut jobs: Vec<GatherJob<'_, '_, B>> = Vec::with_capacity(2 * opt.groups.len());
    for g in opt.groups.iter_mut().filter(|g| g.any_active) {
        let select = g.active.as_deref();
        jobs.push(GatherJob {
            table: &g.gather,
            sources: grads,
            add: l2.then_some((&params_opt[..], wd)),
            out: backend.view_mut(&mut g.grad),
            select,
        });
        if let Some(w) = g.weights.as_mut() {
            jobs.push(GatherJob {
                table: &g.gather,
                sources: &params_opt,
                add: None,
                out: backend.view_mut(w),
                select,
            });
        }
    }
    backend.gather(&mut jobs)
}

/// `(beta, alpha)` of the statistics update `L <- beta L + alpha C`.
fn coefficients<B: Backend>(opt: &Shampoo<B>) -> (f64, f64) {
    let beta2 = opt.config.betas[1];
    let drop = opt
        .config
        .shampoo_options()
        .is_some_and(|o| o.drop_weighting_factor);
    if beta2 == 1.0 {
        (1.0, 1.0)
    } else if drop {
        (beta2, 1.0)
    } else {
        (beta2, 1.0 - beta2)
    }
}

/// Accumulates the factor statistics of every active block.
pub(super) fn update_factors<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    if opt.config.is_kl() {
        return update_factors_kl(opt);
    }
    let (beta, alpha) = coefficients(opt);
    let backend = &opt.backend;
    // Gradients in the factor dtype, when it differs from the parameters'.
    let mut casts: Vec<Map<'_, B>> = Vec::new();
    for (gi, g) in opt.groups.iter_mut().enumerate() {
        if let (true, Some(gf)) = (g.any_active, g.grad_factor.as_mut()) {
            let spec = &opt.layout.groups[gi];
            casts.push(Map::Copy {
                src: backend.view(&g.grad),
                dst: backend.view_mut(gf),
                numel: spec.numel,
                count: spec.count(),
                select: g.active.as_deref(),
            });
        }
    }
    backend.map(&mut casts)?;
    drop(casts);

    let mut jobs: Vec<GramJob<'_, B>> = Vec::new();
    for (gi, g) in opt.groups.iter_mut().enumerate() {
        if !g.any_active {
            continue;
        }
        let spec = &opt.layout.groups[gi];
        let input = backend.view(g.grad_factor.as_ref().unwrap_or(&g.grad));
        let select = g.active.as_deref();
        for f in g.factors.iter_mut() {
            jobs.push(GramJob {
                input,
                dims: &spec.dims,
                count: spec.count(),
                mode: f.spec.dim,
                out: backend.view_mut(&mut f.stats),
                beta,
                alpha,
                full: false,
                precision: opt.config.statistics_precision(),
                select,
            });
        }
    }
    backend.mode_gram(&mut jobs)
}

/// KL-Shampoo's statistics: for each factor index `k`, every group that has
/// a factor `k` multiplies its gradient by its other factors' roots, then
/// contracts the product for factor `k`.
fn update_factors_kl<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    let (beta, alpha) = coefficients(opt);
    let most = opt
        .groups
        .iter()
        .map(|g| g.factors.len())
        .max()
        .unwrap_or(0);
    for k in 0..most {
        let mut locs = vec![Loc::Grad; opt.groups.len()];
        chain(opt, false, &mut locs, Some(k))?;
        let backend = &opt.backend;
        // Into the factor dtype when it differs.
        let mut casts: Vec<Map<'_, B>> = Vec::new();
        for (gi, g) in opt.groups.iter_mut().enumerate() {
            if !g.any_active || g.factors.len() <= k {
                continue;
            }
            let spec = &opt.layout.groups[gi];
            let super::state::GroupState {
                grad,
                filtered,
                work,
                grad_factor,
                active,
                ..
            } = g;
            if let Some(gf) = grad_factor.as_mut() {
                casts.push(Map::Copy {
                    src: backend.view(locs[gi].of::<B>(grad, filtered, work)),
                    dst: backend.view_mut(gf),
                    numel: spec.numel,
                    count: spec.count(),
                    select: active.as_deref(),
                });
            }
        }
        backend.map(&mut casts)?;
        drop(casts);
        let mut jobs: Vec<GramJob<'_, B>> = Vec::new();
        for (gi, g) in opt.groups.iter_mut().enumerate() {
            if !g.any_active || g.factors.len() <= k {
                continue;
            }
            let spec = &opt.layout.groups[gi];
            let super::state::GroupState {
                grad,
                filtered,
                work,
                grad_factor,
                factors,
                active,
                ..
            } = g;
            let input = match grad_factor.as_ref() {
                Some(gf) => backend.view(gf),
                None => backend.view(locs[gi].of::<B>(grad, filtered, work)),
            };
            let f = &mut factors[k];
            jobs.push(GramJob {
                input,
                dims: &spec.dims,
                count: spec.count(),
                mode: f.spec.dim,
                out: backend.view_mut(&mut f.stats),
                beta,
                alpha,
                full: false,
                precision: opt.config.statistics_precision(),
                select: active.as_deref(),
            });
        }
        backend.mode_gram(&mut jobs)?;
    }
    Ok(())
}
