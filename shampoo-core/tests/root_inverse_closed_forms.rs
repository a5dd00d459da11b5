//! Root inverses against closed forms, through one optimizer step
//! (`lr = 1`, no filtering, summed statistics: `W0 - W1 = P`).

mod common;
use common::*;
use shampoo_core::backend::{Backend, EighJob, EighStatus, Map};
use shampoo_core::{CpuBackend, HostView, HostViewMut};

const EIGH: &str = r#"{"type": "root_inv", "root_inverse": {"method": "eigh"}}"#;
const NEWTON: &str = r#"{"type": "root_inv", "root_inverse": {"method": "coupled_newton", "max_iterations": 200, "tolerance": 1e-13}}"#;

/// `P` of one step from zero parameters.
fn one_step(precond: &str, eps: f64, shape: &[usize], g: &[f64], extra: &str) -> Vec<f64> {
    // The largest dimension as the block size: nothing merges.
    let max = shape.iter().copied().max().unwrap_or(1);
    let cfg = config(&format!(
        r#"{{"lr": 1.0, "betas": [0.0, 1.0], "epsilon": {eps}, "max_preconditioner_dim": {max},
            "precondition_frequency": 1, "preconditioner": {precond} {extra}}}"#
    ));
    let shapes = vec![shape.to_vec()];
    let out = run64(cfg, &shapes, &[vec![0.0; g.len()]], &[vec![g.to_vec()]]);
    out[0].iter().map(|w| -w).collect()
}

/// An orthogonal `n x n` matrix (product of two Householder reflections).
fn orthogonal(seed: u64, n: usize) -> Vec<f64> {
    let mut r = rng(seed);
    let mut q = vec![0.0; n * n];
    for i in 0..n {
        q[i * n + i] = 1.0;
    }
    for _ in 0..2 {
        let v = randn(&mut r, n);
        let vv: f64 = v.iter().map(|x| x * x).sum();
        let h: Vec<f64> = (0..n * n)
            .map(|k| f64::from(u8::from(k / n == k % n)) - 2.0 * v[k / n] * v[k % n] / vv)
            .collect();
        q = matmul(&q, &h, n, n, n);
    }
    q
}

fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for l in 0..k {
            for j in 0..n {
                c[i * n + j] += a[i * k + l] * b[l * n + j];
            }
        }
    }
    c
}

/// `U diag(d) V^T`.
fn usv(u: &[f64], d: &[f64], v: &[f64], n: usize) -> Vec<f64> {
    let mut s = vec![0.0; n * n];
    for i in 0..n {
        s[i * n + i] = d[i];
    }
    let vt: Vec<f64> = (0..n * n).map(|k| v[(k % n) * n + k / n]).collect();
    matmul(&matmul(u, &s, n, n, n), &vt, n, n, n)
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    let err = shampoo_core::reference::relative_error(got, want);
    assert!(err < tol, "{what}: relative error {err:e}");
}

#[test]
fn vector_block_is_full_matrix_adagrad() {
    // X = (g g^T + eps I)^(-1/2), so P = X g = g / sqrt(|g|^2 + eps).
    let g = randn(&mut rng(7), 9);
    let eps = 1e-2;
    let norm2: f64 = g.iter().map(|x| x * x).sum();
    let want: Vec<f64> = g.iter().map(|x| x / (norm2 + eps).sqrt()).collect();
    assert_close(&one_step(EIGH, eps, &[9], &g, ""), &want, 1e-13, "eigh");
    assert_close(
        &one_step(NEWTON, eps, &[9], &g, ""),
        &want,
        1e-10,
        "coupled newton",
    );
}

#[test]
fn matrix_block_whitens_singular_values() {
    // G = U diag(s) V^T: X_L G X_R = U diag(s / sqrt(s^2 + eps)) V^T.
    let n = 6;
    let (u, v) = (orthogonal(1, n), orthogonal(2, n));
    let s = [3.0, 2.0, 1.5, 1.0, 0.5, 0.25];
    let g = usv(&u, &s, &v, n);
    let eps = 0.1;
    let want = usv(&u, &s.map(|x| x / (x * x + eps).sqrt()), &v, n);
    assert_close(&one_step(EIGH, eps, &[n, n], &g, ""), &want, 1e-12, "eigh");
    assert_close(
        &one_step(NEWTON, eps, &[n, n], &g, ""),
        &want,
        1e-9,
        "coupled newton",
    );
}

#[test]
fn exponent_overrides_change_the_roots() {
    let n = 5;
    let (u, v) = (orthogonal(3, n), orthogonal(4, n));
    let s = [2.0, 1.7, 1.0, 0.6, 0.3];
    let g = usv(&u, &s, &v, n);
    let eps = 0.05;
    // Exponent 1/2 on both sides: U diag(s / (s^2 + eps)) V^T.
    let want = usv(&u, &s.map(|x| x / (x * x + eps)), &v, n);
    let cfg_pre = r#"{"type": "root_inv", "root_inverse": {"method": "eigh"}, "inverse_exponent_override": {"2": 0.5}}"#;
    assert_close(
        &one_step(cfg_pre, eps, &[n, n], &g, ""),
        &want,
        1e-12,
        "override 0.5",
    );
    // Dimension 1 left alone: U diag(s (s^2 + eps)^(-1/4)) V^T.
    let want = usv(&u, &s.map(|x| x * (x * x + eps).powf(-0.25)), &v, n);
    let cfg_pre = r#"{"type": "root_inv", "inverse_exponent_override": {"2": {"1": 0.0}}}"#;
    assert_close(
        &one_step(cfg_pre, eps, &[n, n], &g, ""),
        &want,
        1e-12,
        "dim 1 unpreconditioned",
    );
    let cfg_pre = r#"{"type": "root_inv", "root_inverse": {"method": "coupled_newton", "tolerance": 1e-13, "max_iterations": 300}, "inverse_exponent_override": {"2": {"1": 0.0}}}"#;
    assert_close(
        &one_step(cfg_pre, eps, &[n, n], &g, ""),
        &want,
        1e-9,
        "newton, dim 1 unpreconditioned",
    );
}

#[test]
fn order_three_block_of_a_rank_one_tensor() {
    // G = a (x) b (x) c: every factor has the eigenvalue |G|^2 along its
    // vector, so P = G (|G|^2 + eps)^(-3/6).
    let (a, b, c) = ([1.0, -2.0, 0.5], [0.3, 1.1], [2.0, -1.0, 0.7, 0.2]);
    let mut g = Vec::new();
    for x in a {
        for y in b {
            for z in c {
                g.push(x * y * z);
            }
        }
    }
    let n2: f64 = g.iter().map(|x| x * x).sum();
    let eps = 1e-3;
    let want: Vec<f64> = g.iter().map(|x| x / (n2 + eps).sqrt()).collect();
    assert_close(
        &one_step(EIGH, eps, &[3, 2, 4], &g, ""),
        &want,
        1e-11,
        "eigh",
    );
    assert_close(
        &one_step(NEWTON, eps, &[3, 2, 4], &g, ""),
        &want,
        1e-8,
        "coupled newton",
    );
}

#[test]
fn eigenvalue_shift_rule() {
    // lambda = [-1, 0.5, 2], eps = 0.1: min < eps, so lambda <- lambda + 1.1.
    let be = CpuBackend::new(1).unwrap();
    let mut vals = vec![-1.0, 0.5, 2.0, 3.0, 0.2, 1.0];
    be.map(&mut [Map::EigenPower {
        values: HostViewMut::F64(&mut vals),
        n: 3,
        count: 2,
        eps: 0.1,
        exponent: 0.5,
        half: false,
        select: None,
    }])
    .unwrap();
    let want = [0.1f64, 1.6, 3.1, 3.0, 0.2, 1.0].map(|x| x.powf(-0.5));
    assert_close(
        &vals,
        &want,
        1e-15,
        "shift applies to the first matrix only",
    );
}

#[test]
fn batched_eigh_matches_a_known_spectrum_in_both_precisions() {
    let be = CpuBackend::new(2).unwrap();
    let n = 8;
    let q = orthogonal(9, n);
    let lam: Vec<f64> = (0..n).map(|i| 0.5 + i as f64).collect();
    let a = usv(&q, &lam, &q, n);
    // f64
    let mut m = [a.clone(), a.clone()].concat();
    let mut w = vec![0.0; 2 * n];
    let mut status = vec![EighStatus::Skipped; 2];
    be.eigh(&mut [EighJob {
        a: HostViewMut::F64(&mut m),
        values: HostViewMut::F64(&mut w),
        n,
        count: 2,
        status: &mut status,
        select: Some(&[1]),
    }])
    .unwrap();
    assert_eq!(status, [EighStatus::Skipped, EighStatus::Ok]);
    assert_close(&w[n..], &lam, 1e-14, "eigenvalues ascending");
    // Eigenvectors are stored column-major: V diag(w) V^T rebuilds A.
    let v: Vec<f64> = (0..n * n).map(|k| m[n * n + (k % n) * n + k / n]).collect();
    assert_close(&usv(&v, &w[n..], &v, n), &a, 1e-13, "reconstruction");
    // f32
    let mut m32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
    let mut w32 = vec![0f32; n];
    let mut st = vec![EighStatus::Skipped];
    be.eigh(&mut [EighJob {
        a: HostViewMut::F32(&mut m32),
        values: HostViewMut::F32(&mut w32),
        n,
        count: 1,
        status: &mut st,
        select: None,
    }])
    .unwrap();
    assert_eq!(st, [EighStatus::Ok]);
    let w64: Vec<f64> = w32.iter().map(|&x| x as f64).collect();
    assert_close(&w64, &lam, 1e-6, "f32 eigenvalues");
    let _ = HostView::F64(&[]);
}
