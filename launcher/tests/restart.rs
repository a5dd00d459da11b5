//! `--max-restarts`: failed attempts restart every local rank.

mod common;

use common::{env_by_rank, launcher, run};

/// Fails on attempts 0 and 1 (rank 1 only), succeeds from attempt 2 on.
const FLAKY: &str = r#"
echo "ATTEMPT_$TORCHELASTIC_RESTART_COUNT=$MASTER_PORT"
if [ "$TORCHELASTIC_RESTART_COUNT" -lt 2 ] && [ "$RANK" = 1 ]; then exit 7; fi
"#;

#[test]
fn two_restarts_are_enough_for_a_job_failing_twice() {
    let out = run(launcher([
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "sh",
        "-c",
        FLAKY,
    ]));
    assert_eq!(out.code(), 0, "{out:#?}");
    let envs = env_by_rank(&out.stdout);
    // Rank 1 runs in every attempt. Rank 0 may be stopped before it prints
    // in the failed attempts, but must run in the last one.
    for attempt in 0..3 {
        assert!(
            envs[&1].contains_key(&format!("ATTEMPT_{attempt}")),
            "rank 1 attempt {attempt} missing in {}",
            out.stdout
        );
    }
    assert!(envs[&0].contains_key("ATTEMPT_2"), "{}", out.stdout);
    assert_eq!(
        envs[&0]["ATTEMPT_2"], envs[&1]["ATTEMPT_2"],
        "both ranks of an attempt share MASTER_PORT"
    );
    assert_eq!(
        out.stderr.matches("restarting all local ranks").count(),
        2,
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("(restart 2 of 2)"), "{}", out.stderr);
}

#[test]
fn one_restart_is_not_enough() {
    let out = run(launcher([
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "sh",
        "-c",
        FLAKY,
    ]));
    assert_eq!(out.code(), 7, "{out:#?}");
    assert!(
        out.stderr.contains("shampoo-run: error: rank 1 (host "),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("gave up after 1 restart(s)"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("ATTEMPT_2"), "no third attempt");
    assert!(out.stdout.contains("[rank1]: ATTEMPT_1="), "{}", out.stdout);
}

#[test]
fn restarted_attempts_log_to_their_own_directories() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(launcher([
        "--max-restarts".as_ref(),
        "1".as_ref(),
        "--log-dir".as_ref(),
        dir.path().as_os_str(),
        "sh".as_ref(),
        "-c".as_ref(),
        r#"echo "attempt $TORCHELASTIC_RESTART_COUNT"; [ "$TORCHELASTIC_RESTART_COUNT" = 1 ]"#
            .as_ref(),
    ]));
    assert_eq!(out.code(), 0, "{out:#?}");
    for attempt in 0..2 {
        let log = dir
            .path()
            .join(format!("attempt_{attempt}/rank_0/stdout.log"));
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            format!("attempt {attempt}\n")
        );
    }
}
