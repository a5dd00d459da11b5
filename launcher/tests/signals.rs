//! Signals sent to the launcher reach every rank, and escalate to SIGKILL.

mod common;

use std::time::Duration;

use common::{assert_all_dead, launcher, pid_files, start, wait_for_pids};

/// Each rank records the pid of the process the signal must reach, then
/// sleeps; `$TRAP` is run first (e.g. to ignore SIGTERM).
const SLEEPER: &str = r#"eval "$TRAP"; echo $$ > "$DIR/pid.$RANK"; exec sleep 60"#;

fn interrupted(signal: i32, expect_code: i32) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = launcher(["--nproc-per-node", "3", "sh", "-c", SLEEPER]);
    cmd.env("DIR", dir.path()).env("TRAP", "");
    let running = start(cmd);
    let pids = wait_for_pids(&pid_files(dir.path(), 3));
    running.signal(signal);
    let out = running.finish();
    assert_eq!(out.code(), expect_code, "{out:#?}");
    assert!(
        out.stderr.contains("shampoo-run: interrupted by SIG"),
        "{}",
        out.stderr
    );
    assert!(
        out.elapsed < Duration::from_secs(3),
        "took {:?}; the signal should have stopped the ranks at once",
        out.elapsed
    );
    assert_all_dead(&pids, Duration::from_millis(500));
}

#[test]
fn sigint_is_forwarded_and_exits_130() {
    interrupted(libc::SIGINT, 130);
}

#[test]
fn sigterm_is_forwarded_and_exits_143() {
    interrupted(libc::SIGTERM, 143);
}

#[test]
fn rank_ignoring_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = launcher([
        "--nproc-per-node",
        "2",
        "--grace-period",
        "1",
        "sh",
        "-c",
        SLEEPER,
    ]);
    // `trap "" TERM` makes SIGTERM ignored, and exec keeps it ignored.
    cmd.env("DIR", dir.path()).env("TRAP", r#"trap "" TERM"#);
    let running = start(cmd);
    let pids = wait_for_pids(&pid_files(dir.path(), 2));
    running.signal(libc::SIGTERM);
    let out = running.finish();
    assert_eq!(out.code(), 143, "{out:#?}");
    assert!(
        out.elapsed >= Duration::from_secs(1),
        "SIGKILL came before the grace period: {:?}",
        out.elapsed
    );
    assert!(out.elapsed < Duration::from_secs(4), "{:?}", out.elapsed);
    assert!(out.stderr.contains("sending SIGKILL"), "{}", out.stderr);
    assert_all_dead(&pids, Duration::from_millis(500));
}

#[test]
fn second_sigint_kills_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = launcher(["--grace-period", "30", "sh", "-c", SLEEPER]);
    cmd.env("DIR", dir.path()).env("TRAP", r#"trap "" INT"#);
    let running = start(cmd);
    let pids = wait_for_pids(&pid_files(dir.path(), 1));
    running.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    running.signal(libc::SIGINT);
    let out = running.finish();
    assert_eq!(out.code(), 130, "{out:#?}");
    assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
    assert_all_dead(&pids, Duration::from_millis(500));
}
