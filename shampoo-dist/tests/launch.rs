//! CPU ranks launched by `shampoo-run`: bitwise equal to one process, and
//! the failures of the issue (exit code, SIGKILL, a hung rank, mismatched
//! shapes) end the job quickly with the right error and nothing left over.
//!
//! Each rank runs the least-squares fixture ([`lsq`]): this test executable
//! itself, running only its ignored test `lsq_fixture`.

mod lsq;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The fixture's process (see `lsq`): never returns there.
#[test]
#[ignore = "the least-squares fixture process of the launch tests, started by them"]
fn lsq_fixture() {
    if std::env::var_os(lsq::ARGS_VAR).is_some() {
        lsq::main();
    }
}

/// The program and arguments that run the fixture.
fn lsq_command() -> (PathBuf, [&'static str; 5]) {
    (
        std::env::current_exe().unwrap(),
        [
            "--exact",
            "lsq_fixture",
            "--ignored",
            "--nocapture",
            "--quiet",
        ],
    )
}

/// The fixture's arguments as [`lsq::ARGS_VAR`] holds them.
fn lsq_args(out: &Path, args: &[&str]) -> OsString {
    let mut v = OsString::from("--out-dir");
    v.push(lsq::SEP.to_string());
    v.push(out);
    for a in args {
        v.push(lsq::SEP.to_string());
        v.push(a);
    }
    v
}

/// The `shampoo-run` binary of this build profile, built if needed.
fn launcher_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("shampoo-run");
    if !bin.exists() {
        let release = profile_dir.ends_with("release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "shampoo-launcher", "--bin", "shampoo-run"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo to build shampoo-run");
        assert!(status.success(), "building shampoo-run failed");
    }
    bin
}

/// `shampoo-run --nproc-per-node N -- <the fixture> ARGS`, in an
/// environment free of variables that would change the plan.
fn launch(nproc: usize, out: &Path, args: &[&str]) -> (Output, Duration) {
    let (exe, harness) = lsq_command();
    let mut cmd = Command::new(launcher_bin());
    cmd.args([
        "--nproc-per-node",
        &nproc.to_string(),
        "--grace-period",
        "1",
        "--",
    ])
    .arg(exe)
    .args(harness)
    .env(lsq::ARGS_VAR, lsq_args(out, args))
    .stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("SLURM_")
            || k.starts_with("TORCHELASTIC_")
            || [
                "RANK",
                "LOCAL_RANK",
                "WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "CUDA_VISIBLE_DEVICES",
            ]
            .contains(&k.as_str())
        {
            cmd.env_remove(k);
        }
    }
    let start = Instant::now();
    let out = cmd.output().expect("start shampoo-run");
    (out, start.elapsed())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
            matches!(after.split_whitespace().next(), Some("Z" | "X"))
        }
    }
}

/// Every rank that started wrote a pid file; all of them must be gone.
fn assert_no_rank_left(out: &Path, world: usize) {
    for r in 0..world {
        let Ok(pid) = std::fs::read_to_string(out.join(format!("pid-{r}"))) else {
            continue;
        };
        let pid: i32 = pid.trim().parse().unwrap();
        assert!(is_dead(pid), "rank {r} (pid {pid}) is still running");
    }
}

#[test]
fn two_to_four_launched_ranks_equal_one_process_bitwise() {
    for world in 2..=4 {
        let dir = tempfile::tempdir().unwrap();
        let (out, _) = launch(world, dir.path(), &["--steps", "9"]);
        assert!(out.status.success(), "world {world}:\n{}", text(&out));
        let (exe, harness) = lsq_command();
        let sim = Command::new(exe)
            .args(harness)
            .env(
                lsq::ARGS_VAR,
                lsq_args(
                    dir.path(),
                    &["--steps", "9", "--simulate-world", &world.to_string()],
                ),
            )
            .output()
            .unwrap();
        assert!(sim.status.success(), "{}", text(&sim));
        let reference = std::fs::read(dir.path().join("reference.bin")).unwrap();
        assert_eq!(reference.len(), 4 * (16 * 24 + 16 + 4));
        for r in 0..world {
            let got = std::fs::read(dir.path().join(format!("rank-{r}.bin"))).unwrap();
            assert!(
                got == reference,
                "world {world}: rank {r} differs from one process"
            );
        }
    }
}

#[test]
fn a_rank_exiting_with_3_ends_the_job_with_3_within_5_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let (out, elapsed) = launch(
        3,
        dir.path(),
        &[
            "--steps",
            "1000",
            "--fail-rank",
            "1",
            "--fail-step",
            "3",
            "--fail-mode",
            "exit3",
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(
        t.lines()
            .any(|l| l.starts_with("shampoo-run: error: rank 1 (host ")
                && l.ends_with(") exited with code 3")),
        "{t}"
    );
    assert!(
        t.contains("[rank1]: rank 1: failing on purpose with exit code 3 at step 3"),
        "{t}"
    );
    assert_no_rank_left(dir.path(), 3);
}

#[test]
fn a_rank_killed_by_sigkill_ends_the_job_naming_the_signal() {
    let dir = tempfile::tempdir().unwrap();
    let (out, elapsed) = launch(
        2,
        dir.path(),
        &[
            "--steps",
            "1000",
            "--fail-rank",
            "0",
            "--fail-step",
            "2",
            "--fail-mode",
            "sigkill",
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(137), "{t}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(
        t.lines()
            .any(|l| l.starts_with("shampoo-run: error: rank 0 (host ")
                && l.ends_with(") was killed by signal SIGKILL")),
        "{t}"
    );
    assert_no_rank_left(dir.path(), 2);
}

#[test]
fn a_hanging_rank_makes_the_others_time_out_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (out, elapsed) = launch(
        3,
        dir.path(),
        &[
            "--steps",
            "1000",
            "--timeout",
            "2",
            "--fail-rank",
            "2",
            "--fail-step",
            "3",
            "--fail-mode",
            "hang",
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(7),
        "{elapsed:?}"
    );
    // The first rank to report it is the root cause; both say who is silent.
    let reported: Vec<&str> = t
        .lines()
        .filter(|l| l.contains("lsq: error: step 3: rank "))
        .collect();
    assert!(!reported.is_empty(), "{t}");
    for l in reported {
        assert!(
            // The step's first collective: the gradient presence flags.
            l.contains(": rank 2 did not answer within 2s in all_gather #"),
            "{l}"
        );
    }
    assert_no_rank_left(dir.path(), 3);
}

#[test]
fn mismatched_shapes_give_the_fingerprint_error() {
    let dir = tempfile::tempdir().unwrap();
    let (out, elapsed) = launch(3, dir.path(), &["--mismatch-rank", "1"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let expected = "lsq: error: optimizer fingerprint mismatch across ranks: rank 1 differs from rank 0: parameter 0 has shape [16, 24] on rank 0 and [16, 25] on rank 1";
    // The launcher stops the job at the first failure; the failed rank's
    // tail is printed whichever rank that is.
    assert!(t.lines().any(|l| l.ends_with(expected)), "{t}");
    assert_no_rank_left(dir.path(), 3);
}
