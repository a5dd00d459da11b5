//! Two CPU ranks through `shampoo-run`: both ranks end with bitwise the same
//! weights.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// `shampoo-run` next to this test's binaries, built on demand.
fn launcher() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("shampoo-run");
    if !bin.exists() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "shampoo-launcher", "--manifest-path"])
            .arg(manifest)
            .status()
            .unwrap();
        assert!(status.success(), "building shampoo-run failed");
    }
    assert!(bin.exists(), "{} not found", bin.display());
    bin
}

/// Runs `shampoo-train ARGS` on 2 ranks through the launcher; panics with the
/// output on failure.
fn launch(args: &[&str], out: &Path) {
    let o = Command::new(launcher())
        .args(["--nproc-per-node", "2", "--"])
        .arg(env!("CARGO_BIN_EXE_shampoo-train"))
        .args(args)
        .arg("--out")
        .arg(out)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A Shampoo config with root inverses every 2 steps from step 2 and blocks
/// of at most 128, written into `dir`.
fn fast_shampoo_config(dir: &Path) -> String {
    let conf = dir.join("shampoo.json");
    let text = shampoo_train::train::PROTOCOL_SHAMPOO
        .replace(
            "\"precondition_frequency\": 20",
            "\"precondition_frequency\": 2",
        )
        .replace(
            "\"start_preconditioning_step\": 20",
            "\"start_preconditioning_step\": 2",
        )
        .replace(
            "\"max_preconditioner_dim\": 1024",
            "\"max_preconditioner_dim\": 128",
        );
    std::fs::write(&conf, text).unwrap();
    conf.to_str().unwrap().to_string()
}

#[test]
fn two_rank_shampoo_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let conf = fast_shampoo_config(dir.path());
    let args = [
        "train",
        "--optimizer",
        "shampoo",
        "--shampoo-config",
        &conf,
        "--limit-train",
        "512",
        "--limit-test",
        "256",
        "--batch-size",
        "64",
        "--epochs",
        "2",
        "--warmup-steps",
        "2",
        "--write-rank-weights",
    ];
    let (full, split) = (dir.path().join("full"), dir.path().join("split"));
    launch(&args, &full);
    let mut first = args.to_vec();
    first.extend(["--max-steps", "5", "--checkpoint-every", "5"]);
    launch(&first, &split);
    let mut rest = args.to_vec();
    rest.push("--resume");
    launch(&rest, &split);
    let (a, b) = (
        shampoo_train::train::read_summary(&full).unwrap(),
        shampoo_train::train::read_summary(&split).unwrap(),
    );
    assert_eq!(
        (a.steps, a.test_loss, a.test_acc),
        (b.steps, b.test_loss, b.test_acc)
    );
    for r in 0..2 {
        let w = format!("weights.rank{r}.ot");
        common::assert_same_weights(&full.join(&w), &split.join(&w));
    }
}

fn two_ranks_agree(optimizer: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(launcher())
        .args(["--nproc-per-node", "2", "--"])
        .arg(env!("CARGO_BIN_EXE_shampoo-train"))
        .args([
            "train",
            "--optimizer",
            optimizer,
            "--limit-train",
            "512",
            "--limit-test",
            "256",
        ])
        .args([
            "--batch-size",
            "64",
            "--epochs",
            "1",
            "--warmup-steps",
            "2",
            "--write-rank-weights",
        ])
        .args(extra)
        .arg("--out")
        .arg(dir.path())
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = shampoo_train::train::read_summary(dir.path()).unwrap();
    assert_eq!(summary.world_size, 2);
    assert_eq!(summary.steps, 8);
    assert!(summary.test_acc > 0.3, "{summary:?}");
    common::assert_same_weights(
        &dir.path().join("weights.rank0.ot"),
        &dir.path().join("weights.rank1.ot"),
    );
    // Every step's metrics carry each rank's optimizer time and the bytes
    // all-gathered (Shampoo shards; the baselines gather nothing).
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .collect();
    assert_eq!(steps.len(), 8);
    for v in &steps {
        assert_eq!(v["optimizer_per_rank"].as_array().unwrap().len(), 2, "{v}");
        let gathered = v["gathered_bytes"].as_u64().unwrap();
        let sharded = optimizer == "shampoo" && !extra.contains(&"--replicated");
        assert_eq!(gathered > 0, sharded, "{v}");
    }
}

#[test]
fn two_ranks_through_the_launcher_end_with_identical_weights_adamw() {
    two_ranks_agree("adamw", &[]);
}

#[test]
fn two_ranks_through_the_launcher_end_with_identical_weights_shampoo() {
    // Root inverses every 2 steps, so the ranks share preconditioned directions.
    let dir = tempfile::tempdir().unwrap();
    let conf = fast_shampoo_config(dir.path());
    two_ranks_agree("shampoo", &["--shampoo-config", &conf]);
    // Replicated: every rank computes every block, nothing is all-gathered.
    two_ranks_agree("shampoo", &["--shampoo-config", &conf, "--replicated"]);
}
