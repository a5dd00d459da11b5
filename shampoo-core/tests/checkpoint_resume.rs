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
