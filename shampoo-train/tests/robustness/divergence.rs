//! Diverging runs stop at the step that diverged, never checkpoint
//! non-finite weights, may skip a budget of such steps, and `plot` still
//! reads them.

use crate::common::{bin, checkpoint_step, load_vars, run, step_lines, train_cmd};
use std::path::Path;

/// Every tensor of a saved `VarStore` is finite.
fn all_finite(path: &Path) -> bool {
    load_vars(path)
        .iter()
        .all(|(_, t)| t.isfinite().all().int64_value(&[]) == 1)
}

/// The reproduction: lr 1e6 without warmup, 20 steps of 128
/// images; the loss is NaN from step 3.
fn diverging(optimizer: &str, out: &Path) -> std::process::Command {
    let mut c = bin();
    c.args(["train", "--optimizer", optimizer])
        .args([
            "--limit-train",
            "2560",
            "--limit-test",
            "500",
            "--epochs",
            "1",
        ])
        .args(["--warmup-steps", "0", "--lr", "1e6"])
        .args(["--threads", "1", "--no-progress", "--out"])
        .arg(out);
    c
}

#[test]
fn shampoo_stops_at_the_first_nan_loss_and_keeps_the_last_finite_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (code, err) = run(diverging("shampoo", &out).args(["--checkpoint-every", "1"]));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err.lines().last().unwrap(),
        "shampoo-train: error: training diverged at step 3: the loss is NaN; the weights were not updated and the last checkpoint (step 2) is kept; lower --lr or add warmup steps (or skip such steps with --skip-nonfinite N)"
    );
    assert_eq!(checkpoint_step(&out), 2);
    assert!(all_finite(&out.join("checkpoint/model.ot")));
    assert!(!out.join("summary.json").exists());
}

#[test]
fn adamw_never_checkpoints_non_finite_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (code, err) = run(diverging("adamw", &out).args(["--checkpoint-every", "1"]));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err.lines().last().unwrap(),
        "shampoo-train: error: training diverged at step 2: the weights or the optimizer state hold NaN or Inf; no checkpoint was written from them and the last checkpoint (step 1) is kept; lower --lr"
    );
    assert_eq!(checkpoint_step(&out), 1);
    assert!(all_finite(&out.join("checkpoint/model.ot")));
    // Without checkpoints in between, the NaN loss of step 3 stops it.
    let out = dir.path().join("run2");
    let (code, err) = run(&mut diverging("adamw", &out));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("training diverged at step 3: the loss is NaN; the weights were not updated and no checkpoint was written"),
        "{err}"
    );
}

#[test]
fn skip_nonfinite_skips_a_budget_of_steps_then_stops() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (code, err) = run(diverging("shampoo", &out).args(["--skip-nonfinite", "2"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("step 3: the loss is NaN; step skipped without an update (1 of the 2 --skip-nonfinite allows)"),
        "{err}"
    );
    assert!(
        err.lines().last().unwrap().ends_with(
            "training diverged at step 5: the loss is NaN; the weights were not updated and no checkpoint was written; lower --lr or add warmup steps (steps 3, 4 were skipped already, all that --skip-nonfinite 2 allows)"
        ),
        "{err}"
    );
    // The skipped steps are in the metrics, marked.
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let skipped: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["skipped"] == serde_json::json!(true))
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, vec![3, 4]);
    assert_eq!(step_lines(&out), vec![1, 2, 3, 4]);
}

#[test]
fn plot_reads_diverged_and_crashed_runs_and_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let diverged = dir.path().join("diverged");
    let (code, _) = run(&mut diverging("shampoo", &diverged));
    assert_eq!(code, Some(1));
    // A finished run whose summary has a null test loss (written by an
    // earlier build when the loss was NaN).
    let finished = dir.path().join("finished");
    let (code, err) = run(train_cmd("adamw", &finished).args(["--max-steps", "4"]));
    assert_eq!(code, Some(0), "{err}");
    let summary = finished.join("summary.json");
    let text = std::fs::read_to_string(&summary).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["test_loss"] = serde_json::Value::Null;
    std::fs::write(&summary, v.to_string()).unwrap();
    let png = dir.path().join("plot.png");
    let out = bin()
        .arg("plot")
        .args([&diverged, &finished])
        .arg("-o")
        .arg(&png)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "{}: no summary.json (the run did not finish): its curves end at step 2, the last step in metrics.jsonl",
            diverged.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{}: summary.json has no test loss (not finite when it was written)",
            finished.display()
        )),
        "{stdout}"
    );
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn plot_step_ticks_are_integers() {
    use shampoo_train::plot::step_tick;
    assert_eq!(step_tick(&100.0), "100");
    assert_eq!(step_tick(&2500.0), "2500");
    assert_eq!(step_tick(&0.0), "0");
}
