//! Flags around the rendezvous and the ranks' lifetime: --rdzv-* (mapped
//! onto what shampoo-run does, or named as unsupported), --comm-timeout
//! (the collectives' peer timeout), and the cap on --nproc-per-node.

mod common;

use common::{env_by_rank, launcher, run};

/// `shampoo-run ARGS --dry-run sh` (nothing is started).
fn dry_run(args: &[&str]) -> common::Finished {
    let mut all = args.to_vec();
    all.extend(["--dry-run", "sh"]);
    run(launcher(&all))
}

#[test]
fn rdzv_endpoint_and_id_map_onto_master_address_port_and_run_id() {
    for backend in ["c10d", "static"] {
        let out = dry_run(&[
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--rdzv-backend",
            backend,
            "--rdzv-endpoint",
            "node7:29411",
            "--rdzv_id",
            "job42",
        ]);
        assert_eq!(out.code(), 0, "{out:#?}");
        assert!(
            out.stdout.contains("master:         node7:29411"),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout.contains("run id:         job42"),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout.contains("  MASTER_ADDR=node7\n"),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout.contains("  MASTER_PORT=29411\n"),
            "{}",
            out.stdout
        );
    }
    // Without a port, the endpoint is the address; the port is torchrun's.
    let out = dry_run(&[
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--rdzv-endpoint",
        "10.1.2.3",
    ]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(
        out.stdout.contains("master:         10.1.2.3:29500"),
        "{}",
        out.stdout
    );
}

#[test]
fn rdzv_flags_without_an_equivalent_are_named_as_unsupported() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--rdzv-backend", "etcd"],
            "--rdzv-backend etcd is not supported: shampoo-run's rendezvous is rank 0's store at MASTER_ADDR:MASTER_PORT, which torchrun calls `c10d` or `static` (use one of those, or leave the flag out)",
        ),
        (
            &["--rdzv-conf", "timeout=900"],
            "--rdzv-conf is not supported: shampoo-run has no rendezvous options; the peer timeout of the collectives is --comm-timeout SECS",
        ),
        (
            &["--rdzv-endpoint", "a:1", "--master-addr", "b"],
            "--rdzv-endpoint and --master-addr/--master-port both say where rank 0's store is: give one of them",
        ),
        (
            &["--rdzv-id", "a", "--run-id", "b"],
            "--rdzv-id and --run-id both name the run: give one of them",
        ),
        (
            &["--rdzv-endpoint", "a:port"],
            "--rdzv-endpoint a:port: expected HOST or HOST:PORT with a port 1-65535",
        ),
    ];
    for (flags, message) in cases {
        let out = dry_run(flags);
        assert_eq!(out.code(), 2, "{flags:?}: {out:#?}");
        assert!(out.stderr.contains(message), "{flags:?}: {}", out.stderr);
    }
}

#[test]
fn nproc_per_node_is_capped_with_a_clear_error() {
    let started = std::time::Instant::now();
    let out = run(launcher(["--nproc-per-node", "100000", "true"]));
    assert_eq!(out.code(), 2, "{out:#?}");
    assert!(
        out.stderr.contains(
            "--nproc-per-node 100000 is more than the 1024 ranks shampoo-run starts on one node; use more nodes (--nnodes) for a larger world"
        ),
        "{}",
        out.stderr
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn comm_timeout_reaches_every_rank() {
    let out = run(launcher([
        "--nproc-per-node",
        "2",
        "--comm-timeout",
        "7.5",
        "sh",
        "-c",
        "echo SHAMPOO_COMM_TIMEOUT=$SHAMPOO_COMM_TIMEOUT",
    ]));
    assert_eq!(out.code(), 0, "{out:#?}");
    let env = env_by_rank(&out.stdout);
    for r in 0..2 {
        assert_eq!(env[&r]["SHAMPOO_COMM_TIMEOUT"], "7.5", "rank {r}");
    }
    let bad = dry_run(&["--comm-timeout", "0"]);
    assert_eq!(bad.code(), 2, "{bad:#?}");
    assert!(bad.stderr.contains("must be more than 0"), "{}", bad.stderr);
}
