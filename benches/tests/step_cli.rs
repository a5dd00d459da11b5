//! `shampoo-bench step`: a configuration whose state cannot fit is refused
//! before anything is allocated, and the report carries the root-inverse
//! telemetry.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shampoo-bench"))
}

#[test]
fn a_state_larger_than_memory_is_refused_with_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("huge.json");
    std::fs::write(
        &conf,
        r#"{"lr": 0.01, "max_preconditioner_dim": 1000000000000}"#,
    )
    .unwrap();
    let out = bench()
        .args(["step", "--shapes", "cpu_small", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("shampoo-bench: error: the Shampoo optimizer needs ")
            && err.contains(" of memory, more than this machine's memory (")
            && err.ends_with("its widest factor is 262144 x 262144 (tensor p4 of shape [1024, 256], merged and blocked with max_preconditioner_dim 1000000000000); lower max_preconditioner_dim\n"),
        "{err}"
    );
}

#[test]
fn the_report_counts_root_inverse_outcomes() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/cpu_small.json");
    let out = bench()
        .args([
            "step",
            "--shapes",
            "cpu_small",
            "--steps",
            "1",
            "--warmup",
            "1",
        ])
        .args(["--threads", "1", "--json", "--config", conf])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["root_inverse"],
        serde_json::json!({"failures": 0, "f64_retries": 0, "kept_previous": 0})
    );
    assert_eq!(report["root_inverse_blocks"], serde_json::json!([]));
}
