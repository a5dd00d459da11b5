//! Root inverses against closed forms, through one optimizer step
//! (`lr = 1`, no filtering, summed statistics: `W0 - W1 = P`).

mod common;
use common::*;
use shampoo_core::backend::{
    Backend, EigenRule, EighJob, EighStatus, Map, OrthogonalizeJob, QrJob,
};
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
        rule: EigenRule::ShiftBelow { eps: 0.1 },
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

#[test]
fn perturbation_after_and_pseudo_inverse_rules() {
    let be = CpuBackend::new(1).unwrap();
    let power = |rule, vals: &[f64]| {
        let mut v = vals.to_vec();
        be.map(&mut [Map::EigenPower {
            values: HostViewMut::F64(&mut v),
            n: 3,
            count: vals.len() / 3,
            rule,
            exponent: 0.5,
            half: false,
            select: None,
        }])
        .unwrap();
        v
    };
    // After the decomposition: lambda - min(lambda_min, 0) + eps, always.
    let v = power(
        EigenRule::ShiftNonnegative { eps: 0.1 },
        &[-1.0, 0.5, 2.0, 3.0, 0.2, 1.0],
    );
    let want = [0.1f64, 1.6, 3.1, 3.1, 0.3, 1.1].map(|x| x.powf(-0.5));
    assert_close(&v, &want, 1e-15, "perturbation after");
    // Pseudo-inverse: cutoff max(1e-3 * 4, 0.01) = 0.01 drops 1e-17 and 0.01.
    let v = power(
        EigenRule::PseudoInverse {
            atol: 0.01,
            rtol: Some(1e-3),
        },
        &[1e-17, 0.01, 4.0],
    );
    assert_eq!(v, [0.0, 0.0, 0.5]);
    // rtol null: 3 * eps64 * 4 cuts the rounding noise of a zero.
    let v = power(
        EigenRule::PseudoInverse {
            atol: 0.0,
            rtol: None,
        },
        &[-2e-16, 1.0, 4.0],
    );
    assert_eq!(v, [0.0, 1.0, 0.5]);
}

/// Every root method of `matrix_block_whitens_singular_values`' problem:
/// `X_L G X_R = U diag(s / sqrt(s^2 + eps)) V^T`.
#[test]
fn every_root_method_whitens_singular_values() {
    let n = 6;
    let (u, v) = (orthogonal(1, n), orthogonal(2, n));
    let s = [3.0, 2.0, 1.5, 1.0, 0.5, 0.25];
    let g = usv(&u, &s, &v, n);
    let eps = 0.1;
    let want = usv(&u, &s.map(|x| x / (x * x + eps).sqrt()), &v, n);
    let methods: &[(&str, f64)] = &[
        (
            r#"{"type": "root_inv", "root_inverse": {"method": "coupled_higher_order", "rel_epsilon": 0.0, "abs_epsilon": 0.1, "tolerance": 0.0}}"#,
            1e-12,
        ),
        (
            r#"{"type": "root_inv", "root_inverse": {"method": "coupled_higher_order", "rel_epsilon": 0.0, "abs_epsilon": 0.1, "order": 5}}"#,
            1e-9,
        ),
        (
            r#"{"type": "root_inv", "root_inverse": {"method": "eigh", "rank_deficient_stability": {"type": "perturbation", "perturb_before_computation": false}}}"#,
            1e-12,
        ),
        (r#"{"type": "eigendecomposed"}"#, 1e-12),
        (
            r#"{"type": "eigendecomposed", "eigendecomposition": {"method": "eigh", "tolerance": 0.01}}"#,
            1e-12,
        ),
        // QR stops once ||B||^2 - ||diag B||^2 rounds to 0 (as published):
        // the off-diagonal part is then about 1e-8 of B.
        (
            r#"{"type": "eigendecomposed", "eigendecomposition": {"method": "qr", "max_iterations": 400}}"#,
            1e-6,
        ),
        // KL-Shampoo's first statistics are Shampoo's (the roots are I).
        (r#"{"type": "kl_shampoo", "variant": "root_inv"}"#, 1e-12),
        (
            r#"{"type": "kl_shampoo", "variant": "eigendecomposed"}"#,
            1e-12,
        ),
    ];
    for (precond, tol) in methods {
        assert_close(
            &one_step(precond, eps, &[n, n], &g, ""),
            &want,
            *tol,
            precond,
        );
    }
    // The higher-order method with a fractional root (1/0.4 = 5/2):
    // X = A^-0.4 on both sides gives s (s^2 + eps)^-0.8.
    let want = usv(&u, &s.map(|x| x * (x * x + eps).powf(-0.8)), &v, n);
    let precond = r#"{"type": "root_inv", "root_inverse": {"method": "coupled_higher_order", "rel_epsilon": 0.0, "abs_epsilon": 0.1}, "inverse_exponent_override": {"2": 0.4}}"#;
    assert_close(
        &one_step(precond, eps, &[n, n], &g, ""),
        &want,
        1e-9,
        precond,
    );
    assert_close(
        &one_step(
            r#"{"type": "root_inv", "inverse_exponent_override": {"2": 0.4}}"#,
            eps,
            &[n, n],
            &g,
            "",
        ),
        &want,
        1e-12,
        "eigh, exponent 0.4",
    );
}

#[test]
fn pseudo_inverse_drops_the_null_space() {
    // Rank 3: X_L G X_R = U diag(1, 1, 1, 0, 0, 0) V^T.
    let n = 6;
    let (u, v) = (orthogonal(5, n), orthogonal(6, n));
    let g = usv(&u, &[3.0, 2.0, 0.5, 0.0, 0.0, 0.0], &v, n);
    let want = usv(&u, &[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], &v, n);
    for precond in [
        r#"{"type": "root_inv", "root_inverse": {"method": "eigh", "rank_deficient_stability": {"type": "pseudo_inverse", "rank_rtol": 1e-10}}}"#,
        r#"{"type": "eigendecomposed", "eigendecomposition": {"method": "eigh", "rank_deficient_stability": {"type": "pseudo_inverse", "rank_atol": 1e-12}}}"#,
    ] {
        assert_close(
            &one_step(precond, 0.0, &[n, n], &g, ""),
            &want,
            1e-12,
            precond,
        );
    }
}

#[test]
fn spectral_and_sign_descent_directions() {
    for (rows, cols) in [(6, 4), (3, 7)] {
        let k = rows.min(cols);
        let (u, v) = (orthogonal(7, rows), orthogonal(8, cols));
        let mut s = vec![0.0; k];
        for (i, x) in s.iter_mut().enumerate() {
            *x = 2.0 - 0.3 * i as f64;
        }
        // G = U[:, :k] diag(s) V[:, :k]^T
        let g: Vec<f64> = (0..rows * cols)
            .map(|e| {
                let (i, j) = (e / cols, e % cols);
                (0..k)
                    .map(|l| u[i * rows + l] * s[l] * v[j * cols + l])
                    .sum()
            })
            .collect();
        let polar: Vec<f64> = (0..rows * cols)
            .map(|e| {
                let (i, j) = (e / cols, e % cols);
                (0..k).map(|l| u[i * rows + l] * v[j * cols + l]).sum()
            })
            .collect();
        let nuclear: f64 = s.iter().sum();
        let svd = r#"{"type": "spectral_descent", "orthogonalization": {"method": "svd"}}"#;
        assert_close(
            &one_step(svd, 1e-12, &[rows, cols], &g, ""),
            &polar,
            1e-13,
            "svd",
        );
        let scaled = r#"{"type": "spectral_descent", "orthogonalization": {"method": "svd", "scale_by_nuclear_norm": true}}"#;
        let want: Vec<f64> = polar.iter().map(|x| x * nuclear).collect();
        assert_close(
            &one_step(scaled, 1e-12, &[rows, cols], &g, ""),
            &want,
            1e-13,
            "nuclear",
        );
        // Cubic Newton-Schulz (3/2, -1/2, 0) converges to U V^T.
        let ns = r#"{"type": "spectral_descent", "orthogonalization": {"method": "newton_schulz", "num_iterations": 60, "coefficients": [1.5, -0.5, 0.0]}}"#;
        assert_close(
            &one_step(ns, 1e-12, &[rows, cols], &g, ""),
            &polar,
            1e-12,
            "newton-schulz",
        );
        let sign: Vec<f64> = g.iter().map(|x| x.signum()).collect();
        assert_close(
            &one_step(r#"{"type": "sign_descent"}"#, 1e-12, &[rows, cols], &g, ""),
            &sign,
            0.0 + 1e-300,
            "sign",
        );
    }
}

#[test]
fn qr_factorizes_in_both_precisions() {
    let be = CpuBackend::new(2).unwrap();
    let n = 7;
    let a = randn(&mut rng(11), 2 * n * n);
    let mut q = a.clone();
    let mut r = vec![0.0; 2 * n * n];
    be.qr(&mut [QrJob {
        a: HostViewMut::F64(&mut q),
        r: HostViewMut::F64(&mut r),
        n,
        count: 2,
        select: None,
    }])
    .unwrap();
    for b in 0..2 {
        let (qb, rb) = (
            &q[b * n * n..(b + 1) * n * n],
            &r[b * n * n..(b + 1) * n * n],
        );
        for i in 0..n {
            for j in 0..i {
                assert_eq!(rb[i * n + j], 0.0, "R is upper triangular");
            }
        }
        assert_close(
            &matmul(qb, rb, n, n, n),
            &a[b * n * n..(b + 1) * n * n],
            1e-14,
            "Q R = A",
        );
        let qt: Vec<f64> = (0..n * n).map(|k| qb[(k % n) * n + k / n]).collect();
        let mut eye = vec![0.0; n * n];
        (0..n).for_each(|i| eye[i * n + i] = 1.0);
        assert_close(&matmul(&qt, qb, n, n, n), &eye, 1e-14, "Q^T Q = I");
    }
    let mut q32: Vec<f32> = a[..n * n].iter().map(|&x| x as f32).collect();
    let mut r32 = vec![0f32; n * n];
    be.qr(&mut [QrJob {
        a: HostViewMut::F32(&mut q32),
        r: HostViewMut::F32(&mut r32),
        n,
        count: 1,
        select: None,
    }])
    .unwrap();
    let (q64, r64): (Vec<f64>, Vec<f64>) = (
        q32.iter().map(|&x| x as f64).collect(),
        r32.iter().map(|&x| x as f64).collect(),
    );
    assert_close(
        &matmul(&q64, &r64, n, n, n),
        &a[..n * n],
        1e-6,
        "f32 Q R = A",
    );
    // The SVD primitive on a batch with a selection.
    let m = randn(&mut rng(12), 2 * 12);
    let mut out = vec![7.0; 2 * 12];
    let mut nuclear = vec![0.0; 2];
    be.orthogonalize(&mut [OrthogonalizeJob {
        input: HostView::F64(&m),
        out: HostViewMut::F64(&mut out),
        nuclear: Some(HostViewMut::F64(&mut nuclear)),
        rows: 3,
        cols: 4,
        count: 2,
        select: Some(&[1]),
    }])
    .unwrap();
    assert_eq!(&out[..12], &[7.0; 12], "unselected block untouched");
    // U V^T has orthonormal rows (3 x 4).
    let o = &out[12..];
    let oot = matmul(
        o,
        &(0..12).map(|k| o[(k % 3) * 4 + k / 3]).collect::<Vec<_>>(),
        3,
        4,
        3,
    );
    assert_close(
        &oot,
        &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        1e-14,
        "rows orthonormal",
    );
    assert!(nuclear[1] > 0.0 && nuclear[0] == 0.0);
}
