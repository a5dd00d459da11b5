//! `shampoo-bench selfcheck`: two backends side by side (the CPU backend
//! and the CUDA backend) on random problems of every shape class, reporting
//! the largest difference of a step.
//!
//! Each problem runs the same steps (same initial parameters, same
//! gradients) on both backends. For every step `t` and backend `X` the
//! update is `u_X(t) = W_X(t) - W_X(t - 1)`; the difference of the step is
//! `max |u_A(t) - u_B(t)| / max |u_A(t)|` over all elements of all
//! parameters. A problem's figure is the largest over its steps. The bound
//! each dtype is held to, and why, is in docs/cuda-backend.md.

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use shampoo_core::backend::Backend;
use shampoo_core::{DType, HostView, HostViewMut, Shampoo, ShampooConfig};

/// One random problem: a shape class and its parameter shapes.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Shape class.
    pub class: &'static str,
    /// Parameter shapes.
    pub shapes: Vec<Vec<usize>>,
    /// `max_preconditioner_dim` (small enough to block or merge).
    pub max_dim: usize,
}

/// The shape classes: 1-D, 2-D, 3-D, blocked (split into several blocks)
/// and merged (dimensions merged before blocking). Each factor has seen at
/// least as many gradient columns as its size by step 8, when
/// preconditioning starts, so the statistics are full rank and moderately
/// conditioned: the comparison measures the backends, not the amplification
/// of rounding noise in a null space (see docs/cuda-backend.md).
pub fn problems() -> Vec<Problem> {
    vec![
        Problem {
            class: "1-D",
            shapes: vec![vec![5]],
            max_dim: 64,
        },
        Problem {
            class: "2-D",
            shapes: vec![vec![48, 20]],
            max_dim: 64,
        },
        Problem {
            class: "3-D",
            shapes: vec![vec![6, 10, 12]],
            max_dim: 64,
        },
        Problem {
            class: "blocked",
            shapes: vec![vec![192, 128]],
            max_dim: 64,
        },
        Problem {
            class: "merged",
            shapes: vec![vec![4, 5, 6, 7], vec![1, 4]],
            max_dim: 64,
        },
    ]
}

/// The optimizer variants each problem runs with, covering every fused
/// kernel: eigh root inverse with Adam grafting, Nesterov momentum and
/// decoupled weight decay; the coupled Newton iteration with AdaGrad
/// grafting and L2 weight decay; eigenvalue-corrected Shampoo with RMSprop
/// grafting and momentum. The damping of the last two is larger: the
/// coupled Newton iteration in float32 needs a moderate condition number,
/// and eigenvalue-corrected Shampoo divides by square roots of corrected
/// eigenvalues, which a small damping leaves at the mercy of rounding
/// (float32 against float64 on the CPU differs by 0.19 with 1e-6, by 4e-4
/// with 0.1; docs/cuda-backend.md). The batched Newton iteration runs in
/// both dtypes; in float32 also with TF32 statistics and bf16 products (the
/// CPU backend rounds operands as the GPU does, so the two differ only in
/// accumulation order).
pub fn variants(dtype: DType) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        (
            "eigh+adam",
            r#"{"lr": 0.01, "betas": [0.9, 0.99], "epsilon": 1e-6, "weight_decay": 0.01,
                "precondition_frequency": 2, "start_preconditioning_step": 8,
                "grafting": {"type": "adam", "beta2": 0.99, "epsilon": 1e-8},
                "momentum": {"momentum": 0.5, "dampening": 0.1, "nesterov": true}}"#,
        ),
        (
            "newton+adagrad",
            r#"{"lr": 0.01, "betas": [0.0, 1.0], "epsilon": 1e-3, "weight_decay": 0.01,
                "weight_decay_type": "l2",
                "precondition_frequency": 2, "start_preconditioning_step": 8,
                "grafting": {"type": "adagrad", "epsilon": 1e-8},
                "preconditioner": {"type": "root_inv",
                    "root_inverse": {"method": "coupled_newton"}}}"#,
        ),
        (
            "eigenvalue-corrected+rmsprop",
            r#"{"lr": 0.01, "betas": [0.9, 0.99], "epsilon": 0.1,
                "precondition_frequency": 2, "start_preconditioning_step": 8,
                "grafting": {"type": "rmsprop", "beta2": 0.99, "epsilon": 1e-8},
                "momentum": {"momentum": 0.5, "dampening": 0.0, "nesterov": false},
                "preconditioner": {"type": "eigenvalue_corrected"}}"#,
        ),
        (
            "batched-newton+adam",
            r#"{"lr": 0.01, "betas": [0.9, 0.99], "epsilon": 1e-3,
                "precondition_frequency": 2, "start_preconditioning_step": 8,
                "grafting": {"type": "adam", "beta2": 0.99, "epsilon": 1e-8},
                "preconditioner": {"type": "root_inv",
                    "root_inverse": {"method": "batched_newton"}}}"#,
        ),
    ];
    if dtype == DType::F32 {
        v.push((
            "batched-newton+tf32+bf16",
            r#"{"lr": 0.01, "betas": [0.9, 0.99], "epsilon": 0.1,
                "precondition_frequency": 2, "start_preconditioning_step": 8,
                "grafting": {"type": "adam", "beta2": 0.99, "epsilon": 1e-8},
                "preconditioner": {"type": "root_inv",
                    "root_inverse": {"method": "batched_newton"}},
                "precision": {"statistics": "tf32", "preconditioning": "bf16",
                              "root_iteration": "bf16"}}"#,
        ));
    }
    v
}

/// The result of one problem and variant.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// Shape class.
    pub class: String,
    /// Optimizer variant.
    pub variant: String,
    /// Steps compared.
    pub steps: usize,
    /// Largest difference of a step (see the module docs).
    pub max_difference: f64,
    /// The step (1-based) where it occurred.
    pub worst_step: usize,
    /// Whether it is within the bound.
    pub pass: bool,
}

/// The updates of every step, flattened over all parameters (as f64).
pub fn trajectory<B: Backend>(
    backend: B,
    config: ShampooConfig,
    shapes: &[Vec<usize>],
    dtype: DType,
    steps: usize,
    seed: u64,
) -> Result<Vec<Vec<f64>>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut opt = Shampoo::new(config, shapes, dtype, backend)?;
    let numels: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
    let b = opt.backend();
    let mut params = Vec::new();
    for &n in &numels {
        let host: Vec<f64> = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
        let mut buf = b.alloc(dtype, n)?;
        upload(b, &mut buf, &host, dtype)?;
        params.push(buf);
    }
    let mut grads: Vec<B::Buffer> = numels
        .iter()
        .map(|&n| b.alloc(dtype, n))
        .collect::<shampoo_core::Result<_>>()?;
    let mut before = download_all(b, &params, dtype)?;
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        let b = opt.backend();
        for (g, &n) in grads.iter_mut().zip(&numels) {
            let host: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
            upload(b, g, &host, dtype)?;
        }
        let gv: Vec<Option<B::View<'_>>> = grads.iter().map(|g| Some(b.view(g))).collect();
        let mut pv: Vec<B::ViewMut<'_>> = params.iter_mut().map(|p| b.view_mut(p)).collect();
        opt.step(&mut pv, &gv)?;
        drop(pv);
        let after = download_all(opt.backend(), &params, dtype)?;
        out.push(after.iter().zip(&before).map(|(a, b)| a - b).collect());
        before = after;
    }
    Ok(out)
}

fn upload<B: Backend>(b: &B, buf: &mut B::Buffer, host: &[f64], dtype: DType) -> Result<()> {
    match dtype {
        DType::F64 => b.upload(b.view_mut(buf), HostView::F64(host))?,
        DType::F32 => {
            let h: Vec<f32> = host.iter().map(|&x| x as f32).collect();
            b.upload(b.view_mut(buf), HostView::F32(&h))?
        }
    }
    Ok(())
}

fn download_all<B: Backend>(b: &B, bufs: &[B::Buffer], dtype: DType) -> Result<Vec<f64>> {
    let mut all = Vec::new();
    for buf in bufs {
        let v = b.view(buf);
        let n = shampoo_core::backend::ViewOps::len(&v);
        match dtype {
            DType::F64 => {
                let mut h = vec![0.0f64; n];
                b.download(v, HostViewMut::F64(&mut h))?;
                all.extend(h);
            }
            DType::F32 => {
                let mut h = vec![0.0f32; n];
                b.download(v, HostViewMut::F32(&mut h))?;
                all.extend(h.iter().map(|&x| x as f64));
            }
        }
    }
    Ok(all)
}

/// `(largest difference of a step, its 1-based step)` of two trajectories.
pub fn compare(a: &[Vec<f64>], b: &[Vec<f64>]) -> (f64, usize) {
    let mut worst = (0.0f64, 0usize);
    for (t, (ua, ub)) in a.iter().zip(b).enumerate() {
        let scale = ua.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let diff = ua.iter().zip(ub).fold(0.0f64, |m, (x, y)| {
            if (x - y).is_nan() {
                f64::NAN
            } else {
                m.max((x - y).abs())
            }
        });
        let rel = if scale > 0.0 { diff / scale } else { diff };
        if rel.is_nan() {
            return (rel, t + 1);
        }
        if rel > worst.0 {
            worst = (rel, t + 1);
        }
    }
    worst
}

/// Runs every problem and variant on backends made by `make_a` and
/// `make_b`, `steps` steps each, in `dtype`, against `bound`.
pub fn run<A: Backend, B: Backend>(
    make_a: impl Fn() -> Result<A>,
    make_b: impl Fn() -> Result<B>,
    dtype: DType,
    steps: usize,
    bound: f64,
) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    for (k, p) in problems().into_iter().enumerate() {
        for (j, (name, json)) in variants(dtype).into_iter().enumerate() {
            let mut cfg = ShampooConfig::from_json(json)
                .with_context(|| format!("selfcheck variant {name}"))?;
            cfg.max_preconditioner_dim = p.max_dim;
            let seed = 0x5E1F_C4EC + (k * 16 + j) as u64;
            let ta = trajectory(make_a()?, cfg.clone(), &p.shapes, dtype, steps, seed)
                .with_context(|| format!("{} / {name}, first backend", p.class))?;
            let tb = trajectory(make_b()?, cfg, &p.shapes, dtype, steps, seed)
                .with_context(|| format!("{} / {name}, second backend", p.class))?;
            let (max_difference, worst_step) = compare(&ta, &tb);
            out.push(CheckResult {
                class: p.class.to_string(),
                variant: name.to_string(),
                steps,
                max_difference,
                worst_step,
                pass: max_difference <= bound,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shampoo_core::CpuBackend;

    #[test]
    fn the_cpu_backend_agrees_with_itself_bit_for_bit_across_thread_counts() {
        // The default number of steps, in both dtypes: the problems stay
        // finite, and the harness reports exact agreement as 0.
        for dtype in [DType::F32, DType::F64] {
            let r = run(
                || Ok(CpuBackend::new(1)?),
                || Ok(CpuBackend::new(2)?),
                dtype,
                12,
                0.0,
            )
            .unwrap();
            assert_eq!(r.len(), problems().len() * variants(dtype).len());
            for c in &r {
                assert_eq!(c.max_difference, 0.0, "{c:?}");
                assert!(c.pass);
                assert_eq!(c.steps, 12);
            }
        }
    }

    #[test]
    fn compare_reports_the_worst_step_relative_to_the_first_update() {
        let a = vec![vec![1.0, -2.0], vec![0.5, 0.25]];
        let b = vec![vec![1.0, -2.0 + 1e-3], vec![0.5, 0.25 + 1e-3]];
        let (d, t) = compare(&a, &b);
        assert_eq!(t, 2);
        assert!((d - 2e-3).abs() < 1e-15, "{d}");
        let c = vec![vec![1.0, f64::NAN], vec![0.0, 0.0]];
        let (d, t) = compare(&a, &c);
        assert!(d.is_nan());
        assert_eq!(t, 1);
    }
}
