//! The batched coupled Newton root inverse (`"method": "batched_newton"`):
//! accuracy against eigh, failures, non-finite inputs, and no read-back
//! inside the iteration.

mod common;
use common::*;
use shampoo_core::checkpoint::HostTensor;
use shampoo_core::config::{Amortized, RootInverse};
use shampoo_core::{CpuBackend, DType, Error, HostView, HostViewMut, MatrixKind, Shampoo};
use std::collections::BTreeMap;

/// The documented bounds on `max |X - X_eigh| / max |X_eigh|` (float64
/// eigh as the reference) for condition numbers up to `1e3`, default
/// iterations (see `algorithm/root_inverse/batched_newton.rs`).
const BOUND_F64: f64 = 2e-13;
const BOUND_F32: f64 = 2e-5;

const BATCHED: &str = r#"{"type": "root_inv", "root_inverse": {"method": "batched_newton"}}"#;
const EIGH: &str = r#"{"type": "root_inv", "root_inverse": {"method": "eigh"}}"#;

/// Groups of several same-shape blocks: order 2 (`p = 4`, 32 and 64 wide),
/// order 3 (`p = 6`, 8 and 16 wide) and order 1 (`p = 2`, 48 wide).
fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![32, 64],
        vec![32, 64],
        vec![64, 128],
        vec![8, 16, 16],
        vec![8, 16, 16],
        vec![48],
        vec![48],
    ]
}

/// Summed statistics of four steps, roots computed once at step 4.
fn cfg(precond: &str, eps: f64) -> String {
    format!(
        r#"{{"lr": 1.0, "betas": [0.0, 1.0], "epsilon": {eps}, "max_preconditioner_dim": 64,
            "precondition_frequency": 4, "start_preconditioning_step": 4, "preconditioner": {precond}}}"#
    )
}

fn as_f64(t: &HostTensor) -> Vec<f64> {
    match t {
        HostTensor::F32(v, _) => v.iter().map(|&x| x as f64).collect(),
        HostTensor::F64(v, _) => v.clone(),
        HostTensor::U32(v, _) => v.iter().map(|&x| x as f64).collect(),
    }
}

/// Random gradients scaled by `10^(-0.7 k / (n - 1))` along each dimension
/// (`k` the index along it, `n` its size): each factor's spectrum spreads
/// over about 1.4 decades on top of the random one.
fn graded(shapes: &[Vec<usize>], steps: usize) -> Vec<Vec<Vec<f64>>> {
    let mut grads = gradients(5, shapes, steps);
    for step in &mut grads {
        for (g, shape) in step.iter_mut().zip(shapes) {
            for (k, x) in g.iter_mut().enumerate() {
                let mut rest = k;
                for &n in shape.iter().rev() {
                    let i = rest % n;
                    rest /= n;
                    if n > 1 {
                        *x *= 10f64.powf(-0.85 * i as f64 / (n - 1) as f64);
                    }
                }
            }
        }
    }
    grads
}

/// Runs the four steps in `dtype`; returns the optimizer's state tensors.
fn state_after(
    json: &str,
    dtype: DType,
    steps: usize,
) -> (BTreeMap<String, HostTensor>, Vec<usize>) {
    let shapes = shapes();
    let grads = graded(&shapes, steps);
    let be = CpuBackend::new(2).unwrap();
    let mut opt = Shampoo::new(config(json), &shapes, dtype, be).unwrap();
    let orders: Vec<usize> = opt.layout().blocks.iter().map(|b| b.dims.len()).collect();
    match dtype {
        DType::F64 => {
            let mut p: Vec<Vec<f64>> = shapes.iter().map(|s| vec![0.0; numel(s)]).collect();
            for g in &grads {
                step64(&mut opt, &mut p, &g.iter().map(Some).collect::<Vec<_>>());
            }
        }
        _ => {
            let mut p: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.0; numel(s)]).collect();
            for g in &grads {
                let g32: Vec<Vec<f32>> = g
                    .iter()
                    .map(|v| v.iter().map(|&x| x as f32).collect())
                    .collect();
                let mut views: Vec<HostViewMut<'_>> =
                    p.iter_mut().map(|x| HostViewMut::F32(x)).collect();
                let gv: Vec<Option<HostView<'_>>> =
                    g32.iter().map(|x| Some(HostView::F32(x))).collect();
                opt.step(&mut views, &gv).unwrap();
            }
        }
    }
    (opt.state_tensors().unwrap().0, orders)
}

/// The largest eigenvalue of a symmetric positive definite matrix (power
/// iteration, Rayleigh quotient).
fn lambda_max(a: &[f64], n: usize) -> f64 {
    let mut v: Vec<f64> = (0..n).map(|i| 1.0 + 0.01 * i as f64).collect();
    let mut lambda = 0.0;
    for _ in 0..500 {
        let w: Vec<f64> = (0..n)
            .map(|i| (0..n).map(|j| a[i * n + j] * v[j]).sum())
            .collect();
        let vv: f64 = v.iter().map(|x| x * x).sum();
        lambda = v.iter().zip(&w).map(|(x, y)| x * y).sum::<f64>() / vv;
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        v = w.iter().map(|x| x / norm).collect();
    }
    lambda
}

/// Per root: `(key, p, condition number, relative error)` of `got` against
/// the float64 eigh roots.
fn errors(
    got: &BTreeMap<String, HostTensor>,
    eigh: &BTreeMap<String, HostTensor>,
    orders: &[usize],
    eps: f64,
) -> Vec<(String, u32, f64, f64)> {
    let mut out = Vec::new();
    for (key, want) in eigh.iter().filter(|(k, _)| k.contains("/root/")) {
        let want = as_f64(want);
        let n = (want.len() as f64).sqrt() as usize;
        let id: usize = key.split('/').nth(1).unwrap().parse().unwrap();
        let p = 2 * orders[id] as u32;
        // cond(A) = lambda_max(A) / lambda_min(A), lambda_min = lambda_max(X)^-p.
        let mut a = as_f64(&eigh[&key.replace("/root/", "/factor/")]);
        for i in 0..n {
            a[i * n + i] += eps;
        }
        let cond = lambda_max(&a, n) * lambda_max(&want, n).powi(p as i32);
        let err = shampoo_core::reference::relative_error(&as_f64(&got[key]), &want);
        out.push((key.clone(), p, cond, err));
    }
    out
}

#[test]
fn batched_newton_matches_eigh_on_well_conditioned_factors() {
    let eps = 0.03;
    let (eigh, orders) = state_after(&cfg(EIGH, eps), DType::F64, 4);
    let (eigh32, _) = state_after(&cfg(EIGH, eps), DType::F32, 4);
    let (b64, _) = state_after(&cfg(BATCHED, eps), DType::F64, 4);
    let (b32, _) = state_after(&cfg(BATCHED, eps), DType::F32, 4);
    let e64 = errors(&b64, &eigh, &orders, eps);
    let e32 = errors(&b32, &eigh, &orders, eps);
    let eigh_e32 = errors(&eigh32, &eigh, &orders, eps);
    let mut roots = [0u32; 7];
    let (mut worst64, mut worst32, mut worst_eigh32, mut worst_cond) = (0f64, 0f64, 0f64, 0f64);
    for ((a, b), c) in e64.iter().zip(&e32).zip(&eigh_e32) {
        let (key, p, cond, err64) = a;
        println!(
            "{key}: p = {p}, cond = {cond:.1}, f64 {err64:.2e}, f32 {:.2e} (f32 eigh {:.2e})",
            b.3, c.3
        );
        roots[*p as usize] += 1;
        worst64 = worst64.max(*err64);
        worst32 = worst32.max(b.3);
        worst_eigh32 = worst_eigh32.max(c.3);
        worst_cond = worst_cond.max(*cond);
    }
    println!(
        "worst: f64 {worst64:.2e}, f32 {worst32:.2e} (f32 eigh {worst_eigh32:.2e}), cond {worst_cond:.1}"
    );
    assert!(roots[2] >= 2 && roots[4] >= 6 && roots[6] >= 6, "{roots:?}");
    assert!(
        worst_cond <= 1e3 && worst_cond > 100.0,
        "well conditioned, not trivially: {worst_cond}"
    );
    assert!(worst64 < BOUND_F64, "f64 relative error {worst64:e}");
    assert!(worst32 < BOUND_F32, "f32 relative error {worst32:e}");
    // Every block converged: no failure was counted.
    for (key, t) in b64.iter().chain(&b32) {
        if key.ends_with("/failures") {
            assert!(as_f64(t).iter().all(|&f| f == 0.0), "{key}");
        }
    }
}

#[test]
fn non_convergence_keeps_the_previous_root_and_errors_after_three() {
    // One Newton step cannot reach max |M - I| <= 1e-10.
    let shapes = vec![vec![6, 5], vec![6, 5], vec![7]];
    let json = r#"{"lr": 0.5, "betas": [0.0, 1.0], "epsilon": 1e-2, "max_preconditioner_dim": 8,
        "preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton", "iterations": 1, "tolerance": 1e-10}}}"#;
    let mut opt = optimizer64(config(json), &shapes);
    let grads = gradients(3, &shapes, 5);
    let mut p: Vec<Vec<f64>> = shapes.iter().map(|s| vec![0.0; numel(s)]).collect();
    for (k, g) in grads.iter().take(3).enumerate() {
        step64(&mut opt, &mut p, &g.iter().map(Some).collect::<Vec<_>>());
        let (state, _) = opt.state_tensors().unwrap();
        for (key, t) in &state {
            if key.contains("/root/") {
                // The previous root is the initial identity.
                let x = as_f64(t);
                let n = (x.len() as f64).sqrt() as usize;
                let eye: Vec<f64> = (0..n * n)
                    .map(|i| f64::from(u8::from(i % (n + 1) == 0)))
                    .collect();
                assert_eq!(x, eye, "{key} after step {}", k + 1);
            }
            if key.ends_with("/failures") {
                assert!(as_f64(t).iter().all(|&f| f == (k + 1) as f64), "{key}");
            }
        }
    }
    let totals = opt.root_inverse_totals();
    // 3 blocks with 2 + 2 + 1 factors, 3 steps.
    assert_eq!((totals.failures, totals.kept_previous), (15, 15));
    let g: Vec<Option<&Vec<f64>>> = grads[3].iter().map(Some).collect();
    let mut views: Vec<HostViewMut<'_>> = p.iter_mut().map(|x| HostViewMut::F64(x)).collect();
    let gv: Vec<Option<HostView<'_>>> = g.iter().map(|x| x.map(|x| HostView::F64(x))).collect();
    match opt.step(&mut views, &gv) {
        Err(Error::RootInverseFailed {
            block: 0,
            failures: 4,
            step: 4,
            ..
        }) => {}
        other => panic!("expected the fourth failure to be an error, got {other:?}"),
    }

    // The same factors converge with the defaults: no failure.
    let json = json.replace(r#", "iterations": 1, "tolerance": 1e-10"#, "");
    let mut opt = optimizer64(config(&json), &shapes);
    let mut p: Vec<Vec<f64>> = shapes.iter().map(|s| vec![0.0; numel(s)]).collect();
    for g in &grads {
        step64(&mut opt, &mut p, &g.iter().map(Some).collect::<Vec<_>>());
    }
    assert_eq!(opt.root_inverse_totals().failures, 0);
}

#[test]
fn non_finite_input_is_an_error_and_a_non_finite_root_a_failure() {
    // NaN in a factor: an error naming the block, as for every method.
    let shapes = vec![vec![3], vec![4, 4]];
    let json = r#"{"max_preconditioner_dim": 4,
        "preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}}}"#;
    let mut opt = optimizer64(config(json), &shapes);
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
            step: 1,
            ..
        }) => {}
        other => panic!("expected a non-finite factor error, got {other:?}"),
    }

    // A finite factor whose Frobenius norm overflows: the start divides by
    // infinity and the root is not finite. That is a failure of the method
    // (the previous root is kept), not an error.
    let shapes = vec![vec![4]];
    let json = r#"{"lr": 1e-300, "betas": [0.0, 1.0], "epsilon": 1e-12,
        "preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}}}"#;
    let mut opt = optimizer64(config(json), &shapes);
    let mut p = vec![0.0; 4];
    let g = vec![1e154, -1e154, 1e154, 1e154];
    opt.step(&mut [HostViewMut::F64(&mut p)], &[Some(HostView::F64(&g))])
        .unwrap();
    let (state, _) = opt.state_tensors().unwrap();
    let factor = as_f64(&state["block/0/factor/0"]);
    assert!(factor.iter().all(|x| x.is_finite()), "the input is finite");
    assert_eq!(as_f64(&state["block/0/failures"]), vec![1.0]);
    let root = as_f64(&state["block/0/root/0"]);
    assert_eq!(
        root,
        vec![
            1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1.
        ]
    );
}

/// Downloads of each of `steps` steps of a Flaky-backed optimizer, and its
/// number of factors (one per dimension of each group of same-shape
/// blocks).
fn downloads(precond: &str, steps: usize) -> (Vec<usize>, usize) {
    let shapes = vec![vec![12, 10], vec![12, 10], vec![10], vec![5, 4, 3]];
    let json = format!(
        r#"{{"betas": [0.9, 0.99], "epsilon": 1e-4, "max_preconditioner_dim": 8, "precondition_frequency": 2,
            "preconditioner": {precond}}}"#
    );
    let be = Flaky::new(Outcome::Solve);
    let mut opt = Shampoo::new(config(&json), &shapes, DType::F64, be).unwrap();
    let factors = opt.layout().groups.iter().map(|g| g.factors.len()).sum();
    let grads = gradients(9, &shapes, steps);
    let mut p: Vec<Vec<f64>> = shapes.iter().map(|s| vec![0.0; numel(s)]).collect();
    let mut out = Vec::new();
    for g in &grads {
        let before = opt.backend().downloads();
        let mut views: Vec<HostViewMut<'_>> = p.iter_mut().map(|x| HostViewMut::F64(x)).collect();
        let gv: Vec<Option<HostView<'_>>> = g.iter().map(|x| Some(HostView::F64(x))).collect();
        opt.step(&mut views, &gv).unwrap();
        out.push(opt.backend().downloads() - before);
    }
    (out, factors)
}

#[test]
fn the_step_reads_back_once_per_factor_whatever_the_iteration_count() {
    let method = |m: &str| format!(r#"{{"type": "root_inv", "root_inverse": {m}}}"#);
    let (few, factors) = downloads(
        &method(r#"{"method": "batched_newton", "iterations": 2, "tolerance": 1e10}"#),
        6,
    );
    let (many, _) = downloads(
        &method(r#"{"method": "batched_newton", "iterations": 40}"#),
        6,
    );
    let (eigh, _) = downloads(&method(r#"{"method": "eigh"}"#), 6);
    let (newton, _) = downloads(&method(r#"{"method": "coupled_newton"}"#), 6);
    println!(
        "batched (2 iterations) {few:?}, batched (40) {many:?}, eigh {eigh:?}, coupled Newton {newton:?}"
    );
    // The amortized steps are 2, 4, 6; the others read nothing back.
    assert_eq!(few, many, "independent of the iteration count");
    assert_eq!(few, eigh, "the same single read-back of the flags as eigh");
    assert_eq!(few[0], 0);
    // The read-back is one download of each factor's flags (all blocks of
    // a group at once).
    assert_eq!((few[1], few[3], few[5]), (factors, factors, factors));
    assert!(
        newton[1] > few[1],
        "coupled Newton reads back every iteration"
    );
}

#[test]
fn the_method_is_parsed_with_defaults_and_serialized_back() {
    let c = config(&format!(r#"{{"preconditioner": {BATCHED}}}"#));
    let Amortized::RootInverse(r) = c.amortized() else {
        panic!("root inverse");
    };
    assert_eq!(
        r,
        RootInverse::BatchedNewton {
            iterations: 30,
            tolerance: 1e-3
        }
    );
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(
        json,
        r#"{"method":"batched_newton","iterations":30,"tolerance":0.001}"#
    );
}
