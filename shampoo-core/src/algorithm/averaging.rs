//! Iterate averaging (GPA and Schedule-Free): the optimizer keeps, per
//! block, a second sequence `Z` (a copy of the parameters at the first
//! step), and the parameters `W` are the train-mode sequence `y` where
//! gradients are taken. Each step, with `U = -lr P` (no momentum: it is the
//! same slot of the published config):
//!
//! ```text
//! Z <- Z (1 - lr alpha)        (decoupled, corrected or independent weight decay)
//! D = Z - W;  Z <- Z + U;  W <- W + (c1 U + c2 D),  c1 = 1 - mu_y mu_x,  c2 = 1 - mu_x
//! ```
//!
//! `c1 U + c2 D` is the block's "direction", so distributed ranks share it
//! like any other; `Z` stays with the block's owner. [`Shampoo::eval`] puts
//! the averaged sequence `x = W + (1 - 1/mu_y)(Z - W)` in the parameters,
//! [`Shampoo::train`] maps back with `W = x + (1 - mu_y)(Z - x)`, the
//! published `eval()`/`train()`; steps are allowed in train mode only.

use super::Shampoo;
use super::state::GroupState;
use crate::backend::{Backend, GatherJob, Map, ViewMutOps};
use crate::schedule::AveragingScalars;
use crate::{Error, Result};

/// The optimizer's averaging state (per parameter group).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Averaging {
    /// Schedule-Free's running `sum lr^p` (float32, as published).
    pub lr_sum: f32,
    /// Train mode (the parameters hold `y`), or eval mode (`x`).
    pub train_mode: bool,
}

impl Default for Averaging {
    fn default() -> Self {
        Averaging {
            lr_sum: 0.0,
            train_mode: true,
        }
    }
}

/// `Z = W` for every owned block (the first step).
pub(super) fn initialize<'s, B: Backend>(
    opt: &mut Shampoo<B>,
    params: &[B::View<'s>],
) -> Result<()> {
    let sources: Vec<Option<B::View<'s>>> = params.iter().map(|&p| Some(p)).collect();
    let backend = &opt.backend;
    let mut jobs: Vec<GatherJob<'_, '_, B>> = Vec::new();
    for g in opt.groups.iter_mut() {
        let GroupState { gather, z, .. } = g;
        if let Some(z) = z.as_mut() {
            jobs.push(GatherJob {
                table: gather,
                sources: &sources,
                add: None,
                out: backend.view_mut(z),
                select: None,
            });
        }
    }
    backend.gather(&mut jobs)
}

/// The parameter increments `c1 U + c2 (Z - W)` of the active blocks, in
/// place of their directions `U` (and `Z`'s update).
pub(super) fn increments<B: Backend>(opt: &mut Shampoo<B>, sc: AveragingScalars) -> Result<()> {
    let backend = &opt.backend;
    let mut out = backend.view_mut(&mut opt.directions);
    let mut jobs: Vec<Map<'_, B>> = Vec::new();
    for (g, spec) in opt.groups.iter_mut().zip(&opt.layout.groups) {
        let (mine, rest) = out.split_at(spec.len());
        out = rest;
        if !g.any_active {
            continue;
        }
        let GroupState {
            z, weights, active, ..
        } = g;
        jobs.push(Map::IterateAverage {
            u: mine,
            z: backend.view_mut(z.as_mut().expect("averaging state")),
            w: backend.view(weights.as_ref().expect("gathered weights")),
            c1: sc.c1,
            c2: sc.c2,
            shrink: sc.shrink,
            numel: spec.numel,
            count: spec.count(),
            select: active.as_deref(),
        });
    }
    backend.map(&mut jobs)
}

/// The error of a step taken in eval mode.
pub(super) fn eval_mode_error() -> Error {
    Error::EvalMode
}

/// The increments `(Z - W) coef` of every owned block into the directions
/// buffer, `W` gathered from `params`.
pub(super) fn switch_increments<'s, B: Backend>(
    opt: &mut Shampoo<B>,
    params: &[B::View<'s>],
    coef: f64,
) -> Result<()> {
    let sources: Vec<Option<B::View<'s>>> = params.iter().map(|&p| Some(p)).collect();
    let backend = &opt.backend;
    {
        let mut jobs: Vec<GatherJob<'_, '_, B>> = Vec::new();
        for g in opt.groups.iter_mut() {
            let GroupState {
                gather, weights, ..
            } = g;
            jobs.push(GatherJob {
                table: gather,
                sources: &sources,
                add: None,
                out: backend.view_mut(weights.as_mut().expect("gathered weights")),
                select: None,
            });
        }
        backend.gather(&mut jobs)?;
    }
    let mut out = backend.view_mut(&mut opt.directions);
    let mut jobs: Vec<Map<'_, B>> = Vec::new();
    for (g, spec) in opt.groups.iter_mut().zip(&opt.layout.groups) {
        let (mine, rest) = out.split_at(spec.len());
        out = rest;
        let GroupState { z, weights, .. } = g;
        jobs.push(Map::Interpolate {
            z: backend.view(z.as_ref().expect("averaging state")),
            w: backend.view(weights.as_ref().expect("gathered weights")),
            out: mine,
            coef,
            numel: spec.numel,
            count: spec.count(),
            select: None,
        });
    }
    backend.map(&mut jobs)
}
