//! The CUDA backend against the CPU backend, primitive by primitive and on
//! whole optimizer runs, in float64. Needs a GPU: without one (or without
//! the driver) every test prints why and returns.
//!
//! Whole runs start preconditioning only once every factor has seen more
//! gradient columns than its size: the root inverse of a rank-deficient
//! factor turns rounding noise in its null space into large values that
//! depend on the eigensolver, which would make two correct backends differ.
#![cfg(feature = "cuda")]

use shampoo_core::backend::{
    Backend, DirectionSource, EigenRule, EighJob, EighStatus, GatherJob, GraftKernel, GramJob, Map,
    MatmulJob, ModeProductJob, MomentumKernel, ReduceJob, Reduction, ScatterJob, TableEntry,
};
use shampoo_core::blocking::block_parameter;
use shampoo_core::{CpuBackend, CudaBackend, DType, HostView, HostViewMut, Shampoo, ShampooConfig};

type Res<T> = shampoo_core::Result<T>;

fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            println!("skipping: no usable CUDA device ({e})");
            None
        }
    }
}

/// Deterministic values in [-1, 1).
fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

fn up<B: Backend>(b: &B, v: &[f64]) -> Res<B::Buffer> {
    let mut buf = b.alloc(DType::F64, v.len())?;
    b.upload(b.view_mut(&mut buf), HostView::F64(v))?;
    Ok(buf)
}

fn down<B: Backend>(b: &B, buf: &B::Buffer) -> Res<Vec<f64>> {
    let v = b.view(buf);
    let mut h = vec![0.0; shampoo_core::backend::ViewOps::len(&v)];
    b.download(v, HostViewMut::F64(&mut h))?;
    Ok(h)
}

/// Symmetric positive definite matrices (lower triangle meaningful).
fn spd(seed: u64, n: usize, count: usize) -> Vec<f64> {
    let g = values(seed, count * n * n);
    let mut out = vec![0.0; count * n * n];
    for c in 0..count {
        let m = &g[c * n * n..(c + 1) * n * n];
        for i in 0..n {
            for j in 0..n {
                let s: f64 = (0..n).map(|k| m[i * n + k] * m[j * n + k]).sum();
                out[c * n * n + i * n + j] = s + if i == j { 0.5 } else { 0.0 };
            }
        }
    }
    out
}

fn gram_and_products<B: Backend>(b: &B) -> Res<Vec<Vec<f64>>> {
    let dims = [6usize, 5, 4];
    let (count, numel) = (3usize, 120usize);
    let x = up(b, &values(1, count * numel))?;
    let mut out = Vec::new();
    for mode in 0..3 {
        let d = dims[mode];
        let mut f = up(b, &values(2 + mode as u64, count * d * d))?;
        let sel: [u32; 2] = [0, 2];
        b.mode_gram(&mut [GramJob {
            input: b.view(&x),
            dims: &dims,
            count,
            mode,
            out: b.view_mut(&mut f),
            beta: 0.5,
            alpha: 0.25,
            full: true,
            precision: shampoo_core::backend::Precision::F32,
            select: Some(&sel),
        }])?;
        out.push(down(b, &f)?);
        let m = up(b, &values(7 + mode as u64, count * d * d))?;
        for transpose in [false, true] {
            let mut y = b.alloc(DType::F64, count * numel)?;
            b.mode_product(&mut [ModeProductJob {
                input: b.view(&x),
                dims: &dims,
                count,
                mode,
                matrices: b.view(&m),
                transpose,
                out: b.view_mut(&mut y),
                precision: shampoo_core::backend::Precision::F32,
                select: None,
            }])?;
            out.push(down(b, &y)?);
        }
    }
    let n = 7;
    let (a, bb) = (
        up(b, &values(20, 3 * n * n))?,
        up(b, &values(21, 3 * n * n))?,
    );
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut c = up(b, &values(22, 3 * n * n))?;
        b.matmul(&mut [MatmulJob {
            a: b.view(&a),
            b: b.view(&bb),
            c: b.view_mut(&mut c),
            n,
            count: 3,
            trans_a: ta,
            trans_b: tb,
            alpha: -0.75,
            accumulate: true,
            precision: shampoo_core::backend::Precision::F32,
            select: Some(&[1, 2]),
        }])?;
        out.push(down(b, &c)?);
    }
    Ok(out)
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn statistics_products_and_matmuls_match_the_cpu_backend() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new(1).unwrap();
    let (c, d) = (
        gram_and_products(&cpu).unwrap(),
        gram_and_products(&g).unwrap(),
    );
    for (i, (x, y)) in c.iter().zip(&d).enumerate() {
        let e = max_rel(x, y);
        assert!(e < 1e-13, "result {i}: relative difference {e:e}");
    }
}

fn eigh_case<B: Backend>(b: &B, n: usize) -> Res<(Vec<f64>, Vec<f64>, Vec<EighStatus>)> {
    let count = 4;
    let mut a = spd(30 + n as u64, n, count);
    // A non-finite lower triangle: Failed, left as given.
    a[3 * n * n + n] = f64::NAN;
    let mut ab = up(b, &a)?;
    let mut w = b.alloc(DType::F64, count * n)?;
    let mut status = vec![EighStatus::Skipped; count];
    b.eigh(&mut [EighJob {
        a: b.view_mut(&mut ab),
        values: b.view_mut(&mut w),
        n,
        count,
        status: &mut status,
        select: Some(&[0, 1, 3]),
    }])?;
    Ok((down(b, &ab)?, down(b, &w)?, status))
}

#[test]
fn eigendecompositions_match_the_cpu_backend() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new(1).unwrap();
    for n in [1usize, 9, 40] {
        let (va, wa, sa) = eigh_case(&cpu, n).unwrap();
        let (vb, wb, sb) = eigh_case(&g, n).unwrap();
        assert_eq!(sa, sb, "n = {n}");
        assert_eq!(
            sb,
            vec![
                EighStatus::Ok,
                EighStatus::Ok,
                EighStatus::Skipped,
                EighStatus::Failed
            ]
        );
        for m in [0usize, 1] {
            let r = m * n..(m + 1) * n;
            assert!(max_rel(&wa[r.clone()], &wb[r]) < 1e-12, "values, n = {n}");
            // Eigenvectors up to sign: compare Q diag(w) Q^T.
            let rec = |v: &[f64], w: &[f64]| {
                let v = &v[m * n * n..(m + 1) * n * n];
                let w = &w[m * n..(m + 1) * n];
                let mut out = vec![0.0; n * n];
                for i in 0..n {
                    for j in 0..n {
                        // Column-major: eigenvector k is v[k * n..(k + 1) * n].
                        out[i * n + j] = (0..n).map(|k| v[k * n + i] * w[k] * v[k * n + j]).sum();
                    }
                }
                out
            };
            assert!(
                max_rel(&rec(&va, &wa), &rec(&vb, &wb)) < 1e-12,
                "vectors, n = {n}"
            );
        }
        // The failed matrix is left as it was given (NaN included).
        let r = 3 * n * n..4 * n * n;
        let same = va[r.clone()]
            .iter()
            .zip(&vb[r])
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "failed matrix, n = {n}");
    }
}

fn maps_and_reductions<B: Backend>(b: &B) -> Res<Vec<Vec<f64>>> {
    let (n, count) = (6usize, 3usize);
    let nn = n * n;
    let mut out = Vec::new();
    let f = up(b, &spd(40, n, count))?;
    let mut r = b.alloc(DType::F64, count * nn)?;
    b.map(&mut [Map::RootInput {
        factors: b.view(&f),
        out: b.view_mut(&mut r),
        n,
        count,
        divisor: 0.3,
        eps: 1e-3,
        select: None,
    }])?;
    out.push(down(b, &r)?);
    let mut w = up(b, &values(41, count * n))?;
    b.map(&mut [Map::EigenPower {
        values: b.view_mut(&mut w),
        n,
        count,
        rule: EigenRule::ShiftBelow { eps: 1e-2 },
        exponent: 0.5,
        half: true,
        select: Some(&[0, 2]),
    }])?;
    out.push(down(b, &w)?);
    let mut w = up(b, &values(43, count * n))?;
    b.map(&mut [Map::EigenPower {
        values: b.view_mut(&mut w),
        n,
        count,
        rule: EigenRule::PseudoInverse {
            atol: 0.1,
            rtol: None,
        },
        exponent: 0.25,
        half: false,
        select: None,
    }])?;
    out.push(down(b, &w)?);
    let mut x = up(b, &values(42, count * nn))?;
    b.map(&mut [Map::ScaleRows {
        x: b.view_mut(&mut x),
        d: b.view(&w),
        n,
        count,
        select: None,
    }])?;
    b.map(&mut [Map::Symmetrize {
        x: b.view_mut(&mut x),
        n,
        count,
        select: Some(&[1]),
    }])?;
    out.push(down(b, &x)?);
    let mut x32 = b.alloc(DType::F32, count * nn)?;
    b.map(&mut [Map::Copy {
        src: b.view(&x),
        dst: b.view_mut(&mut x32),
        numel: nn,
        count,
        select: None,
    }])?;
    let mut back = b.alloc(DType::F64, count * nn)?;
    b.map(&mut [Map::Copy {
        src: b.view(&x32),
        dst: b.view_mut(&mut back),
        numel: nn,
        count,
        select: None,
    }])?;
    b.map(&mut [Map::Fill {
        dst: b.view_mut(&mut back),
        value: -2.5,
        numel: nn,
        count,
        select: Some(&[2]),
    }])?;
    out.push(down(b, &back)?);
    let mut norms = b.alloc(DType::F64, count)?;
    for kind in [
        Reduction::SumSquares,
        Reduction::FrobeniusNorm,
        Reduction::MaxAbsDevIdentity,
        Reduction::AllFinite,
    ] {
        b.reduce(&mut [ReduceJob {
            input: b.view(&r),
            numel: nn,
            count,
            kind,
            out: b.view_mut(&mut norms),
            select: None,
        }])?;
        out.push(down(b, &norms)?);
    }
    b.reduce(&mut [ReduceJob {
        input: b.view(&r),
        numel: nn,
        count,
        kind: Reduction::FrobeniusNorm,
        out: b.view_mut(&mut norms),
        select: None,
    }])?;
    let (mut xs, mut ms, mut co) = (
        b.alloc(DType::F64, count * nn)?,
        b.alloc(DType::F64, count * nn)?,
        b.alloc(DType::F64, count * nn)?,
    );
    b.map(&mut [Map::NewtonInit {
        a: b.view(&r),
        norms: b.view(&norms),
        numerator: 5.0,
        scale: 2.0,
        x: b.view_mut(&mut xs),
        m: b.view_mut(&mut ms),
        p: 4,
        n,
        count,
        select: None,
    }])?;
    b.map(&mut [Map::NewtonCoefficient {
        m: b.view(&ms),
        out: b.view_mut(&mut co),
        coef: -0.25,
        diag: 1.25,
        n,
        count,
        select: None,
    }])?;
    out.extend([down(b, &xs)?, down(b, &ms)?, down(b, &co)?]);
    // The step's elementwise work on 3 blocks of 50.
    let numel = 50;
    let g = up(b, &values(50, count * numel))?;
    let mut v = up(
        b,
        &values(51, count * numel)
            .iter()
            .map(|x| x * x)
            .collect::<Vec<_>>(),
    )?;
    let mut m1 = up(b, &values(52, count * numel))?;
    let mut gf = b.alloc(DType::F64, count * numel)?;
    let mut sq = b.alloc(DType::F64, 2 * count)?;
    let graft = GraftKernel::Ema {
        beta2: 0.99,
        weight: 1.0 - 0.99,
        eps: 1e-8,
        bc: 0.3,
    };
    {
        let (g2, _) = shampoo_core::backend::ViewMutOps::split_at(b.view_mut(&mut sq), count);
        b.map(&mut [Map::GradientStatistics {
            g: b.view(&g),
            v: Some(b.view_mut(&mut v)),
            graft,
            filtered: Some((b.view_mut(&mut m1), b.view_mut(&mut gf))),
            beta1: 0.9,
            beta3: 0.9,
            bc1: 0.5,
            graft_sq_norms: Some(g2),
            numel,
            count,
            select: None,
        }])?;
    }
    {
        let (_, s2) = shampoo_core::backend::ViewMutOps::split_at(b.view_mut(&mut sq), count);
        b.reduce(&mut [ReduceJob {
            input: b.view(&g),
            numel,
            count,
            kind: Reduction::SumSquares,
            out: s2,
            select: None,
        }])?;
    }
    out.extend([down(b, &v)?, down(b, &m1)?, down(b, &gf)?, down(b, &sq)?]);
    let wts = up(b, &values(53, count * numel))?;
    let mut mom = up(b, &values(54, count * numel))?;
    let mut dir = up(b, &values(55, count * numel))?;
    b.map(&mut [Map::Direction {
        source: DirectionSource::GraftedShampoo,
        gf: b.view(&gf),
        v: Some(b.view(&v)),
        graft,
        p_sh: Some(b.view(&g)),
        sq_norms: Some(b.view(&sq)),
        weight_decay: Some((b.view(&wts), 0.01)),
        momentum: Some((
            b.view_mut(&mut mom),
            MomentumKernel {
                mu: 0.9,
                dampening: 0.1,
                nesterov: true,
            },
        )),
        lr: 0.05,
        out: b.view_mut(&mut dir),
        numel,
        count,
        select: Some(&[0, 2]),
    }])?;
    out.extend([down(b, &mom)?, down(b, &dir)?]);
    b.map(&mut [Map::Direction {
        source: DirectionSource::Graft,
        gf: b.view(&gf),
        v: Some(b.view(&v)),
        graft,
        p_sh: None,
        sq_norms: None,
        weight_decay: None,
        momentum: None,
        lr: 0.05,
        out: b.view_mut(&mut dir),
        numel,
        count,
        select: None,
    }])?;
    out.push(down(b, &dir)?);
    let mut d = up(
        b,
        &values(56, count * numel)
            .iter()
            .map(|x| x * x)
            .collect::<Vec<_>>(),
    )?;
    b.map(&mut [Map::EigenvalueUpdate {
        r: b.view(&g),
        d: b.view_mut(&mut d),
        beta2: 0.95,
        weight: 1.0 - 0.95,
        numel,
        count,
        select: None,
    }])?;
    let mut rr = up(b, &values(57, count * numel))?;
    b.map(&mut [Map::EigenvalueScale {
        r: b.view_mut(&mut rr),
        d: b.view(&d),
        bc2: 0.4,
        eps: 1e-6,
        exponent: 0.5,
        numel,
        count,
        select: Some(&[1]),
    }])?;
    out.extend([down(b, &d)?, down(b, &rr)?]);
    // The maps and reductions of the newer modes (spectral and sign
    // descent, iterate averaging, trace scaling, the higher-order ridge).
    let scal = up(b, &[2.5, 1e-9, 0.7])?;
    let mut s1 = b.alloc(DType::F64, count * numel)?;
    b.map(&mut [Map::ScaleByNorm {
        src: b.view(&g),
        dst: b.view_mut(&mut s1),
        norms: b.view(&scal),
        floor: 1e-8,
        numel,
        count,
        select: Some(&[0, 1]),
    }])?;
    b.map(&mut [Map::Axpby {
        x: b.view_mut(&mut s1),
        y: b.view(&rr),
        a: 3.4445,
        b: -4.775,
        numel,
        count,
        select: None,
    }])?;
    b.map(&mut [Map::ScaleBlocks {
        x: b.view_mut(&mut s1),
        scales: b.view(&scal),
        numel,
        count,
        select: Some(&[2]),
    }])?;
    let mut sg = b.alloc(DType::F64, count * numel)?;
    b.map(&mut [Map::Sign {
        src: b.view(&s1),
        dst: b.view_mut(&mut sg),
        numel,
        count,
        select: None,
    }])?;
    let mut z = up(b, &values(58, count * numel))?;
    let mut u = up(b, &values(59, count * numel))?;
    b.map(&mut [Map::IterateAverage {
        u: b.view_mut(&mut u),
        z: b.view_mut(&mut z),
        w: b.view(&wts),
        c1: 0.28,
        c2: 0.1,
        shrink: Some(0.999),
        numel,
        count,
        select: Some(&[0, 2]),
    }])?;
    let mut it = b.alloc(DType::F64, count * numel)?;
    b.map(&mut [Map::Interpolate {
        z: b.view(&z),
        w: b.view(&wts),
        out: b.view_mut(&mut it),
        coef: -0.25,
        numel,
        count,
        select: None,
    }])?;
    out.extend([
        down(b, &s1)?,
        down(b, &sg)?,
        down(b, &z)?,
        down(b, &u)?,
        down(b, &it)?,
    ]);
    let mut mats = up(b, &values(60, count * nn))?;
    let mut stats = b.alloc(DType::F64, count)?;
    for kind in [Reduction::Trace, Reduction::MaxRowAbsSum] {
        b.reduce(&mut [ReduceJob {
            input: b.view(&mats),
            numel: nn,
            count,
            kind,
            out: b.view_mut(&mut stats),
            select: None,
        }])?;
        out.push(down(b, &stats)?);
    }
    b.map(&mut [Map::TraceScale {
        x: b.view_mut(&mut mats),
        traces: b.view(&scal),
        eps: 1e-10,
        exponent: 0.5,
        n,
        count,
        select: None,
    }])?;
    b.map(&mut [Map::AddRidge {
        x: b.view_mut(&mut mats),
        values: b.view(&stats),
        rel: 1e-3,
        abs: 1e-9,
        n,
        count,
        select: Some(&[1]),
    }])?;
    out.push(down(b, &mats)?);
    Ok(out)
}

#[test]
fn fused_maps_and_reductions_give_the_cpu_backends_bits() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new(1).unwrap();
    let (c, d) = (
        maps_and_reductions(&cpu).unwrap(),
        maps_and_reductions(&g).unwrap(),
    );
    // Results computed with pow may differ in the last bits: 1 and 2
    // (EigenPower's rules), 3 and 4 (rows scaled by its output, and their
    // copies), 9 (NewtonInit's X = z^(1/p) I), the last (TraceScale). The
    // rest is bitwise.
    let pow_results = [1usize, 2, 3, 4, 9, c.len() - 1];
    for (i, (x, y)) in c.iter().zip(&d).enumerate() {
        if pow_results.contains(&i) {
            let e = max_rel(x, y);
            assert!(e < 1e-14, "result {i}: relative difference {e:e}");
        } else {
            let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "result {i} differs: {x:?} vs {y:?}");
        }
    }
}

fn gather_scatter<B: Backend>(b: &B) -> Res<Vec<Vec<f64>>> {
    let shape = [10usize, 7];
    let blocks = block_parameter(0, &shape, 4);
    let mut off = 0;
    let entries: Vec<TableEntry> = blocks
        .into_iter()
        .map(|block| {
            let e = TableEntry {
                packed_offset: off,
                block,
            };
            off += e.block.numel();
            e
        })
        .collect();
    let table = b.block_table(entries)?;
    let p = up(b, &values(60, 70))?;
    let w = up(b, &values(61, 70))?;
    let mut packed = b.alloc(DType::F64, off)?;
    let srcs = [Some(b.view(&p))];
    let adds = [Some(b.view(&w))];
    b.gather(&mut [GatherJob {
        table: &table,
        sources: &srcs,
        add: Some((&adds, 0.3)),
        out: b.view_mut(&mut packed),
        select: None,
    }])?;
    let gathered = down(b, &packed)?;
    let mut dst = up(b, &values(62, 70))?;
    b.scatter(&mut [ScatterJob {
        table: &table,
        source: b.view(&packed),
        dst: b.view_mut(&mut dst),
        add: true,
    }])?;
    Ok(vec![gathered, down(b, &dst)?])
}

#[test]
fn gathers_and_scatters_give_the_cpu_backends_bits() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new(1).unwrap();
    assert_eq!(gather_scatter(&cpu).unwrap(), gather_scatter(&g).unwrap());
}

fn run<B: Backend>(b: B, json: &str) -> Res<Vec<f64>> {
    let shapes = vec![vec![12, 9], vec![5], vec![3, 4, 6], vec![70, 3]];
    let config = ShampooConfig::from_json(json)?;
    let mut opt = Shampoo::new(config, &shapes, DType::F64, b)?;
    let b = opt.backend();
    let mut params: Vec<B::Buffer> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| up(b, &values(70 + i as u64, s.iter().product())))
        .collect::<Res<_>>()?;
    for step in 0..14u64 {
        let b = opt.backend();
        let grads: Vec<B::Buffer> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| up(b, &values(100 * step + i as u64, s.iter().product())))
            .collect::<Res<_>>()?;
        let gv: Vec<Option<B::View<'_>>> = grads.iter().map(|g| Some(b.view(g))).collect();
        let mut pv: Vec<B::ViewMut<'_>> = params.iter_mut().map(|p| b.view_mut(p)).collect();
        opt.step(&mut pv, &gv)?;
    }
    let b = opt.backend();
    let mut all = Vec::new();
    for p in &params {
        all.extend(down(b, p)?);
    }
    Ok(all)
}

#[test]
fn whole_runs_match_the_cpu_backend_in_float64() {
    let Some(_) = gpu() else { return };
    for json in [
        r#"{"lr": 0.01, "max_preconditioner_dim": 8, "precondition_frequency": 2, "start_preconditioning_step": 10,
            "grafting": {"type": "adam", "beta2": 0.99, "epsilon": 1e-8},
            "momentum": {"momentum": 0.5, "dampening": 0.0, "nesterov": true},
            "weight_decay": 0.01}"#,
        r#"{"lr": 0.01, "max_preconditioner_dim": 8, "precondition_frequency": 2, "start_preconditioning_step": 10,
            "epsilon": 1e-4, "grafting": {"type": "adagrad", "epsilon": 1e-8},
            "preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_newton"}}}"#,
        r#"{"lr": 0.01, "max_preconditioner_dim": 8, "precondition_frequency": 2, "start_preconditioning_step": 10,
            "epsilon": 1e-4, "grafting": {"type": "adagrad", "epsilon": 1e-8},
            "preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}}}"#,
        r#"{"lr": 0.01, "max_preconditioner_dim": 8, "precondition_frequency": 2, "start_preconditioning_step": 10,
            "grafting": {"type": "rmsprop", "beta2": 0.99, "epsilon": 1e-8},
            "preconditioner": {"type": "eigenvalue_corrected"}}"#,
    ] {
        let a = run(CpuBackend::new(1).unwrap(), json).unwrap();
        let b = run(CudaBackend::new(0).unwrap(), json).unwrap();
        let e = max_rel(&a, &b);
        assert!(e < 1e-9, "{json}: relative difference {e:e}");
    }
}

/// The cases above, on the CPU backend alone (one thread against two), so
/// that the harness itself is exercised on machines without a GPU.
#[test]
fn the_comparison_cases_run_on_the_cpu_backend() {
    let (one, two) = (CpuBackend::new(1).unwrap(), CpuBackend::new(2).unwrap());
    assert_eq!(
        gram_and_products(&one).unwrap(),
        gram_and_products(&two).unwrap()
    );
    let bits = |v: Vec<Vec<f64>>| -> Vec<Vec<u64>> {
        v.into_iter()
            .map(|x| x.into_iter().map(f64::to_bits).collect())
            .collect()
    };
    assert_eq!(
        bits(maps_and_reductions(&one).unwrap()),
        bits(maps_and_reductions(&two).unwrap())
    );
    assert_eq!(gather_scatter(&one).unwrap(), gather_scatter(&two).unwrap());
    let (_, _, status) = eigh_case(&one, 9).unwrap();
    assert_eq!(
        status,
        vec![
            EighStatus::Ok,
            EighStatus::Ok,
            EighStatus::Skipped,
            EighStatus::Failed
        ]
    );
    let json = r#"{"lr": 0.01, "max_preconditioner_dim": 8, "precondition_frequency": 2, "start_preconditioning_step": 10,
        "grafting": {"type": "adam", "beta2": 0.99, "epsilon": 1e-8}}"#;
    let a = run(CpuBackend::new(1).unwrap(), json).unwrap();
    assert!(a.iter().all(|x| x.is_finite()));
    assert_eq!(a, run(CpuBackend::new(2).unwrap(), json).unwrap());
}

/// Parameters downloaded to the host.
type Params = Vec<Vec<f64>>;

const SHAPES: [&[usize]; 3] = [&[12, 9], &[5], &[3, 4, 6]];

/// Steps `from..to` of a run (gradients depend on the step only).
fn steps<B: Backend>(
    opt: &mut Shampoo<B>,
    params: &mut [B::Buffer],
    from: u64,
    to: u64,
) -> Res<()> {
    for step in from..to {
        let b = opt.backend();
        let grads: Vec<B::Buffer> = SHAPES
            .iter()
            .enumerate()
            .map(|(i, s)| up(b, &values(500 + 10 * step + i as u64, s.iter().product())))
            .collect::<Res<_>>()?;
        let gv: Vec<Option<B::View<'_>>> = grads.iter().map(|g| Some(b.view(g))).collect();
        let mut pv: Vec<B::ViewMut<'_>> = params.iter_mut().map(|p| b.view_mut(p)).collect();
        opt.step(&mut pv, &gv)?;
    }
    Ok(())
}

/// A run of 10 steps saved to `save`, then (optionally from the checkpoint
/// `load` and the parameters `start`) 3 more steps: the parameters after
/// step 10 and at the end.
fn resumed<B: Backend>(
    b: B,
    save: Option<&std::path::Path>,
    load: Option<(&std::path::Path, &[Vec<f64>])>,
) -> Res<(Params, Params)> {
    let json = r#"{"lr": 0.01, "max_preconditioner_dim": 8, "precondition_frequency": 2, "start_preconditioning_step": 10,
        "grafting": {"type": "adam", "beta2": 0.99, "epsilon": 1e-8},
        "momentum": {"momentum": 0.5, "dampening": 0.0, "nesterov": false}}"#;
    let shapes: Vec<Vec<usize>> = SHAPES.iter().map(|s| s.to_vec()).collect();
    let mut opt = Shampoo::new(ShampooConfig::from_json(json)?, &shapes, DType::F64, b)?;
    let mut params: Vec<B::Buffer> = match load {
        Some((_, start)) => start
            .iter()
            .map(|p| up(opt.backend(), p))
            .collect::<Res<_>>()?,
        None => SHAPES
            .iter()
            .enumerate()
            .map(|(i, s)| up(opt.backend(), &values(400 + i as u64, s.iter().product())))
            .collect::<Res<_>>()?,
    };
    match load {
        Some((path, _)) => opt.load(path)?,
        None => steps(&mut opt, &mut params, 0, 10)?,
    }
    let at4: Vec<Vec<f64>> = params
        .iter()
        .map(|p| down(opt.backend(), p))
        .collect::<Res<_>>()?;
    if let Some(path) = save {
        opt.save(path)?;
    }
    steps(&mut opt, &mut params, 10, 13)?;
    let end = params
        .iter()
        .map(|p| down(opt.backend(), p))
        .collect::<Res<_>>()?;
    Ok((at4, end))
}

#[test]
fn checkpoints_move_between_the_cuda_and_cpu_backends() {
    let Some(_) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (from_gpu, from_cpu) = (
        dir.path().join("gpu.safetensors"),
        dir.path().join("cpu.safetensors"),
    );
    let cpu = || CpuBackend::new(1).unwrap();
    let gpu = || CudaBackend::new(0).unwrap();
    let (cpu10, cpu_end) = resumed(cpu(), Some(&from_cpu), None).unwrap();
    let (gpu10, _) = resumed(gpu(), Some(&from_gpu), None).unwrap();
    // Saved on the GPU, resumed on the CPU, and the reverse.
    let (_, g2c) = resumed(cpu(), None, Some((&from_gpu, &gpu10))).unwrap();
    let (_, c2g) = resumed(gpu(), None, Some((&from_cpu, &cpu10))).unwrap();
    for (name, end) in [("gpu -> cpu", &g2c), ("cpu -> gpu", &c2g)] {
        let flat = |v: &Vec<Vec<f64>>| v.concat();
        let e = max_rel(&flat(&cpu_end), &flat(end));
        assert!(e < 1e-9, "{name}: relative difference {e:e}");
    }
}

#[test]
fn checkpoint_resume_case_runs_on_the_cpu_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cpu.safetensors");
    let (at10, end) = resumed(CpuBackend::new(1).unwrap(), Some(&path), None).unwrap();
    let (_, again) = resumed(CpuBackend::new(2).unwrap(), None, Some((&path, &at10))).unwrap();
    assert_eq!(end, again);
}
