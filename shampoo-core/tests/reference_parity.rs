//! Float64 replay of the published implementation's trajectories.

use std::path::PathBuf;

use shampoo_core::CpuBackend;
use shampoo_core::reference::ReferenceCase;

fn cases() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/reference");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata/reference exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    assert!(v.len() >= 28, "expected the 28 reference cases in {dir:?}");
    v
}

#[test]
fn every_reference_case_matches_to_float64_rounding() {
    let mut worst = Vec::new();
    for path in cases() {
        let case = ReferenceCase::load(&path).unwrap();
        let errors = case.replay(CpuBackend::new(2).unwrap()).unwrap();
        let max = errors.iter().flatten().fold(0.0f64, |m, &e| m.max(e));
        eprintln!(
            "{:<28} {:>10.3e}  per step: {:?}",
            case.name,
            max,
            errors
                .iter()
                .map(|s| s.iter().fold(0.0f64, |m, &e| m.max(e)))
                .map(|e| format!("{e:.1e}"))
                .collect::<Vec<_>>()
        );
        worst.push((case.name.clone(), max));
    }
    for (name, max) in &worst {
        assert!(*max < 1e-10, "{name}: error {max:e}");
    }
}
