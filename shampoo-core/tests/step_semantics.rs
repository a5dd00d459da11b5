//! Step semantics: float32 against float64, parameters without gradients,
//! bad inputs, and the failure rules of the root inverse.

mod common;
use common::*;
use shampoo_core::backend::Op;
use shampoo_core::{CpuBackend, DType, Error, HostView, HostViewMut, MatrixKind, Result, Shampoo};

fn run32(
    cfg: &str,
    shapes: &[Vec<usize>],
    init: &[Vec<f64>],
    grads: &[Vec<Vec<f64>>],
) -> Vec<Vec<f64>> {
    let mut opt =
        Shampoo::new(config(cfg), shapes, DType::F32, CpuBackend::new(2).unwrap()).unwrap();
    let mut p: Vec<Vec<f32>> = init
        .iter()
        .map(|v| v.iter().map(|&x| x as f32).collect())
        .collect();
    for g in grads {
        let g32: Vec<Vec<f32>> = g
            .iter()
            .map(|v| v.iter().map(|&x| x as f32).collect())
            .collect();
        let mut views: Vec<HostViewMut<'_>> = p.iter_mut().map(|x| HostViewMut::F32(x)).collect();
        let gv: Vec<Option<HostView<'_>>> = g32.iter().map(|x| Some(HostView::F32(x))).collect();
        opt.step(&mut views, &gv).unwrap();
    }
    p.iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect()
}

/// Float32 is checked against this crate's own float64 on well-conditioned
/// problems (damping well above float32 rounding of the statistics): the
/// parameters agree to about 1e-5 of their scale. (On ill-conditioned ones,
/// float32 Shampoo legitimately differs from float64 by far more, in the
/// published implementation too.)
#[test]
fn float32_tracks_float64_on_well_conditioned_problems() {
    let shapes = vec![vec![24, 16], vec![16], vec![6, 5, 4], vec![40, 3]];
    let init = gradients(21, &shapes, 1).remove(0);
    let grads = gradients(22, &shapes, 30);
    // Eigenvalue-corrected Shampoo's basis is only well defined once the
    // statistics are full rank (degenerate eigenvalues make the basis, and
    // so the direction, arbitrary, in float64 too): its first basis comes at
    // step 20, when every factor has seen enough gradients.
    for (precond, start) in [
        (r#"{"type": "root_inv"}"#, 4),
        (
            r#"{"type": "root_inv", "root_inverse": {"method": "coupled_newton", "tolerance": 1e-5}}"#,
            4,
        ),
        (r#"{"type": "eigenvalue_corrected"}"#, 20),
    ] {
        let cfg = format!(
            r#"{{"lr": 0.01, "betas": [0.9, 0.999], "epsilon": 1e-3, "max_preconditioner_dim": 16,
                "precondition_frequency": 4, "start_preconditioning_step": {start},
                "grafting": {{"type": "adam"}}, "preconditioner": {precond}}}"#
        );
        let p64 = run64(config(&cfg), &shapes, &init, &grads);
        let p32 = run32(&cfg, &shapes, &init, &grads);
        let err = max_rel(&p32, &p64);
        assert!(err < 2e-5, "{precond}: f32 vs f64 relative error {err:e}");
    }
}

#[test]
fn parameters_without_gradients_are_untouched_bit_for_bit() {
    let shapes = vec![vec![6, 5], vec![9], vec![6, 5]];
    let cfg = config(
        r#"{"max_preconditioner_dim": 4, "weight_decay": 0.1, "betas": [0.9, 0.99],
            "momentum": {"momentum": 0.9}, "grafting": {"type": "adam"}}"#,
    );
    let mut opt = optimizer64(cfg, &shapes);
    let mut p = gradients(5, &shapes, 1).remove(0);
    p[1][3] = -0.0;
    let grads = gradients(6, &shapes, 4);
    step64(
        &mut opt,
        &mut p,
        &grads[0].iter().map(Some).collect::<Vec<_>>(),
    );
    let (state, _) = opt.state_tensors().unwrap();
    let before = p[1].clone();
    let blocks_of_1: Vec<usize> = opt.layout().params[1].blocks.clone().collect();
    for g in &grads[1..] {
        step64(&mut opt, &mut p, &[Some(&g[0]), None, Some(&g[2])]);
    }
    assert!(
        p[1].iter()
            .zip(&before)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "parameter 1 unchanged, -0.0 included"
    );
    let (after, _) = opt.state_tensors().unwrap();
    for (name, t) in &state {
        let id: usize = name.split('/').nth(1).unwrap().parse().unwrap();
        if blocks_of_1.contains(&id) {
            assert_eq!(Some(t), after.get(name), "{name} untouched");
        } else if !name.ends_with("failures") {
            assert_ne!(
                Some(t),
                after.get(name),
                "{name} of a parameter with gradients moved"
            );
        }
    }
    assert_eq!(opt.step_count(), 4, "the step counter still advances");
    // All gradients missing: nothing moves.
    let frozen = p.clone();
    step64(&mut opt, &mut p, &[None, None, None]);
    assert_eq!(p, frozen);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let shapes = vec![vec![4, 3], vec![2]];
    let mut opt = optimizer64(config("{}"), &shapes);
    let mut a = vec![0.0f64; 12];
    let mut b = vec![0.0f64; 3];
    let g = vec![0.0f64; 12];
    let e = opt
        .step(
            &mut [HostViewMut::F64(&mut a), HostViewMut::F64(&mut b)],
            &[Some(HostView::F64(&g)), None],
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "shape mismatch: parameter 1 has 3 elements, its shape [2] has 2"
    );
    let mut b = vec![0.0f64; 2];
    let g32 = vec![0.0f32; 12];
    let e = opt
        .step(
            &mut [HostViewMut::F64(&mut a), HostViewMut::F64(&mut b)],
            &[Some(HostView::F32(&g32)), None],
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "dtype mismatch: gradient 0 is f32, the optimizer was built for f64"
    );
    let e = opt
        .step(&mut [HostViewMut::F64(&mut a)], &[None])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "shape mismatch: expected 2 parameters and gradients, got 1 and 1"
    );
    assert_eq!(opt.step_count(), 0, "rejected steps do not count");
    assert!(opt.set_lr(-1.0).is_err() && opt.set_lr(f64::NAN).is_err());
}

#[test]
fn non_finite_statistics_are_an_error_naming_the_block() {
    let shapes = vec![vec![3], vec![4, 4]];
    let mut opt = optimizer64(config(r#"{"max_preconditioner_dim": 4}"#), &shapes);
    let mut p = [vec![0.0; 3], vec![0.0; 16]];
    let mut g = [vec![1.0; 3], vec![1.0; 16]];
    g[1][5] = f64::NAN;
    let mut views: Vec<HostViewMut<'_>> = p.iter_mut().map(|x| HostViewMut::F64(x)).collect();
    let gv: Vec<Option<HostView<'_>>> = g.iter().map(|x| Some(HostView::F64(x))).collect();
    match opt.step(&mut views, &gv) {
        Err(Error::NonFinite {
            kind: MatrixKind::Factor,
            block: 1,
            param: 1,
            shape,
            step: 1,
            ..
        }) => {
            assert_eq!(shape, vec![4, 4]);
        }
        other => panic!("expected a non-finite factor error, got {other:?}"),
    }
}

#[test]
fn solver_failures_keep_the_previous_root_then_error_after_three() {
    let shapes = vec![vec![5]];
    let cfg = config(r#"{"lr": 0.5, "betas": [0.0, 1.0], "epsilon": 1e-6}"#);
    let be = Flaky::new(Outcome::Fail);
    let mut opt = Shampoo::new(cfg, &shapes, DType::F64, be).unwrap();
    let mut p = vec![0.0f64; 5];
    let g = vec![1.0, -2.0, 3.0, 0.5, 0.25];
    for k in 1..=3 {
        opt.step(&mut [HostViewMut::F64(&mut p)], &[Some(HostView::F64(&g))])
            .unwrap();
        // The root stays the identity: plain gradient steps.
        let want: Vec<f64> = g.iter().map(|x| -(0.5f32 as f64) * x * k as f64).collect();
        assert_eq!(p, want, "step {k}");
    }
    match opt.step(&mut [HostViewMut::F64(&mut p)], &[Some(HostView::F64(&g))]) {
        Err(Error::RootInverseFailed {
            block: 0,
            failures: 4,
            step: 4,
            ..
        }) => {}
        other => panic!("expected the fourth failure to be an error, got {other:?}"),
    }
    let msg = opt
        .step(&mut [HostViewMut::F64(&mut p)], &[Some(HostView::F64(&g))])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("failed 5 times in a row"), "{msg}");
    // A success resets the count.
    opt.backend().set(Outcome::Solve);
    opt.step(&mut [HostViewMut::F64(&mut p)], &[Some(HostView::F64(&g))])
        .unwrap();
    opt.backend().set(Outcome::Fail);
    opt.step(&mut [HostViewMut::F64(&mut p)], &[Some(HostView::F64(&g))])
        .unwrap();
}

#[test]
fn float64_factors_with_float32_parameters() {
    let shapes = vec![vec![20, 12], vec![12]];
    let init = gradients(31, &shapes, 1).remove(0);
    let grads = gradients(32, &shapes, 12);
    let base = r#""lr": 0.01, "betas": [0.9, 0.999], "epsilon": 1e-3, "max_preconditioner_dim": 16,
                   "precondition_frequency": 3, "grafting": {"type": "adam"}"#;
    let p64 = run64(config(&format!("{{{base}}}")), &shapes, &init, &grads);
    let p32 = run32(&format!("{{{base}}}"), &shapes, &init, &grads);
    let mixed = run32(
        &format!(r#"{{{base}, "factor_dtype": "f64"}}"#),
        &shapes,
        &init,
        &grads,
    );
    let (e32, emixed) = (max_rel(&p32, &p64), max_rel(&mixed, &p64));
    assert!(
        emixed < 2e-5 && e32 < 2e-5,
        "f32 {e32:e}, f32 with f64 factors {emixed:e}"
    );
    assert_ne!(mixed, p32, "the factor dtype is used");
}

#[test]
fn a_backend_without_an_operation_refuses_the_configuration_at_construction() {
    let cases = [
        (
            Op::Qr,
            r#"{"preconditioner": {"type": "eigenvalue_corrected", "eigendecomposition": {"method": "qr"}}}"#,
            "the flaky backend cannot run the QR eigendecomposition yet (it lacks the Qr operation); use the CPU backend for this configuration",
        ),
        (
            Op::AveragingMaps,
            r#"{"iterate_averaging": {"type": "schedule_free"}}"#,
            "the flaky backend cannot run iterate averaging yet (it lacks the AveragingMaps operation)",
        ),
        (
            Op::Orthogonalize,
            r#"{"preconditioner": {"type": "spectral_descent", "orthogonalization": {"method": "svd"}}}"#,
            "cannot run spectral descent by SVD yet",
        ),
        (
            Op::EigenRules,
            r#"{"epsilon": 0.0, "preconditioner": {"type": "root_inv", "root_inverse": {"method": "eigh", "rank_deficient_stability": {"type": "pseudo_inverse"}}}}"#,
            "cannot run the pseudo-inverse yet",
        ),
    ];
    for (op, cfg, want) in cases {
        let be = Flaky::lacking(op);
        let e = match Shampoo::new(config(cfg), &[vec![4, 4]], DType::F64, be) {
            Ok(_) => panic!("{cfg} should be refused"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{e}");
        // The same backend runs configurations without the operation.
        let be = Flaky::lacking(op);
        Shampoo::new(config("{}"), &[vec![4, 4]], DType::F64, be).unwrap();
    }
}

fn step_f64(
    opt: &mut Shampoo<CpuBackend>,
    p: &mut [Vec<f64>],
    g: &[Option<Vec<f64>>],
) -> Result<()> {
    let mut v: Vec<HostViewMut<'_>> = p.iter_mut().map(|p| HostViewMut::F64(p)).collect();
    let gv: Vec<Option<HostView<'_>>> = g.iter().map(|g| g.as_deref().map(HostView::F64)).collect();
    opt.step(&mut v, &gv)
}

fn switch(opt: &mut Shampoo<CpuBackend>, p: &mut [Vec<f64>], to_eval: bool) {
    let mut v: Vec<HostViewMut<'_>> = p.iter_mut().map(|p| HostViewMut::F64(p)).collect();
    if to_eval {
        opt.eval(&mut v).unwrap();
    } else {
        opt.train(&mut v).unwrap();
    }
}

#[test]
fn iterate_averaging_eval_and_train_follow_the_published_semantics() {
    let shapes = vec![vec![6, 5], vec![4]];
    let cfg = config(
        r#"{"lr": 0.1, "betas": [0.0, 0.99], "epsilon": 1e-8, "max_preconditioner_dim": 8,
            "iterate_averaging": {"type": "gpa", "eval_interp_coeff": 0.9, "train_interp_coeff": 0.8}}"#,
    );
    let mut opt = Shampoo::new(cfg, &shapes, DType::F64, CpuBackend::new(1).unwrap()).unwrap();
    let init = vec![vec![0.5; 30], vec![-1.0; 4]];
    let g = |k: f64| {
        vec![
            Some((0..30).map(|i| (i as f64 + k).sin()).collect()),
            Some(vec![k; 4]),
        ]
    };
    let mut p = init.clone();
    // Before the first step Z = y: the evaluation view is y itself.
    switch(&mut opt, &mut p, true);
    assert_eq!(p, init);
    assert!(!opt.is_train_mode());
    assert!(matches!(
        step_f64(&mut opt, &mut p, &g(1.0)),
        Err(Error::EvalMode)
    ));
    switch(&mut opt, &mut p, false);
    for k in 1..=3 {
        step_f64(&mut opt, &mut p, &g(k as f64)).unwrap();
    }
    let y = p.clone();
    switch(&mut opt, &mut p, true);
    let x = p.clone();
    assert_ne!(x, y);
    switch(&mut opt, &mut p, true);
    assert_eq!(p, x, "eval twice is eval once");
    switch(&mut opt, &mut p, false);
    // Back to y up to float32 rounding of the coefficients (1 - 1/mu_y and
    // 1 - mu_y do not cancel exactly).
    let err = shampoo_core::reference::relative_error(&p.concat(), &y.concat());
    assert!(err < 1e-6, "train(eval(y)) = y: {err:e}");
    switch(&mut opt, &mut p, false);
    step_f64(&mut opt, &mut p, &g(4.0)).unwrap();
    // A parameter without a gradient stays bit for bit, and so does its Z.
    let before = p[1].clone();
    step_f64(&mut opt, &mut p, &[g(5.0)[0].clone(), None]).unwrap();
    assert_eq!(
        p[1].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        before.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    // Without iterate averaging, eval and train do nothing.
    let mut plain = Shampoo::new(
        config("{}"),
        &shapes,
        DType::F64,
        CpuBackend::new(1).unwrap(),
    )
    .unwrap();
    let mut q = init.clone();
    step_f64(&mut plain, &mut q, &g(1.0)).unwrap();
    let r = q.clone();
    switch(&mut plain, &mut q, true);
    assert_eq!(q, r);
    assert!(plain.is_train_mode());
    step_f64(&mut plain, &mut q, &g(2.0)).unwrap();
}
