//! Plain mistakes get one clear line before any work starts (never a
//! panic or an abort), and a resume that would silently change the data
//! order is refused.

use crate::common::{bin, run, run_ok, train_cmd};

/// Runs `shampoo-train ARGS`; asserts exit code 1 with exactly `message`
/// as the only line of stderr.
fn refused(args: &[&str], message: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(bin().args(args).arg("--out").arg(dir.path().join("run")));
    assert_eq!(code, Some(1), "{args:?}: {err}");
    assert_eq!(
        err,
        format!("shampoo-train: error: {message}\n"),
        "{args:?}"
    );
}

#[test]
fn impossible_model_and_resource_options_are_refused_up_front() {
    refused(
        &["train", "--model", "resnet18"],
        "invalid option: --model resnet18 expects 3-channel (RGB) images, but fashion-mnist images have 1 channel; use --model cnn",
    );
    refused(
        &["train", "--threads", "0"],
        "invalid option: --threads must be at least 1",
    );
    refused(
        &[
            "train",
            "--dataset",
            "imagenet",
            "--data",
            "/nonexistent",
            "--resolution",
            "0",
        ],
        "invalid option: --resolution must be at least 1 pixel, got 0",
    );
}

#[test]
fn a_shampoo_state_larger_than_memory_is_refused_with_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("huge.json");
    std::fs::write(
        &conf,
        r#"{"lr": 0.001, "max_preconditioner_dim": 1000000000000}"#,
    )
    .unwrap();
    let (code, err) = run(train_cmd("shampoo", &dir.path().join("run"))
        .arg("--shampoo-config")
        .arg(&conf));
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with(&format!(
            "shampoo-train: error: invalid option: --shampoo-config {}: the Shampoo optimizer needs ",
            conf.display()
        )) && last.contains(" of memory, more than this machine's memory (")
            && last.ends_with("its widest factor is 401408 x 401408 (variable fc1.weight of shape [128, 3136], merged and blocked with max_preconditioner_dim 1000000000000); lower max_preconditioner_dim"),
        "{err}"
    );
}

#[test]
fn out_of_range_hyperparameters_are_refused() {
    for (args, message) in [
        (
            &["--optimizer", "adamw", "--beta1", "1.5"][..],
            "--beta1 must be in [0, 1), got 1.5",
        ),
        (
            &["--optimizer", "adamw", "--weight-decay", "nan"],
            "--weight-decay must be finite and >= 0, got NaN",
        ),
        (
            &["--optimizer", "sgd", "--weight-decay", "nan"],
            "--weight-decay must be finite and >= 0, got NaN",
        ),
        (
            &["--schedule", "step", "--decay-gamma", "nan"],
            "--decay-gamma must be in (0, 1], got NaN",
        ),
        (
            &["--optimizer", "sgd", "--momentum", "2"],
            "--momentum must be in [0, 1), got 2",
        ),
        (&["--lr", "-1"], "--lr must be finite and >= 0, got -1"),
    ] {
        let mut all = vec!["train"];
        all.extend_from_slice(args);
        refused(&all, &format!("invalid option: {message}"));
    }
}

#[test]
fn resuming_with_another_training_set_is_refused_and_another_schedule_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run_ok(train_cmd("adamw", &out).args(["--max-steps", "3", "--checkpoint-every", "3"]));
    let (code, err) = run(bin()
        .args(["train", "--optimizer", "adamw", "--limit-train", "1024"])
        .args([
            "--limit-test",
            "256",
            "--batch-size",
            "64",
            "--warmup-steps",
            "4",
        ])
        .args(["--threads", "1", "--resume", "--max-steps", "4", "--out"])
        .arg(&out));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err.lines().last().unwrap(),
        format!(
            "shampoo-train: error: checkpoint {}: it was written with 512 training images, this run has 1024 (--limit-train or --data changed): the order of the data, and so where the run stands in it, would change; resume with the same training set",
            out.join("checkpoint").display()
        )
    );
    // More epochs: the schedule stretches, and the run says so.
    let (code, err) =
        run(train_cmd("adamw", &out).args(["--resume", "--epochs", "3", "--max-steps", "4"]));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("resuming with another learning-rate schedule than the checkpoint's run: --epochs 2 -> 3, the number of steps 16 -> 24"),
        "{err}"
    );
}

#[test]
fn the_peer_timeout_variable_is_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) =
        run(train_cmd("adamw", &dir.path().join("run")).env("SHAMPOO_COMM_TIMEOUT", "soon"));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err,
        "shampoo-train: error: connecting the ranks: environment: SHAMPOO_COMM_TIMEOUT=\"soon\" is not a number of seconds\n"
    );
}
