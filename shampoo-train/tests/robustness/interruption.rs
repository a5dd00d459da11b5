//! Interrupted runs resume: SIGINT and SIGTERM finish the step, write a
//! checkpoint and exit with 128 + signal; after kill -9 the metrics reach
//! the checkpoint's step and a torn last line is dropped on resume.

use crate::common::{checkpoint_step, kill, run, run_ok, step_lines, train_cmd, wait_for_steps};
use std::process::Stdio;

/// A run long enough to be interrupted (40 epochs of 8 steps).
fn long_run(out: &std::path::Path, extra: &[&str]) -> std::process::Child {
    train_cmd("adamw", out)
        .args(["--epochs", "40"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stderr_of(child: std::process::Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sigint_finishes_the_step_checkpoints_exits_130_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = long_run(&out, &["--checkpoint-every", "1000"]);
    wait_for_steps(&out, 3, &mut child);
    kill(&child, "INT");
    let (code, err) = stderr_of(child);
    assert_eq!(code, Some(130), "{err}");
    let step = checkpoint_step(&out);
    let last = err.lines().last().unwrap();
    assert_eq!(
        last,
        format!(
            "shampoo-train: error: interrupted by SIGINT after step {step}; checkpoint written to {} (continue with --resume)",
            out.join("checkpoint").display()
        )
    );
    // The metrics end with the interrupted step, each step once.
    assert_eq!(step_lines(&out), (1..=step).collect::<Vec<_>>());
    run_ok(
        train_cmd("adamw", &out)
            .args(["--epochs", "40", "--resume"])
            .args(["--max-steps", &(step + 2).to_string()]),
    );
    assert_eq!(step_lines(&out), (1..=step + 2).collect::<Vec<_>>());
}

#[test]
fn sigterm_without_checkpointing_exits_143_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = long_run(&out, &[]);
    wait_for_steps(&out, 2, &mut child);
    kill(&child, "TERM");
    let (code, err) = stderr_of(child);
    assert_eq!(code, Some(143), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("shampoo-train: error: interrupted by SIGTERM after step ")
            && last.ends_with(
                "; no checkpoint written (checkpointing is off; add --checkpoint-every N to keep one)"
            ),
        "{last}"
    );
    assert!(!out.join("checkpoint").exists());
}

#[test]
fn after_kill_9_the_metrics_reach_the_checkpoint_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = long_run(&out, &["--checkpoint-every", "1"]);
    // Kill as soon as a checkpoint of step 5 or later is on disk: between
    // evaluations (the first is at step 8).
    let start = std::time::Instant::now();
    while std::fs::read_to_string(out.join("checkpoint/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["step"].as_u64())
        .is_none_or(|s| s < 5)
    {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(start.elapsed() < std::time::Duration::from_secs(120));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    kill(&child, "KILL");
    let (code, _) = stderr_of(child);
    assert_eq!(code, None, "killed by a signal");
    let step = checkpoint_step(&out);
    assert!(step >= 5, "checkpoint at step {step}");
    // Every step up to the checkpoint's is in the metrics (later ones may be).
    let steps = step_lines(&out);
    let want: Vec<u64> = (1..=step).collect();
    assert_eq!(
        steps.get(..step as usize),
        Some(&want[..]),
        "the metrics lost steps up to the checkpoint's ({step}): {steps:?}"
    );
    run_ok(
        train_cmd("adamw", &out)
            .args(["--epochs", "40", "--checkpoint-every", "1", "--resume"])
            .args(["--max-steps", &(step + 2).to_string()]),
    );
    assert_eq!(step_lines(&out), (1..=step + 2).collect::<Vec<_>>());
}

#[test]
fn a_torn_last_metrics_line_is_dropped_on_resume_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run_ok(train_cmd("adamw", &out).args(["--max-steps", "3", "--checkpoint-every", "3"]));
    let metrics = out.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    let lines = text.lines().count();
    text.push_str(r#"{"acc":0.1,"all_gather":0.0,"all_re"#);
    std::fs::write(&metrics, text).unwrap();
    let (code, err) = run(train_cmd("adamw", &out).args(["--max-steps", "5", "--resume"]));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "{} line {}: dropped a torn last line (35 bytes without a newline; the writing process was killed)",
            metrics.display(),
            lines + 1
        )),
        "{err}"
    );
    assert_eq!(step_lines(&out), (1..=5).collect::<Vec<_>>());
}
