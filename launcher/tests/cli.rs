//! Command-line handling: usage errors, MASTER_PORT choice and checks,
//! --dry-run.

mod common;

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use common::{launcher, run, start};

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = run(launcher(["--nproc-per-nod", "2", "true"]));
    assert_eq!(out.code(), 2, "{out:#?}");
    assert!(out.stderr.contains("unexpected argument"), "{}", out.stderr);
}

#[test]
fn missing_program_is_a_usage_error() {
    for args in [&["--nproc-per-node", "2"][..], &[], &["--"]] {
        let out = run(launcher(args));
        assert_eq!(out.code(), 2, "{args:?}: {out:#?}");
        assert!(out.stderr.contains("PROGRAM"), "{}", out.stderr);
    }
}

#[test]
fn bad_combinations_exit_2_with_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--standalone", "--nnodes", "2"],
            "--standalone runs on a single node, but --nnodes 2 was given",
        ),
        (
            &["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"],
            "--node-rank 2 is out of range",
        ),
        (
            &["--nnodes", "2", "--node-rank", "0"],
            "needs --master-addr",
        ),
        (
            &["--nnodes", "2", "--master-addr", "h"],
            "needs --node-rank",
        ),
        (&["--nnodes", "1:2"], "elastic node ranges"),
        (&["--nproc-per-node", "0"], "at least 1"),
        (&["--tee", "--quiet"], "cannot be used with"),
    ];
    for (flags, message) in cases {
        let mut args = flags.to_vec();
        args.push("true");
        let started = Instant::now();
        let out = run(launcher(&args));
        assert_eq!(out.code(), 2, "{args:?}: {out:#?}");
        assert!(out.stderr.contains(message), "{args:?}: {}", out.stderr);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn standalone_picks_a_port_that_ranks_can_bind() {
    // The rank reports its MASTER_PORT and waits; while it runs, the test
    // binds the port, as rank 0's store would: the launcher must not hold it.
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
echo "$MASTER_ADDR $MASTER_PORT" > "$DIR/port.tmp" && mv "$DIR/port.tmp" "$DIR/port"
while [ ! -e "$DIR/go" ]; do sleep 0.02; done
"#;
    let mut cmd = launcher(["--standalone", "sh", "-c", script]);
    cmd.env("DIR", dir.path());
    let running = start(cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(dir.path().join("port")) {
            break text;
        }
        assert!(Instant::now() < deadline, "rank never reported its port");
        std::thread::sleep(Duration::from_millis(10));
    };
    let (addr, port) = text.trim().split_once(' ').unwrap();
    assert_eq!(addr, "127.0.0.1");
    let port: u16 = port.parse().unwrap();
    assert_ne!(port, 0);
    let bound = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port));
    std::fs::write(dir.path().join("go"), "").unwrap();
    let out = running.finish();
    bound.unwrap_or_else(|e| panic!("MASTER_PORT {port} is not bindable: {e}"));
    assert_eq!(out.code(), 0, "{out:#?}");
}

#[test]
fn master_port_in_use_fails_fast_without_starting_ranks() {
    let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    for extra in [
        &[][..],
        &["--standalone"],
        &[
            "--nnodes",
            "2",
            "--node-rank",
            "0",
            "--master-addr",
            "127.0.0.1",
        ],
    ] {
        let mut args = vec!["--master-port", &port];
        args.extend_from_slice(extra);
        args.extend(["sh", "-c", "echo rank started"]);
        let out = run(launcher(&args));
        assert_eq!(out.code(), 125, "{args:?}: {out:#?}");
        assert!(
            out.stderr.contains(&format!(
                "shampoo-run: error: MASTER_PORT {port} is already in use on this node"
            )),
            "{}",
            out.stderr
        );
        assert!(!out.stdout.contains("rank started"), "{}", out.stdout);
        assert!(out.elapsed < Duration::from_secs(2), "{:?}", out.elapsed);
    }
    // Only node 0 hosts the store, so other nodes do not check.
    let out = run(launcher([
        "--master-port",
        &port,
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "127.0.0.1",
        "true",
    ]));
    assert_eq!(out.code(), 0, "{out:#?}");
    drop(held);
}

#[test]
fn dry_run_prints_the_plan_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let out = run(launcher([
        "--dry-run".as_ref(),
        "--nproc-per-node".as_ref(),
        "2".as_ref(),
        "touch".as_ref(),
        marker.as_os_str(),
    ]));
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(!marker.exists(), "--dry-run must not run the program");
    assert!(
        out.stdout.contains("local rank 1:\n  RANK=1\n"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("MASTER_PORT=<picked at launch>"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("(unset TORCHELASTIC_ERROR_FILE)"),
        "{}",
        out.stdout
    );
}

#[test]
fn version_and_help_exit_0() {
    let out = run(launcher(["--version"]));
    assert_eq!(out.code(), 0);
    assert!(out.stdout.starts_with("shampoo-run "), "{}", out.stdout);
    let out = run(launcher(["--help"]));
    assert_eq!(out.code(), 0);
    assert!(out.stdout.contains("Exit codes:"), "{}", out.stdout);
}
