//! Helpers shared by the integration tests.
#![allow(dead_code)]

use shampoo_train::optim::OptimizerKind;
use shampoo_train::train::TrainConfig;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// libtorch's random generator and thread count are process-global: tests
/// that initialise models take this lock so that they do not interleave.
pub fn torch_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A few-second Fashion-MNIST run: 512 training images, 256 test images,
/// global batch 64 (8 steps an epoch), 2 epochs, 4 warmup steps.
pub fn tiny(optimizer: OptimizerKind, out: &Path) -> TrainConfig {
    let mut cfg = TrainConfig::protocol(optimizer, out.to_path_buf());
    cfg.limit_train = Some(512);
    cfg.limit_test = Some(256);
    cfg.batch_size = 64;
    cfg.warmup_steps = 4;
    cfg.progress = false;
    cfg.threads = Some(1);
    cfg
}

/// Every variable of a saved `VarStore`, by name.
pub fn load_vars(path: &Path) -> Vec<(String, tch::Tensor)> {
    let mut v = tch::Tensor::load_multi(path).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Asserts two saved models are bitwise equal.
pub fn assert_same_weights(a: &Path, b: &Path) {
    let (va, vb) = (load_vars(a), load_vars(b));
    assert_eq!(va.len(), vb.len());
    for ((na, ta), (nb, tb)) in va.iter().zip(&vb) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "variable {na} differs");
    }
}

/// The `shampoo-train` binary.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_shampoo-train"))
}

/// `train` with the few-second settings of [`tiny`] on the command line
/// (8 steps an epoch), into `out`.
pub fn train_cmd(optimizer: &str, out: &Path) -> std::process::Command {
    let mut c = bin();
    c.args(["train", "--optimizer", optimizer])
        .args(["--limit-train", "512", "--limit-test", "256"])
        .args(["--batch-size", "64", "--warmup-steps", "4"])
        .args(["--threads", "1", "--no-progress", "--out"])
        .arg(out);
    c
}

/// Runs `cmd`; returns (exit code, stderr).
pub fn run(cmd: &mut std::process::Command) -> (Option<i32>, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd`, which must succeed.
pub fn run_ok(cmd: &mut std::process::Command) {
    let (code, err) = run(cmd);
    assert_eq!(code, Some(0), "{err}");
}

/// The steps of the `step` lines of a run's metrics, in file order.
pub fn step_lines(run_dir: &Path) -> Vec<u64> {
    shampoo_train::metrics::read_records(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|r| r.kind == "step")
        .map(|r| r.step)
        .collect()
}

/// The step of the run's checkpoint.
pub fn checkpoint_step(run_dir: &Path) -> u64 {
    shampoo_train::checkpoint::read_state(&run_dir.join("checkpoint"))
        .unwrap()
        .step
}

/// Waits until the run's metrics hold at least `n` step lines.
pub fn wait_for_steps(run_dir: &Path, n: usize, child: &mut std::process::Child) {
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
        if text.matches("\"kind\":\"step\"").count() >= n {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before {n} steps");
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "no {n} steps after 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Sends `signal` (`INT`, `TERM`, `KILL`) to a process.
pub fn kill(child: &std::process::Child, signal: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} failed");
}
