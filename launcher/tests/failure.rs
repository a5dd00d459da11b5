//! A failing rank stops the whole job: exit code, root-cause report, and
//! nothing left running.

mod common;

use std::time::Duration;

use common::{assert_all_dead, launcher, pid_files, run, start, wait_for_pids};

/// Shell function: wait until every other rank has written `$DIR/pid.<rank>`.
const WAIT_FOR_OTHERS: &str = r#"
wait_for_others() {
    r=0
    while [ $r -lt "$WORLD_SIZE" ]; do
        if [ $r != "$RANK" ]; then
            while [ ! -s "$DIR/pid.$r" ]; do sleep 0.02; done
        fi
        r=$((r+1))
    done
}
"#;

/// Rank `$FAIL` prints a line and, once the others are up, runs `$ACTION`;
/// the others record their pid and sleep (exec, so the pid is the sleeper's).
const SCRIPT: &str = r#"
if [ "$RANK" = "$FAIL" ]; then
    echo "rank $RANK about to fail"
    echo "some detail on stderr" >&2
    wait_for_others
    eval "$ACTION"
fi
echo $$ > "$DIR/pid.$RANK"
exec sleep 60
"#;

fn failing_job(
    dir: &std::path::Path,
    nproc: u32,
    fail: u32,
    action: &str,
) -> std::process::Command {
    let script = format!("{WAIT_FOR_OTHERS}{SCRIPT}");
    let mut cmd = launcher(["--nproc-per-node", &nproc.to_string(), "sh", "-c", &script]);
    cmd.env("DIR", dir)
        .env("FAIL", fail.to_string())
        .env("ACTION", action);
    cmd
}

#[test]
fn rank_exiting_with_code_3_stops_the_job_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(failing_job(dir.path(), 3, 1, "exit 3"));
    assert_eq!(out.code(), 3, "{out:#?}");
    assert!(
        out.elapsed < Duration::from_secs(5),
        "took {:?}",
        out.elapsed
    );
    let root = out
        .stderr
        .lines()
        .find(|l| l.starts_with("shampoo-run: error: "))
        .unwrap_or_else(|| panic!("no root-cause line in {}", out.stderr));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    assert!(
        root.starts_with(&format!("shampoo-run: error: rank 1 (host {host}, pid ")),
        "{root}"
    );
    assert!(root.ends_with(") exited with code 3"), "{root}");
    // The tail of the failed rank follows, with both streams.
    let after: Vec<&str> = out.stderr.split(root).nth(1).unwrap().lines().collect();
    assert!(
        after.contains(&"[rank1]: rank 1 about to fail"),
        "{after:?}"
    );
    assert!(
        after.contains(&"[rank1]: some detail on stderr"),
        "{after:?}"
    );
    // The sleeping ranks are gone.
    let others = [dir.path().join("pid.0"), dir.path().join("pid.2")];
    assert_all_dead(&wait_for_pids(&others), Duration::from_millis(500));
}

#[test]
fn rank_killed_by_sigkill_gives_137() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(failing_job(dir.path(), 2, 0, "kill -9 $$"));
    assert_eq!(out.code(), 137, "{out:#?}");
    assert!(
        out.stderr
            .contains(") was killed by signal SIGKILL\nshampoo-run: last"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("shampoo-run: error: rank 0 (host "));
    assert_all_dead(
        &wait_for_pids(&[dir.path().join("pid.1")]),
        Duration::from_millis(500),
    );
}

#[test]
fn first_failure_is_the_root_cause_not_the_ranks_stopped_after_it() {
    // Rank 0 turns the SIGTERM it gets during shutdown into exit code 5; the
    // report must still blame rank 1, which failed first.
    let script = r#"
if [ "$RANK" = 1 ]; then sleep 0.3; exit 4; fi
trap 'exit 5' TERM
sleep 30 &
wait
"#;
    let out = run(launcher(["--nproc-per-node", "2", "sh", "-c", script]));
    assert_eq!(out.code(), 4, "{out:#?}");
    assert!(
        out.stderr.contains("error: rank 1 (host ") && out.stderr.contains("exited with code 4"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("error: rank 0"), "{}", out.stderr);
}

#[test]
fn processes_started_by_ranks_are_stopped_too() {
    // Each rank starts a background sleeper (same process group) and waits.
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "{WAIT_FOR_OTHERS}{}",
        r#"
sleep 60 &
echo $! > "$DIR/pid.$RANK"
if [ "$RANK" = 1 ]; then wait_for_others; exit 9; fi
wait
"#
    );
    let mut cmd = launcher(["--nproc-per-node", "2", "sh", "-c", &script]);
    cmd.env("DIR", dir.path());
    let out = run(cmd);
    assert_eq!(out.code(), 9, "{out:#?}");
    assert_all_dead(
        &wait_for_pids(&pid_files(dir.path(), 2)),
        Duration::from_millis(500),
    );
}

#[test]
fn leftover_processes_of_successful_ranks_are_cleaned_up() {
    // The rank exits 0 but leaves a sleeper behind in its process group
    // (holding its stdout). shampoo-run must not hang, and must stop it.
    let dir = tempfile::tempdir().unwrap();
    let script = r#"sleep 60 & echo $! > "$DIR/pid.0"; exit 0"#;
    let mut cmd = launcher(["--grace-period", "1", "sh", "-c", script]);
    cmd.env("DIR", dir.path());
    let out = run(cmd);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(
        out.stderr.contains("left processes running"),
        "{}",
        out.stderr
    );
    assert!(out.elapsed < Duration::from_secs(4), "{:?}", out.elapsed);
    assert_all_dead(
        &wait_for_pids(&pid_files(dir.path(), 1)),
        Duration::from_millis(500),
    );
}

#[test]
fn missing_or_unexecutable_program_is_reported() {
    let out = run(launcher(["--nproc-per-node", "2", "/nonexistent/train"]));
    assert_eq!(out.code(), 127, "{out:#?}");
    assert!(
        out.stderr.contains(
            "shampoo-run: error: cannot start rank 0: /nonexistent/train: No such file or directory"
        ),
        "{}",
        out.stderr
    );

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let out = run(launcher([&script]));
    assert_eq!(out.code(), 126, "{out:#?}");
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
}

#[test]
fn success_requires_every_rank_to_exit_zero() {
    let out = run(launcher([
        "--nproc-per-node",
        "3",
        "sh",
        "-c",
        r#"[ "$RANK" != 2 ] || { sleep 0.2; exit 1; }"#,
    ]));
    assert_eq!(out.code(), 1, "{out:#?}");
    assert!(
        out.stderr.contains("rank 2 printed nothing"),
        "{}",
        out.stderr
    );

    let out = run(launcher(["--nproc-per-node", "3", "true"]));
    assert_eq!(out.code(), 0, "{out:#?}");
}

#[test]
fn launcher_killed_with_sigkill_takes_its_ranks_along() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = launcher([
        "--nproc-per-node",
        "2",
        "sh",
        "-c",
        r#"echo $$ > "$DIR/pid.$RANK"; exec sleep 60"#,
    ]);
    cmd.env("DIR", dir.path());
    let running = start(cmd);
    let pids = wait_for_pids(&pid_files(dir.path(), 2));
    running.signal(libc::SIGKILL);
    let out = running.finish();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGKILL)
    );
    assert_all_dead(&pids, Duration::from_secs(2));
}
