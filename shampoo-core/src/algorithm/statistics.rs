//! Steps 1-2: gather blocks (with L2 weight decay) and update the
//! Kronecker factor statistics.
//!
//! `L_k <- beta2 L_k + (1 - beta2) C_k` in two roundings (`L *= beta2`, then
//! `L += (1 - beta2) C`), or `L_k <- L_k + C_k` when `beta2 == 1`, where
//! `C_k` contracts the raw gradient with itself over every dimension but
//! `k` (`G G^T` and `G^T G` for a matrix). Only the lower triangle is
//! computed: half of the products.

use super::Shampoo;
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

/// Accumulates the factor statistics of every active block.
pub(super) fn update_factors<B: Backend>(opt: &mut Shampoo<B>) -> Result<()> {
    let beta2 = opt.config.betas[1];
    let (beta, alpha) = if beta2 == 1.0 {
        (1.0, 1.0)
    } else {
        (beta2, 1.0 - beta2)
    };
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
                tf32: opt.config.tf32,
                select,
            });
        }
    }
    backend.mode_gram(&mut jobs)
}
