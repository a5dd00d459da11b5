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

/// `shampoo-run --nproc-per-node 2 -- sh -c SCRIPT`, where SCRIPT runs
/// `shampoo-train train ARGS --out OUT` with `$RANK_ARGS_<rank>` added.
fn launch_per_rank(args: &[&str], out: &Path, rank1_extra: &str) -> std::process::Output {
    let script = format!(
        "if [ \"$RANK\" = 1 ]; then exec \"$BIN\" \"$@\" {rank1_extra}; else exec \"$BIN\" \"$@\"; fi"
    );
    Command::new(launcher())
        .args(["--nproc-per-node", "2", "--", "sh", "-c", &script, "sh"])
        .args(args)
        .arg("--out")
        .arg(out)
        .env("BIN", env!("CARGO_BIN_EXE_shampoo-train"))
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap()
}

#[test]
fn ranks_started_with_different_settings_stop_at_once_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "train",
        "--optimizer",
        "adamw",
        "--limit-train",
        "512",
        "--limit-test",
        "256",
        "--batch-size",
        "64",
    ];
    let o = launch_per_rank(&args, dir.path(), "--seed 3");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ranks disagree on the run configuration (start every rank with the same options): rank 1 differs from rank 0: seed (0 on rank 0, 3 on rank 1)"),
        "{err}"
    );
    assert!(!dir.path().join("metrics.jsonl").exists() || step_count(dir.path()) == 0);
}

fn step_count(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .matches("\"kind\":\"step\"")
        .count()
}

#[test]
fn initial_weights_are_broadcast_from_rank_0() {
    use shampoo_train::replicas::broadcast_variables;
    use tch::nn::VarStore;
    let comms = shampoo_dist::in_process(2, &shampoo_dist::CommOptions::default());
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    // Each rank starts from its own values, as ranks whose
                    // random generators drifted apart would.
                    let vs = VarStore::new(tch::Device::Cpu);
                    let value = c.rank() as f64 + 1.0;
                    let root = vs.root();
                    let w = root.var("w", &[3, 2], tch::nn::Init::Const(value));
                    let _b = root.zeros_no_train("stat", &[4]);
                    broadcast_variables(&vs, &*c).unwrap();
                    let all = tch::Tensor::cat(
                        &[w.flatten(0, -1), vs.variables()["stat"].shallow_clone()],
                        0,
                    );
                    Vec::<f32>::try_from(all).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0][..6], [1.0; 6]);
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let conf = fast_shampoo_config(dir.path());
    let out = dir.path().join("run");
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
        "1",
        "--warmup-steps",
        "2",
    ];
    let mut first = args.to_vec();
    first.extend(["--max-steps", "5", "--checkpoint-every", "5"]);
    launch(&first, &out);
    let o = Command::new(env!("CARGO_BIN_EXE_shampoo-train"))
        .args(args)
        .args(["--resume", "--threads", "1", "--no-progress", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = shampoo_train::train::read_summary(&out).unwrap();
    assert_eq!((s.steps, s.world_size), (8, 1));
    assert!(s.test_acc > 0.3, "{s:?}");
    // Shampoo runs report their root-inverse telemetry (none failed here).
    assert_eq!(s.root_inverse, Default::default());
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last_step = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|v| v["kind"] == "step")
        .unwrap();
    assert_eq!(
        last_step["root_inverse"],
        serde_json::json!({"failures": 0, "f64_retries": 0, "kept_previous": 0})
    );
}

#[test]
fn sigint_to_the_launcher_stops_every_rank_after_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = Command::new(launcher())
        .args(["--nproc-per-node", "2", "--grace-period", "60", "--"])
        .arg(env!("CARGO_BIN_EXE_shampoo-train"))
        .args(["train", "--optimizer", "adamw", "--limit-train", "512"])
        .args([
            "--limit-test",
            "256",
            "--batch-size",
            "64",
            "--epochs",
            "40",
        ])
        .args(["--checkpoint-every", "1000", "--out"])
        .arg(&out)
        .env("OMP_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for_steps(&out, 3, &mut child);
    common::kill(&child, "INT");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    let step = common::checkpoint_step(&out);
    for r in 0..2 {
        assert!(
            err.contains(&format!(
                "[rank{r}]: shampoo-train: error: interrupted by SIGINT after step {step}; checkpoint written to"
            )),
            "rank {r}: {err}"
        );
    }
    assert_eq!(common::step_lines(&out), (1..=step).collect::<Vec<_>>());
}
