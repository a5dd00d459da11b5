//! A run folder holds one run: a fresh run into it is refused (naming
//! --resume and --overwrite), --overwrite replaces it, and a lock keeps a
//! second process out while a run is going on.

use crate::common::{kill, run, run_ok, step_lines, train_cmd, wait_for_steps};
use std::process::Stdio;

#[test]
fn a_fresh_run_into_a_folder_holding_a_run_is_refused_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run_ok(train_cmd("adamw", &out).args(["--max-steps", "4"]));
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let model = std::fs::read(out.join("checkpoint/model.ot")).unwrap();

    let (code, err) = run(train_cmd("adamw", &out).args(["--max-steps", "2"]));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err.lines().last().unwrap(),
        format!(
            "shampoo-train: error: run folder {} already holds a run (metrics.jsonl, run.json, summary.json, checkpoint/); continue it with --resume, or replace it with --overwrite",
            out.display()
        )
    );
    // Nothing of the previous run changed.
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
    assert_eq!(
        std::fs::read(out.join("checkpoint/model.ot")).unwrap(),
        model
    );

    // --overwrite replaces it; a file of the user's own stays.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    run_ok(train_cmd("adamw", &out).args(["--max-steps", "2", "--overwrite"]));
    assert_eq!(step_lines(&out), vec![1, 2]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );

    let (code, err) = run(train_cmd("adamw", &out).args(["--resume", "--overwrite"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn a_second_process_cannot_write_into_a_run_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut first = train_cmd("adamw", &out)
        .args(["--epochs", "40", "--checkpoint-every", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_steps(&out, 3, &mut first);
    for extra in [&["--resume"][..], &["--overwrite"]] {
        let (code, err) = run(train_cmd("adamw", &out)
            .args(["--epochs", "40"])
            .args(extra));
        assert_eq!(code, Some(1), "{extra:?}: {err}");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(
            err.lines().last().unwrap(),
            format!(
                "shampoo-train: error: run folder {} is in use by shampoo-train pid {} on host {} (it holds {}/.lock); wait for that run to end, or choose another --out",
                out.display(),
                first.id(),
                host.trim(),
                out.display()
            ),
            "{extra:?}"
        );
    }
    // However the holder ends, the lock goes with it.
    kill(&first, "KILL");
    first.wait().unwrap();
    run_ok(
        train_cmd("adamw", &out)
            .args(["--epochs", "40", "--resume"])
            .args(["--max-steps", "12"]),
    );
}
