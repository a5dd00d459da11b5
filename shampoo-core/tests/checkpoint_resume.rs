//! Checkpoints: resuming is bit for bit the run that never stopped, and
//! bad files are clear errors.

mod common;
use common::*;
use shampoo_core::{CpuBackend, DType, Error, HostView, HostViewMut, Shampoo, ShampooConfig};

fn step32(opt: &mut Shampoo<CpuBackend>, params: &mut [Vec<f32>], grads: &[Vec<f32>]) {
    let mut v: Vec<HostViewMut<'_>> = params.iter_mut().map(|p| HostViewMut::F32(p)).collect();
    let g: Vec<Option<HostView<'_>>> = grads.iter().map(|g| Some(HostView::F32(g))).collect();
    opt.step(&mut v, &g).unwrap();
}

fn to32(x: &[Vec<f64>]) -> Vec<Vec<f32>> {
    x.iter()
        .map(|v| v.iter().map(|&y| y as f32).collect())
        .collect()
}

fn resume_case(cfg: ShampooConfig, dtype: DType) {
    let shapes = vec![vec![12, 10], vec![10], vec![5, 4, 3], vec![], vec![30]];
    let steps = 11;
    let save_at = 5;
    let init = gradients(11, &shapes, 1).remove(0);
    let grads = gradients(12, &shapes, steps);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/opt.safetensors");
    match dtype {
        DType::F64 => {
            let straight = run64(cfg.clone(), &shapes, &init, &grads);
            let mut opt = optimizer64(cfg.clone(), &shapes);
            let mut p = init.clone();
            for g in &grads[..save_at] {
                let gs: Vec<_> = g.iter().map(Some).collect();
                step64(&mut opt, &mut p, &gs);
            }
            opt.save(&path).unwrap();
            let state_before = opt.state_tensors().unwrap().0;
            drop(opt);
            let mut opt = optimizer64(cfg, &shapes);
            opt.load(&path).unwrap();
            assert_eq!(opt.step_count(), save_at as u64);
            assert_eq!(
                opt.state_tensors().unwrap().0,
                state_before,
                "state round-trips exactly"
            );
            for g in &grads[save_at..] {
                let gs: Vec<_> = g.iter().map(Some).collect();
                step64(&mut opt, &mut p, &gs);
            }
            for (a, b) in p.iter().zip(&straight) {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "bitwise resume (f64)"
                );
            }
        }
        DType::F32 => {
            let be = || CpuBackend::new(2).unwrap();
            let g32: Vec<Vec<Vec<f32>>> = grads.iter().map(|g| to32(g)).collect();
            let mut a = Shampoo::new(cfg.clone(), &shapes, DType::F32, be()).unwrap();
            let mut pa = to32(&init);
            for g in &g32 {
                step32(&mut a, &mut pa, g);
            }
            let mut b = Shampoo::new(cfg.clone(), &shapes, DType::F32, be()).unwrap();
            let mut pb = to32(&init);
            for g in &g32[..save_at] {
                step32(&mut b, &mut pb, g);
            }
            b.save(&path).unwrap();
            let mut c =
                Shampoo::new(cfg, &shapes, DType::F32, CpuBackend::new(1).unwrap()).unwrap();
            c.load(&path).unwrap();
            for g in &g32[save_at..] {
                step32(&mut c, &mut pb, g);
            }
            for (x, y) in pa.iter().zip(&pb) {
                assert!(
                    x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "bitwise resume (f32)"
                );
            }
            assert_eq!(a.state_tensors().unwrap().0, c.state_tensors().unwrap().0);
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left behind");
}

const FULL: &str = r#"{"lr": 0.02, "betas": [0.9, 0.999], "epsilon": 1e-8, "max_preconditioner_dim": 8,
    "precondition_frequency": 3, "start_preconditioning_step": 3, "weight_decay": 0.001,
    "grafting": {"type": "adam", "beta2": 0.999, "epsilon": 1e-8},
    "momentum": {"momentum": 0.5, "dampening": 0.1, "nesterov": true}}"#;

#[test]
fn resume_is_bitwise_eigh_f64() {
    resume_case(config(FULL), DType::F64);
}

#[test]
fn resume_is_bitwise_eigh_f32_with_another_thread_count() {
    resume_case(config(FULL), DType::F32);
}

#[test]
fn resume_is_bitwise_eigenvalue_corrected() {
    let cfg = config(
        r#"{"betas": [0.9, 0.99], "epsilon": 1e-8, "max_preconditioner_dim": 8, "precondition_frequency": 2,
            "preconditioner": {"type": "eigenvalue_corrected"}, "weight_decay": 0.01, "weight_decay_type": "l2"}"#,
    );
    resume_case(cfg, DType::F64);
}

#[test]
fn resume_is_bitwise_coupled_newton() {
    let cfg = config(
        r#"{"betas": [0.0, 1.0], "epsilon": 1e-4, "max_preconditioner_dim": 8, "precondition_frequency": 2,
            "preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_newton"}},
            "grafting": {"type": "rmsprop"}}"#,
    );
    resume_case(cfg, DType::F64);
}

#[test]
fn resume_is_bitwise_batched_newton() {
    let cfg = config(
        r#"{"betas": [0.0, 1.0], "epsilon": 1e-4, "max_preconditioner_dim": 8, "precondition_frequency": 2,
            "preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}},
            "grafting": {"type": "rmsprop"}}"#,
    );
    resume_case(cfg.clone(), DType::F64);
    resume_case(cfg, DType::F32);
}

fn saved(shapes: &[Vec<usize>], cfg: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let mut opt = optimizer64(config(cfg), shapes);
    let mut p: Vec<Vec<f64>> = shapes.iter().map(|s| vec![0.5; numel(s)]).collect();
    let g = p.clone();
    step64(&mut opt, &mut p, &g.iter().map(Some).collect::<Vec<_>>());
    opt.save(&path).unwrap();
    (dir, path)
}

fn load_err(shapes: &[Vec<usize>], cfg: &str, dtype: DType, path: &std::path::Path) -> String {
    let mut opt = Shampoo::new(config(cfg), shapes, dtype, CpuBackend::new(1).unwrap()).unwrap();
    let e = opt.load(path).unwrap_err();
    assert_eq!(opt.step_count(), 0, "a failed load changes nothing");
    format!("{e}")
}

#[test]
fn mismatched_checkpoints_are_clear_errors() {
    let shapes = vec![vec![6, 4], vec![3]];
    let cfg = r#"{"max_preconditioner_dim": 4}"#;
    let (_d, path) = saved(&shapes, cfg);
    let e = load_err(&[vec![6, 5], vec![3]], cfg, DType::F64, &path);
    assert!(
        e.contains("parameter shapes differ: parameter 0 is [6, 4] there and [6, 5] here"),
        "{e}"
    );
    let e = load_err(
        &shapes,
        r#"{"max_preconditioner_dim": 4, "betas": [0.9, 0.99]}"#,
        DType::F64,
        &path,
    );
    assert!(e.contains("saved with another config: betas differ"), "{e}");
    let e = load_err(&shapes, cfg, DType::F32, &path);
    assert!(
        e.contains("saved for f64 parameters, this optimizer has f32"),
        "{e}"
    );
    // Only the learning rate may change.
    let mut opt = optimizer64(
        config(r#"{"max_preconditioner_dim": 4, "lr": 0.5}"#),
        &shapes,
    );
    opt.load(&path).unwrap();
    assert_eq!(opt.step_count(), 1);
    assert_eq!(opt.config().lr, 0.5);
}

#[test]
fn truncated_and_foreign_files_are_clear_errors() {
    let shapes = vec![vec![6, 4]];
    let cfg = r#"{"max_preconditioner_dim": 4}"#;
    let (d, path) = saved(&shapes, cfg);
    let bytes = std::fs::read(&path).unwrap();
    let cut = d.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&shapes, cfg, DType::F64, &cut);
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&cut, &bytes[..5]).unwrap();
    let e = load_err(&shapes, cfg, DType::F64, &cut);
    assert!(e.contains("truncated"), "{e}");
    let reference = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/reference/default_eigh.safetensors"
    );
    let e = load_err(&shapes, cfg, DType::F64, std::path::Path::new(reference));
    assert!(e.contains("not a shampoo checkpoint"), "{e}");
    let e = load_err(
        &shapes,
        cfg,
        DType::F64,
        &d.path().join("missing.safetensors"),
    );
    assert!(
        e.contains("missing.safetensors") && e.contains("No such file"),
        "{e}"
    );
    match Shampoo::new(
        config(cfg),
        &shapes,
        DType::F64,
        CpuBackend::new(1).unwrap(),
    )
    .unwrap()
    .load(d.path().join("nope"))
    {
        Err(Error::Io { .. }) => {}
        other => panic!("expected an I/O error, got {other:?}", other = other.err()),
    }
}

/// Runs `grads[range]` on `opt`, setting each step's lr from the config's
/// `lr_schedule` first (as a scheduler would).
fn run_steps(
    opt: &mut Shampoo<CpuBackend>,
    p: &mut [Vec<f64>],
    grads: &[Vec<Vec<f64>>],
    range: std::ops::Range<usize>,
) {
    for k in range {
        let lr = opt.config().lr_at(k as u64 + 1);
        opt.set_lr(lr).unwrap();
        let gs: Vec<_> = grads[k].iter().map(Some).collect();
        step64(opt, p, &gs);
    }
}

fn eval_view(opt: &mut Shampoo<CpuBackend>, p: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let mut x = p.to_vec();
    let mut v: Vec<HostViewMut<'_>> = x.iter_mut().map(|p| HostViewMut::F64(p)).collect();
    opt.eval(&mut v).unwrap();
    let mut y = x.clone();
    let mut v: Vec<HostViewMut<'_>> = y.iter_mut().map(|p| HostViewMut::F64(p)).collect();
    opt.train(&mut v).unwrap();
    x
}

fn assert_bits(a: &[Vec<f64>], b: &[Vec<f64>], what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert!(
            x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what}: not bitwise equal"
        );
    }
}

/// Saves after `save_at` steps, resumes in a fresh optimizer with another
/// thread count, and checks the parameters (and the evaluation view) of the
/// run that never stopped, bit for bit.
fn resume_mode(json: &str, shapes: &[Vec<usize>]) {
    let cfg = config(json);
    let (steps, save_at) = (9, 4);
    let init = gradients(21, shapes, 1).remove(0);
    let grads = gradients(22, shapes, steps);
    let build = |threads| {
        Shampoo::new(
            cfg.clone(),
            shapes,
            DType::F64,
            CpuBackend::new(threads).unwrap(),
        )
        .unwrap()
    };
    let mut straight = build(2);
    let mut ps = init.clone();
    run_steps(&mut straight, &mut ps, &grads, 0..steps);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let mut first = build(2);
    let mut p = init.clone();
    run_steps(&mut first, &mut p, &grads, 0..save_at);
    first.save(&path).unwrap();
    let saved = first.state_tensors().unwrap();
    drop(first);
    let mut resumed = build(1);
    resumed.load(&path).unwrap();
    let again = resumed.state_tensors().unwrap();
    assert_eq!(saved.0, again.0, "{json}: state round-trips exactly");
    for key in ["peak_lr", "lr_sum", "mode"] {
        assert_eq!(saved.1.get(key), again.1.get(key), "{json}: {key}");
    }
    run_steps(&mut resumed, &mut p, &grads, save_at..steps);
    assert_bits(&p, &ps, json);
    if cfg.iterate_averaging.is_some() {
        let (a, b) = (eval_view(&mut straight, &ps), eval_view(&mut resumed, &p));
        assert_bits(&a, &b, "evaluation view");
        assert_ne!(a, ps, "the evaluation view is another sequence");
    }
}

const SHAPES: &[&[usize]] = &[&[12, 10], &[10], &[5, 4, 3], &[], &[30]];

fn shapes(s: &[&[usize]]) -> Vec<Vec<usize>> {
    s.iter().map(|x| x.to_vec()).collect()
}

#[test]
fn resume_is_bitwise_for_every_new_preconditioner() {
    let base = r#""lr": 0.02, "betas": [0.9, 0.99], "max_preconditioner_dim": 8, "precondition_frequency": 2,
        "start_preconditioning_step": 2"#;
    for precond in [
        r#"{"type": "eigendecomposed", "inverse_exponent_override": {"1": 0.25}}"#,
        r#"{"type": "eigendecomposed", "eigendecomposition": {"method": "eigh", "tolerance": 0.05}}"#,
        r#"{"type": "eigendecomposed", "eigendecomposition": {"method": "qr", "max_iterations": 2}}"#,
        r#"{"type": "eigenvalue_corrected", "eigendecomposition": {"method": "qr"}, "drop_weighting_factor_on_gsquare": true,
            "ignored_basis_change_dims": {"1": [0], "3": [1]}, "inverse_exponent_override": {"2": 0.25}}"#,
        r#"{"type": "kl_shampoo", "variant": "root_inv"}"#,
        r#"{"type": "kl_shampoo", "variant": "eigendecomposed", "eigendecomposition": {"method": "eigh", "tolerance": 0.05}}"#,
        r#"{"type": "root_inv", "root_inverse": {"method": "coupled_higher_order", "rel_epsilon": 1e-3, "abs_epsilon": 1e-9},
            "use_trace_scaling": true}"#,
        r#"{"type": "root_inv", "root_inverse": {"method": "eigh", "rank_deficient_stability": {"type": "perturbation",
            "perturb_before_computation": false}}, "use_trace_scaling": true, "trace_scaling_exponent": 0.25}"#,
        r#"{"type": "sign_descent"}"#,
    ] {
        let json = format!(
            r#"{{{base}, "epsilon": 1e-8, "beta3": 0.95, "preconditioner": {precond},
                "grafting": {{"type": "adam", "drop_weighting_factor_on_gsquare": true}}}}"#
        );
        resume_mode(&json, &shapes(SHAPES));
    }
    // The pseudo-inverse (epsilon 0).
    resume_mode(
        &format!(
            r#"{{{base}, "epsilon": 0.0, "preconditioner": {{"type": "root_inv", "root_inverse": {{"method": "eigh",
                "rank_deficient_stability": {{"type": "pseudo_inverse", "rank_rtol": 1e-8}}}}}}}}"#
        ),
        &shapes(SHAPES),
    );
    // Spectral descent: 2-D blocks only.
    for orth in [
        r#"{"method": "newton_schulz"}"#,
        r#"{"method": "svd", "scale_by_nuclear_norm": true}"#,
    ] {
        resume_mode(
            &format!(
                r#"{{{base}, "epsilon": 1e-8, "weight_decay": 0.01,
                    "preconditioner": {{"type": "spectral_descent", "orthogonalization": {orth}}}}}"#
            ),
            &shapes(&[&[12, 10], &[2, 2, 3], &[3, 9]]),
        );
    }
}

#[test]
fn resume_is_bitwise_for_iterate_averaging_and_scheduled_weight_decay() {
    let schedule =
        r#""lr": 0.05, "lr_schedule": [0.01, 0.02, 0.03, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01]"#;
    for extra in [
        r#""iterate_averaging": {"type": "gpa"}, "weight_decay": 0.01"#,
        r#""iterate_averaging": {"type": "schedule_free", "train_interp_coeff": 0.9}, "weight_decay": 0.01, "weight_decay_type": "corrected""#,
        r#""iterate_averaging": {"type": "schedule_free"}, "weight_decay": 0.01, "weight_decay_type": "independent""#,
        r#""momentum": {"momentum": 0.5}, "weight_decay": 0.01, "weight_decay_type": "corrected""#,
    ] {
        let json = format!(
            r#"{{{schedule}, {extra}, "betas": [0.0, 0.99], "epsilon": 1e-8, "max_preconditioner_dim": 8,
                "precondition_frequency": 2, "grafting": {{"type": "adam"}}}}"#
        );
        resume_mode(&json, &shapes(SHAPES));
    }
}

#[test]
fn a_checkpoint_saved_in_eval_mode_resumes_in_eval_mode() {
    let cfg = config(
        r#"{"lr": 0.05, "betas": [0.9, 0.99], "epsilon": 1e-8, "max_preconditioner_dim": 8,
            "iterate_averaging": {"type": "gpa"}, "grafting": {"type": "adam"}}"#,
    );
    let shapes = shapes(SHAPES);
    let init = gradients(31, &shapes, 1).remove(0);
    let grads = gradients(32, &shapes, 6);
    let views = |p: &mut Vec<Vec<f64>>| -> Vec<Vec<f64>> { p.clone() };
    // Straight: 3 steps, eval, train, 3 steps.
    let mut a = optimizer64(cfg.clone(), &shapes);
    let mut pa = init.clone();
    run_steps(&mut a, &mut pa, &grads, 0..3);
    let mut v: Vec<HostViewMut<'_>> = pa.iter_mut().map(|p| HostViewMut::F64(p)).collect();
    a.eval(&mut v).unwrap();
    let x = views(&mut pa);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eval.safetensors");
    a.save(&path).unwrap();
    let mut v: Vec<HostViewMut<'_>> = pa.iter_mut().map(|p| HostViewMut::F64(p)).collect();
    a.train(&mut v).unwrap();
    run_steps(&mut a, &mut pa, &grads, 3..6);
    // Resumed from the eval-mode checkpoint with the eval-mode parameters.
    let mut b = optimizer64(cfg, &shapes);
    b.load(&path).unwrap();
    assert!(!b.is_train_mode());
    let mut pb = x;
    let gs: Vec<_> = grads[3].iter().map(Some).collect();
    let mut vb: Vec<HostViewMut<'_>> = pb.iter_mut().map(|p| HostViewMut::F64(p)).collect();
    let gv: Vec<Option<HostView<'_>>> = gs.iter().map(|g| g.map(|g| HostView::F64(g))).collect();
    assert!(matches!(b.step(&mut vb, &gv), Err(Error::EvalMode)));
    b.train(&mut vb).unwrap();
    drop(vb);
    run_steps(&mut b, &mut pb, &grads, 3..6);
    assert_bits(&pa, &pb, "resumed from eval mode");
}
