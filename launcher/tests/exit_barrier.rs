//! A rank still running long after the others exited successfully is
//! stopped after --exit-barrier-timeout, and named as the root cause.

mod common;

use std::time::Duration;

use common::{assert_all_dead, launcher, pid_files, run, wait_for_pids};

#[test]
fn a_rank_still_running_after_the_others_finished_is_stopped_and_named() {
    let dir = tempfile::tempdir().unwrap();
    // Rank 1 hangs (sleeps); ranks 0 and 2 finish at once.
    let script = r#"
echo $$ > "$DIR/pid.$RANK"
if [ "$RANK" = 1 ]; then exec sleep 60; fi
"#;
    let mut cmd = launcher([
        "--nproc-per-node",
        "3",
        "--exit-barrier-timeout",
        "1",
        "sh",
        "-c",
        script,
    ]);
    cmd.env("DIR", dir.path());
    let out = run(cmd);
    assert_eq!(out.code(), 124, "{out:#?}");
    assert!(
        out.elapsed >= Duration::from_secs(1) && out.elapsed < Duration::from_secs(6),
        "took {:?}",
        out.elapsed
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let pids = wait_for_pids(&pid_files(dir.path(), 3));
    let root = out
        .stderr
        .lines()
        .find(|l| l.starts_with("shampoo-run: error: "))
        .unwrap_or_else(|| panic!("no root-cause line in {}", out.stderr));
    assert_eq!(
        root,
        format!(
            "shampoo-run: error: rank 1 (host {host}, pid {}) was still running 1s after the other ranks exited successfully (--exit-barrier-timeout 1); it was stopped",
            pids[1]
        )
    );
    assert_all_dead(&pids, Duration::from_secs(2));
}

#[test]
fn ranks_that_finish_within_the_timeout_succeed() {
    let out = run(launcher([
        "--nproc-per-node",
        "2",
        "--exit-barrier-timeout",
        "5",
        "sh",
        "-c",
        r#"if [ "$RANK" = 1 ]; then sleep 0.5; fi"#,
    ]));
    assert_eq!(out.code(), 0, "{out:#?}");
}
