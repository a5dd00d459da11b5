//! Checkpoints carry checksums that a resume checks; libtorch's errors are
//! one line; a kill between the renames of a commit loses nothing; a stale
//! `checkpoint.tmp` is removed.

use crate::common::{checkpoint_step, run, run_ok, step_lines, train_cmd};
use std::path::Path;

/// A run folder with a checkpoint at step 3.
fn three_steps(out: &Path) {
    run_ok(train_cmd("adamw", out).args(["--max-steps", "3", "--checkpoint-every", "3"]));
}

fn resume(out: &Path, max_steps: u64) -> (Option<i32>, String) {
    run(train_cmd("adamw", out).args(["--resume", "--max-steps", &max_steps.to_string()]))
}

/// Flips 64 bytes in the middle of `path`.
fn flip_bytes(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn flipped_bytes_in_any_checkpoint_file_are_refused() {
    for file in ["model.ot", "optim/adamw.ot", "state.json"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        three_steps(&out);
        let path = out.join("checkpoint").join(file);
        if file == "state.json" {
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, text.replace("\"seed\": 0", "\"seed\": 9")).unwrap();
        } else {
            flip_bytes(&path);
        }
        let (code, err) = resume(&out, 5);
        assert_eq!(code, Some(1), "{file}: {err}");
        let last = err.lines().last().unwrap();
        let prefix = format!(
            "shampoo-train: error: checkpoint {}: {file} is corrupt: its CRC-32 is ",
            out.join("checkpoint").display()
        );
        assert!(
            last.starts_with(&prefix) && last.ends_with("(flipped bits on disk or in a copy)"),
            "{file}: {last}"
        );
    }
}

#[test]
fn a_truncated_file_is_refused_and_libtorch_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    three_steps(&out);
    let model = out.join("checkpoint/model.ot");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 3]).unwrap();
    let (code, err) = resume(&out, 5);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err.lines().last().unwrap(),
        format!(
            "shampoo-train: error: checkpoint {}: model.ot is corrupt: {} bytes, the checkpoint recorded {} (a truncated or partial copy)",
            out.join("checkpoint").display(),
            bytes.len() / 3,
            bytes.len()
        )
    );
    // A checkpoint from before checksums (format 1) reaches libtorch, whose
    // error is one line, without its C++ stack.
    std::fs::remove_file(out.join("checkpoint/checksums.json")).unwrap();
    let state = out.join("checkpoint/state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, text.replace("\"format\": 2", "\"format\": 1")).unwrap();
    let (code, err) = resume(&out, 5);
    assert_eq!(code, Some(1), "{err}");
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("WARN") && !l.contains("INFO"))
        .collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].starts_with(&format!(
            "shampoo-train: error: checkpoint {}: model.ot: ",
            out.join("checkpoint").display()
        )),
        "{err}"
    );
    assert!(!err.contains("frame #"), "{err}");
}

#[test]
fn a_kill_between_the_renames_of_a_commit_recovers_the_newest_complete_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    three_steps(&out);
    let older = dir.path().join("step3");
    std::fs::rename(out.join("checkpoint"), &older).unwrap();
    std::fs::create_dir(out.join("checkpoint")).unwrap();
    copy_dir(&older, &out.join("checkpoint"));
    run_ok(train_cmd("adamw", &out).args([
        "--resume",
        "--max-steps",
        "5",
        "--checkpoint-every",
        "5",
    ]));
    assert_eq!(checkpoint_step(&out), 5);
    // Killed after `checkpoint` became `checkpoint.old` and before
    // `checkpoint.tmp` (complete: sealed) became `checkpoint`.
    std::fs::rename(out.join("checkpoint"), out.join("checkpoint.tmp")).unwrap();
    std::fs::rename(&older, out.join("checkpoint.old")).unwrap();
    let (code, err) = resume(&out, 7);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "recovered the checkpoint of step 5 from {} (a checkpoint commit was interrupted)",
            out.join("checkpoint.tmp").display()
        )),
        "{err}"
    );
    assert!(!out.join("checkpoint.tmp").exists() && !out.join("checkpoint.old").exists());
    assert_eq!(step_lines(&out), (1..=7).collect::<Vec<_>>());

    // An unsealed (incomplete) checkpoint.tmp loses to a complete .old.
    std::fs::rename(out.join("checkpoint"), out.join("checkpoint.old")).unwrap();
    std::fs::create_dir_all(out.join("checkpoint.tmp/optim")).unwrap();
    std::fs::write(out.join("checkpoint.tmp/model.ot"), b"partial").unwrap();
    let (code, err) = resume(&out, 8);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("recovered the checkpoint of step 7 from"),
        "{err}"
    );
    assert_eq!(checkpoint_step(&out), 8);
}

#[test]
fn a_stale_checkpoint_tmp_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    three_steps(&out);
    let tmp = out.join("checkpoint.tmp");
    std::fs::create_dir_all(tmp.join("optim")).unwrap();
    std::fs::write(tmp.join("model.ot"), b"half a checkpoint").unwrap();
    // Nothing left to train: the run only tidies up and reports.
    let (code, err) = resume(&out, 3);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "removed {} (an unfinished checkpoint, left by an interrupted run)",
            tmp.display()
        )),
        "{err}"
    );
    assert!(!tmp.exists());
    assert_eq!(checkpoint_step(&out), 3);
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
