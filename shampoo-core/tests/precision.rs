//! What each operand precision costs: float32 runs with TF32 or bf16
//! operands (rounded as the GPU's matrix units round them; the CPU backend
//! rounds the same way) against the float64 run of the same problem, on
//! well-conditioned factors. The measured figures are in docs/tuning.md;
//! `cargo test -p shampoo-core --test precision -- --nocapture` prints them.

mod common;

use common::{config, gradients, numel, run64};
use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, Shampoo, ShampooConfig};

/// A matrix, an order-3 tensor (a middle mode) and a vector.
fn shapes() -> Vec<Vec<usize>> {
    vec![vec![48, 32], vec![16, 12, 9], vec![24]]
}

const STEPS: usize = 12;

/// Root inverses every 2 steps from step 4 on standard normal gradients;
/// the damping (epsilon 1) keeps every factor's condition number below
/// about 100 (the largest eigenvalue of a bias-corrected factor is at most
/// about 90 here). Reduced-precision root iterations are for such factors:
/// bf16 carries 8 significant bits, so directions of a factor more than
/// about 1e2 times weaker than its largest are lost in the rounding (the
/// residual test then keeps the previous root).
fn base(extra: &str) -> ShampooConfig {
    config(&format!(
        r#"{{"lr": 0.01, "betas": [0.9, 0.999], "epsilon": 1.0,
            "precondition_frequency": 2, "start_preconditioning_step": 4,
            "grafting": {{"type": "adam", "beta2": 0.999, "epsilon": 1e-8}}{extra}}}"#
    ))
}

fn run32(cfg: ShampooConfig, init: &[Vec<f64>], grads: &[Vec<Vec<f64>>]) -> Vec<Vec<f64>> {
    let shapes = shapes();
    let mut opt = Shampoo::new(cfg, &shapes, DType::F32, CpuBackend::new(2).unwrap()).unwrap();
    let mut params: Vec<Vec<f32>> = init
        .iter()
        .map(|p| p.iter().map(|&x| x as f32).collect())
        .collect();
    for g in grads {
        let g32: Vec<Vec<f32>> = g
            .iter()
            .map(|t| t.iter().map(|&x| x as f32).collect())
            .collect();
        let gv: Vec<Option<HostView<'_>>> = g32.iter().map(|t| Some(HostView::F32(t))).collect();
        let mut pv: Vec<HostViewMut<'_>> = params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
        opt.step(&mut pv, &gv).unwrap();
    }
    params
        .into_iter()
        .map(|p| p.into_iter().map(f64::from).collect())
        .collect()
}

/// `|dW - dW_ref| / |dW_ref|` over all tensors (the update, not the
/// weights, so that the error is relative to what the optimizer did).
fn update_error(got: &[Vec<f64>], want: &[Vec<f64>], init: &[Vec<f64>]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for ((g, w), i) in got.iter().zip(want).zip(init) {
        for ((g, w), i) in g.iter().zip(w).zip(i) {
            num += ((g - i) - (w - i)).powi(2);
            den += (w - i).powi(2);
        }
    }
    (num / den).sqrt()
}

/// `(name, extra config, bound)`: each option's measured error is below
/// its bound (two to four times the figure measured when the bound was
/// set: 2.5e-6, 1.8e-4, 1.3e-3, 2.3e-6, 4.4e-3, 4.4e-3).
const CASES: [(&str, &str, f64); 6] = [
    ("f32 (eigh)", "", 1e-5),
    (
        "tf32 statistics + preconditioning",
        r#", "tf32": true"#,
        5e-4,
    ),
    (
        "bf16 preconditioning",
        r#", "precision": {"preconditioning": "bf16"}"#,
        4e-3,
    ),
    (
        "f32 batched Newton",
        r#", "preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}}"#,
        1e-5,
    ),
    (
        "bf16 batched Newton",
        r#", "preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}},
            "precision": {"root_iteration": "bf16"}"#,
        1.2e-2,
    ),
    (
        "tf32 everything, bf16 root iteration",
        r#", "preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}},
            "precision": {"statistics": "tf32", "preconditioning": "tf32", "root_iteration": "bf16"}"#,
        1.2e-2,
    ),
];

#[test]
fn each_operand_precision_stays_within_its_documented_error() {
    let shapes = shapes();
    let grads = gradients(7, &shapes, STEPS);
    let init: Vec<Vec<f64>> = gradients(8, &shapes, 1).remove(0);
    let mut errors = Vec::new();
    for (name, extra, bound) in CASES {
        let cfg = base(extra);
        // The reference: the same method in float64, full precision.
        let mut full = cfg.clone();
        (full.tf32, full.precision) = (false, None);
        let want = run64(full, &shapes, &init, &grads);
        let got = run32(cfg, &init, &grads);
        let e = update_error(&got, &want, &init);
        println!("{name:<40} relative error of the update {e:.2e} (bound {bound:.0e})");
        assert!(e < bound, "{name}: {e:.3e} over {bound:.0e}");
        errors.push(e);
    }
    // Reduced precision costs accuracy: each option is measurably worse
    // than its full-precision counterpart (the rounding is really applied).
    assert!(errors[1] > 2.0 * errors[0], "tf32 {errors:?}");
    assert!(errors[2] > 2.0 * errors[1], "bf16 {errors:?}");
    assert!(errors[4] > 2.0 * errors[3], "bf16 root {errors:?}");
}

#[test]
fn bf16_operands_are_refused_where_they_do_not_apply() {
    let err = |json: &str| ShampooConfig::from_json(json).unwrap_err().to_string();
    assert_eq!(
        err(r#"{"tf32": true, "precision": {"preconditioning": "bf16"}}"#),
        r#"invalid config: give either tf32 or precision, not both (tf32: true is precision {"statistics": "tf32", "preconditioning": "tf32"})"#
    );
    assert_eq!(
        err(r#"{"precision": {"statistics": "bf16"}}"#),
        "invalid config: precision.statistics must be f32 or tf32: the statistics accumulate squared gradients, which bf16 operands would round to 8 significant bits"
    );
    assert!(err(r#"{"precision": {"preconditioning": "fp8"}}"#).contains("unknown variant `fp8`"));
    let cfg = config(r#"{"precision": {"preconditioning": "bf16"}}"#);
    let e = Shampoo::new(cfg, &[vec![4, 4]], DType::F64, CpuBackend::new(1).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        e,
        "invalid config: precision.preconditioning bf16 needs float32 parameters and factors (these are f64 and f64)"
    );
    assert_eq!(numel(&[2, 3]), 6);
}
