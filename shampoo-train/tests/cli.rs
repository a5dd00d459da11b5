//! The binary's handling of bad input: messages and exit codes.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shampoo-train"))
}

#[test]
fn unknown_option_is_rejected_with_exit_code_2() {
    let out = bin().args(["train", "--frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: unexpected argument '--frobnicate' found"),
        "{err}"
    );
}

#[test]
fn missing_dataset_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["train", "--optimizer", "adamw", "--data"])
        .arg(dir.path().join("nowhere"))
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "shampoo-train: error: Fashion-MNIST not found: {} does not exist; install it with `sudo apt-get install dataset-fashion-mnist` (or run scripts/setup.sh), or point --data at a folder holding the four *-ubyte.gz files\n",
        dir.path()
            .join("nowhere/train-images-idx3-ubyte.gz")
            .display()
    );
    assert!(err.ends_with(&expected), "{err}");
}

#[test]
fn resume_without_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "train",
            "--optimizer",
            "adamw",
            "--limit-train",
            "256",
            "--limit-test",
            "64",
            "--resume",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "shampoo-train: error: checkpoint {}: no checkpoint to resume from (run without --resume first, with --checkpoint-every N)\n",
        dir.path().join("checkpoint").display()
    );
    assert!(err.ends_with(&expected), "{err}");
}

#[test]
fn bf16_on_cpu_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["train", "--optimizer", "adamw", "--bf16", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.ends_with("shampoo-train: error: invalid option: --bf16 needs --device cuda (autocast runs on GPUs here)\n"),
        "{err}"
    );
}

#[test]
fn cuda_without_a_gpu_is_refused() {
    if tch::Cuda::is_available() {
        return; // nothing to refuse on a GPU machine
    }
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["train", "--optimizer", "adamw", "--device", "cuda", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.ends_with("shampoo-train: error: --device cuda: no CUDA device is visible to libtorch (tch::Cuda::is_available() is false); run on a machine with an NVIDIA GPU and the CUDA build of PyTorch, or use --device cpu\n"),
        "{err}"
    );
}
