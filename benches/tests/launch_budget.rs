//! The launch budget of a CUDA step, counted on the CUDA backend's planner
//! (its own code, with every launch recorded instead of issued; no GPU):
//! a step without root inverse issues at most 8 kernel launches and library
//! calls per shape group, no copy and no host wait.
#![cfg(feature = "cuda")]

use std::process::Command;

use shampoo_bench::{plan, shapes};
use shampoo_core::ShampooConfig;

/// Launches and library calls per shape group per step without root
/// inverse (docs/cuda-backend.md).
const BUDGET_PER_GROUP: usize = 8;

fn config() -> ShampooConfig {
    ShampooConfig::from_json(include_str!("../configs/resnet50_train.json")).unwrap()
}

fn calls(step: &plan::StepPlan, name: &str) -> usize {
    step.phases
        .iter()
        .flat_map(|(_, calls)| calls)
        .filter(|(n, _)| n == name)
        .map(|(_, c)| c)
        .sum()
}

#[test]
fn a_steady_step_issues_at_most_eight_launches_per_shape_group() {
    for set in ["resnet50", "gpt2_small"] {
        let tensors = shapes::load(set, None).unwrap();
        let r = plan::run(set, &tensors, &config(), shampoo_core::DType::F32).unwrap();
        let s = &r.step;
        assert!(!s.root_inverse && r.root_inverse_step.root_inverse);
        assert!(
            s.launches <= BUDGET_PER_GROUP * r.groups,
            "{set}: {} launches for {} shape groups:\n{}",
            s.launches,
            r.groups,
            plan::render(&r)
        );
        // Gathers and scatters: one launch each for the whole step, their
        // block records uploaded before (not in the steady step).
        assert_eq!(calls(s, "kernel gather"), 1, "{set}");
        assert_eq!(calls(s, "kernel scatter"), 1, "{set}");
        assert_eq!(calls(s, "copy host to device"), 0, "{set}");
        // The elementwise work of all groups: one launch per kernel.
        for k in ["kernel gradient_statistics_jobs", "kernel direction_jobs"] {
            assert_eq!(calls(s, k), 1, "{set}: {k}");
        }
        assert_eq!(calls(s, "kernel sum_squares_jobs"), 2, "{set}");
        let gemms_and_moves = calls(s, "cublas gemm (batched)") + calls(s, "kernel swap_axes");
        assert_eq!(s.launches, gemms_and_moves + 6, "{set}");
        assert_eq!(s.host_waits, 0, "{set}: the steady step waits for the host");
        assert!(s.gemm_flops > 0.0);
    }
}

#[test]
fn every_factor_is_one_gemm_for_statistics_and_one_for_preconditioning() {
    let tensors = shapes::load("resnet50", None).unwrap();
    let r = plan::run("resnet50", &tensors, &config(), shampoo_core::DType::F32).unwrap();
    let factors: usize = {
        let shapes: Vec<Vec<usize>> = tensors.iter().map(|t| t.shape.clone()).collect();
        let layout = shampoo_core::layout::Layout::new(&shapes, &config(), &|_| true).unwrap();
        layout.groups.iter().map(|g| g.factors.len()).sum()
    };
    let phase = |name: &str| -> usize {
        r.step
            .phases
            .iter()
            .filter(|(p, _)| p == name)
            .flat_map(|(_, c)| c)
            .filter(|(n, _)| n == "cublas gemm (batched)")
            .map(|(_, c)| c)
            .sum()
    };
    assert_eq!(phase("statistics"), factors);
    assert_eq!(phase("precondition"), factors);
}

#[test]
fn the_plan_command_ends_with_the_budget_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_shampoo-bench"))
        .args(["plan", "--shapes", "gpt2_small"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = text.lines().last().unwrap();
    let tensors = shapes::load("gpt2_small", None).unwrap();
    let r = plan::run("gpt2_small", &tensors, &config(), shampoo_core::DType::F32).unwrap();
    assert_eq!(
        last,
        format!(
            "launches per step without root inverse: {} ({} shape groups)",
            r.step.launches, r.groups
        )
    );
}

#[test]
fn a_config_that_never_steps_without_a_root_inverse_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("every_step.json");
    std::fs::write(&conf, r#"{"lr": 0.01, "precondition_frequency": 1}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shampoo-bench"))
        .args(["plan", "--shapes", "cpu_small", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err,
        "shampoo-bench: error: the config computes root inverses on every step (precondition_frequency 1, or a mode that forces it: spectral and sign descent): no step without one to plan\n"
    );
}

#[test]
fn a_step_report_carries_the_launches_of_its_timed_configuration() {
    let bench = shampoo_bench::step::StepBench {
        set: "cpu_small".into(),
        tensors: shapes::load("cpu_small", None).unwrap(),
        config: config(),
        dtype: shampoo_core::DType::F32,
        steps: 1,
        warmup: 1,
        root_every: 2,
    };
    let report =
        shampoo_bench::step::run(&bench, || Ok(shampoo_core::CpuBackend::new(1)?)).unwrap();
    let l = plan::launches(&bench, &report).unwrap();
    // The timed run recomputes roots every 2 steps from step 2.
    let mut cfg = config();
    cfg.precondition_frequency = 2;
    cfg.start_preconditioning_step = shampoo_core::config::StartStep::At(2);
    let r = plan::run("cpu_small", &bench.tensors, &cfg, bench.dtype).unwrap();
    assert_eq!(l.per_step, r.step.launches);
    assert_eq!(l.per_root_inverse_step, r.root_inverse_step.launches);
    assert_eq!(l.groups, r.groups);
    let want = r.step.gemm_flops / 1e9 / (report.shampoo.mean_ms * 1e-3);
    assert!((l.gemm_gflops_per_s - want).abs() <= 1e-9 * want);
}

#[test]
fn bf16_preconditioning_rounds_both_operands_of_every_product_first() {
    let tensors = shapes::load("resnet50", None).unwrap();
    let mut cfg = config();
    cfg.precision = Some(shampoo_core::config::MatmulPrecision {
        preconditioning: shampoo_core::backend::Precision::Bf16,
        ..Default::default()
    });
    let r = plan::run("resnet50", &tensors, &cfg, shampoo_core::DType::F32).unwrap();
    let in_phase = |phase: &str, name: &str| -> usize {
        r.step
            .phases
            .iter()
            .filter(|(p, _)| p == phase)
            .flat_map(|(_, c)| c)
            .filter(|(n, _)| n == name)
            .map(|(_, c)| c)
            .sum()
    };
    let gemms = in_phase("precondition", "cublas gemm (batched)");
    assert!(gemms > 0);
    assert_eq!(in_phase("precondition", "kernel pack16"), 2 * gemms);
    assert_eq!(in_phase("statistics", "kernel pack16"), 0);
}

#[test]
fn the_batched_newton_iteration_waits_for_the_host_once_per_step_and_uploads_once() {
    let tensors = shapes::load("resnet50", None).unwrap();
    let mut cfg = config();
    cfg.preconditioner = ShampooConfig::from_json(
        r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}}}"#,
    )
    .unwrap()
    .preconditioner;
    let r = plan::run("resnet50", &tensors, &cfg, shampoo_core::DType::F32).unwrap();
    let shapes: Vec<Vec<usize>> = tensors.iter().map(|t| t.shape.clone()).collect();
    let layout = shampoo_core::layout::Layout::new(&shapes, &cfg, &|_| true).unwrap();
    let factors: usize = layout.groups.iter().map(|g| g.factors.len()).sum();
    let later = &r.later_root_inverse_step;
    // One wait for every factor's flags after the iteration; nothing
    // inside it, whatever the iteration count.
    assert_eq!(later.host_waits, 1);
    assert_eq!(calls(later, "copy device to host"), factors);
    // The pointer arrays were uploaded by the first root-inverse step.
    assert!(calls(&r.root_inverse_step, "copy host to device") > 0);
    assert_eq!(calls(later, "copy host to device"), 0);
    // Products of a size class are merged across groups: each GEMM call
    // carries several factors' products.
    let gemms = calls(later, "cublas gemm (batched)");
    let per_call = later.gemm_products as f64 / gemms as f64;
    println!("{gemms} GEMM calls, {:.1} products each", per_call);
    assert!(per_call > 3.0, "{gemms} GEMMs, {per_call:.1} products each");
}
