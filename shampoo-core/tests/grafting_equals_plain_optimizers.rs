//! Shampoo whose preconditioning never starts is exactly its grafting
//! method: SGD, AdaGrad, RMSprop or Adam (with the filtered gradient as
//! Adam's first moment, decoupled weight decay as AdamW's, and momentum).
//!
//! The plain optimizers below are written from their textbook definitions,
//! with the learning rate and bias corrections rounded to float32 as the
//! published implementation holds them.

mod common;
use common::*;

fn f32r(x: f64) -> f64 {
    x as f32 as f64
}
fn bc(beta: f64, t: u64) -> f64 {
    (1.0f32 - (beta as f32).powf(t as f32)) as f64
}

#[derive(Clone, Copy)]
enum Plain {
    Sgd,
    Adagrad { eps: f64 },
    Rmsprop { b2: f64, eps: f64 },
    Adam { b2: f64, eps: f64 },
}

/// A plain elementwise optimizer with beta1 filtering, decoupled weight
/// decay and classic momentum.
fn plain(
    kind: Plain,
    lr: f64,
    beta1: f64,
    wd: f64,
    momentum: Option<(f64, f64, bool)>,
    init: &[Vec<f64>],
    grads: &[Vec<Vec<f64>>],
) -> Vec<Vec<f64>> {
    let mut w = init.to_vec();
    let mut v: Vec<Vec<f64>> = init.iter().map(|x| vec![0.0; x.len()]).collect();
    let mut m = v.clone();
    let mut buf = v.clone();
    for (k, g) in grads.iter().enumerate() {
        let t = k as u64 + 1;
        for p in 0..w.len() {
            for i in 0..w[p].len() {
                let x = g[p][i];
                match kind {
                    Plain::Sgd => {}
                    Plain::Adagrad { .. } => v[p][i] += x * x,
                    Plain::Rmsprop { b2, .. } | Plain::Adam { b2, .. } => {
                        v[p][i] = v[p][i] * b2 + (1.0 - b2) * x * x
                    }
                }
                let gf = if beta1 != 0.0 {
                    m[p][i] = m[p][i] * beta1 + (1.0 - beta1) * x;
                    m[p][i] / bc(beta1, t)
                } else {
                    x
                };
                let mut d = match kind {
                    Plain::Sgd => gf,
                    Plain::Adagrad { eps } => gf / (v[p][i].sqrt() + eps),
                    Plain::Rmsprop { eps, .. } => gf / ((v[p][i] / 1.0).sqrt() + eps),
                    Plain::Adam { b2, eps } => gf / ((v[p][i] / bc(b2, t)).sqrt() + eps),
                };
                d += wd * w[p][i];
                if let Some((mu, damp, nesterov)) = momentum {
                    buf[p][i] = buf[p][i] * mu + (1.0 - damp) * d;
                    d = if nesterov {
                        (1.0 - damp) * d + mu * buf[p][i]
                    } else {
                        buf[p][i]
                    };
                }
                w[p][i] += -f32r(lr) * d;
            }
        }
    }
    w
}

fn check(graft_json: &str, kind: Plain, beta1: f64, wd: f64, momentum: Option<(f64, f64, bool)>) {
    let shapes = vec![vec![7, 5], vec![3], vec![], vec![4, 3, 2]];
    let init: Vec<Vec<f64>> = gradients(1, &shapes, 1).remove(0);
    let grads = gradients(2, &shapes, 12);
    let mom = momentum.map_or("null".to_string(), |(mu, d, n)| {
        format!(r#"{{"momentum": {mu}, "dampening": {d}, "nesterov": {n}}}"#)
    });
    let cfg = config(&format!(
        r#"{{"lr": 0.05, "betas": [{beta1}, 0.999], "weight_decay": {wd}, "start_preconditioning_step": "never",
            "max_preconditioner_dim": 4, "grafting": {graft_json}, "momentum": {mom}}}"#
    ));
    let ours = run64(cfg, &shapes, &init, &grads);
    let want = plain(kind, 0.05, beta1, wd, momentum, &init, &grads);
    let err = max_rel(&ours, &want);
    assert!(err < 1e-14, "{graft_json}: relative error {err:e}");
}

#[test]
fn sgd_grafting_is_sgd() {
    check(r#"{"type": "sgd"}"#, Plain::Sgd, 0.0, 0.0, None);
}

#[test]
fn sgd_grafting_with_momentum_and_nesterov_is_sgd_with_momentum() {
    check(
        r#"{"type": "sgd"}"#,
        Plain::Sgd,
        0.0,
        0.0,
        Some((0.9, 0.0, false)),
    );
    check(
        r#"{"type": "sgd"}"#,
        Plain::Sgd,
        0.0,
        0.0,
        Some((0.9, 0.0, true)),
    );
    check(
        r#"{"type": "sgd"}"#,
        Plain::Sgd,
        0.0,
        0.0,
        Some((0.5, 0.1, false)),
    );
}

#[test]
fn adagrad_grafting_is_adagrad() {
    check(
        r#"{"type": "adagrad", "epsilon": 1e-10}"#,
        Plain::Adagrad { eps: 1e-10 },
        0.0,
        0.0,
        None,
    );
}

#[test]
fn rmsprop_grafting_is_rmsprop() {
    check(
        r#"{"type": "rmsprop", "beta2": 0.99, "epsilon": 1e-8}"#,
        Plain::Rmsprop {
            b2: 0.99,
            eps: 1e-8,
        },
        0.0,
        0.0,
        None,
    );
}

#[test]
fn adam_grafting_with_beta1_is_adam() {
    check(
        r#"{"type": "adam", "beta2": 0.999, "epsilon": 1e-8}"#,
        Plain::Adam {
            b2: 0.999,
            eps: 1e-8,
        },
        0.9,
        0.0,
        None,
    );
}

#[test]
fn adam_grafting_with_decoupled_weight_decay_is_adamw() {
    check(
        r#"{"type": "adam", "beta2": 0.95, "epsilon": 1e-6}"#,
        Plain::Adam {
            b2: 0.95,
            eps: 1e-6,
        },
        0.9,
        0.01,
        None,
    );
}

#[test]
fn float32_scalars_matter_only_at_1e7() {
    // The textbook Adam with float64 bias corrections differs from the
    // published arithmetic by float32 rounding of the scalars only.
    let shapes = vec![vec![6, 4]];
    let init = gradients(3, &shapes, 1).remove(0);
    let grads = gradients(4, &shapes, 5);
    let cfg = config(
        r#"{"lr": 0.01, "betas": [0.9, 0.999], "start_preconditioning_step": "never",
            "grafting": {"type": "adam", "beta2": 0.999, "epsilon": 1e-8}}"#,
    );
    let ours = run64(cfg, &shapes, &init, &grads);
    let mut w = init.clone();
    let (mut m, mut v) = (vec![0.0; 24], vec![0.0; 24]);
    for (k, g) in grads.iter().enumerate() {
        let t = (k + 1) as i32;
        for i in 0..24 {
            m[i] = 0.9 * m[i] + 0.1 * g[0][i];
            v[i] = 0.999 * v[i] + 0.001 * g[0][i] * g[0][i];
            let mh = m[i] / (1.0 - 0.9f64.powi(t));
            let vh = v[i] / (1.0 - 0.999f64.powi(t));
            w[0][i] -= 0.01 * mh / (vh.sqrt() + 1e-8);
        }
    }
    let err = max_rel(&ours, &w);
    assert!(err > 0.0 && err < 1e-6, "error {err:e}");
}
