//! Helpers shared by the integration tests.
#![allow(dead_code)]

use rand::{Rng, SeedableRng, rngs::StdRng};
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Shampoo, ShampooConfig};

/// Deterministic normal-ish values.
pub fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        })
        .collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

pub fn config(json: &str) -> ShampooConfig {
    ShampooConfig::from_json(json).expect("valid config")
}

/// Random gradients for `steps` steps.
pub fn gradients(seed: u64, shapes: &[Vec<usize>], steps: usize) -> Vec<Vec<Vec<f64>>> {
    let mut r = rng(seed);
    (0..steps)
        .map(|_| shapes.iter().map(|s| randn(&mut r, numel(s))).collect())
        .collect()
}

/// A float64 optimizer on the CPU.
pub fn optimizer64(config: ShampooConfig, shapes: &[Vec<usize>]) -> Shampoo<CpuBackend> {
    Shampoo::new(config, shapes, DType::F64, CpuBackend::new(2).unwrap()).unwrap()
}

/// One float64 step.
pub fn step64(opt: &mut Shampoo<CpuBackend>, params: &mut [Vec<f64>], grads: &[Option<&Vec<f64>>]) {
    let mut views: Vec<HostViewMut<'_>> = params.iter_mut().map(|p| HostViewMut::F64(p)).collect();
    let g: Vec<Option<HostView<'_>>> = grads.iter().map(|g| g.map(|g| HostView::F64(g))).collect();
    opt.step(&mut views, &g).unwrap();
}

/// Runs `grads` through a fresh float64 optimizer from `init`.
pub fn run64(
    config: ShampooConfig,
    shapes: &[Vec<usize>],
    init: &[Vec<f64>],
    grads: &[Vec<Vec<f64>>],
) -> Vec<Vec<f64>> {
    let mut opt = optimizer64(config, shapes);
    let mut params = init.to_vec();
    for g in grads {
        let gs: Vec<Option<&Vec<f64>>> = g.iter().map(Some).collect();
        step64(&mut opt, &mut params, &gs);
    }
    params
}

/// `max |a - b| / max |b|` over all tensors.
pub fn max_rel(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| shampoo_core::reference::relative_error(x, y))
        .fold(0.0, f64::max)
}
