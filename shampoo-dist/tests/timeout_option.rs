//! The collectives' peer timeout comes from `SHAMPOO_COMM_TIMEOUT`
//! (`CommOptions::from_env`), which `shampoo-run --comm-timeout` sets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use shampoo_dist::CommOptions;
use shampoo_dist::comm::TIMEOUT_VAR;

fn with_var(value: &str) -> shampoo_dist::Result<CommOptions> {
    CommOptions::from_lookup(|k| (k == TIMEOUT_VAR).then(|| value.to_string()))
}

#[test]
fn the_variable_sets_the_timeout_of_every_wait() {
    assert_eq!(TIMEOUT_VAR, "SHAMPOO_COMM_TIMEOUT");
    assert_eq!(
        CommOptions::from_lookup(|_| None).unwrap().timeout,
        Duration::from_secs(300)
    );
    let opts = with_var("0.7").unwrap();
    assert_eq!(opts.timeout, Duration::from_millis(700));
    let results = per_tcp_rank(2, &opts, |c, rank| {
        let c = c.unwrap();
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(2100));
            return (String::new(), Duration::ZERO);
        }
        let start = Instant::now();
        let err = c.barrier().unwrap_err();
        (err.to_string(), start.elapsed())
    });
    let (msg, elapsed) = &results[0];
    assert!(
        msg.starts_with("rank 0: rank 1 did not answer within 700ms in barrier"),
        "{msg}"
    );
    assert!(*elapsed < Duration::from_millis(2000), "{elapsed:?}");
}

#[test]
fn bad_values_are_errors_naming_the_variable() {
    for (v, want) in [
        (
            "abc",
            "environment: SHAMPOO_COMM_TIMEOUT=\"abc\" is not a number of seconds",
        ),
        (
            "0",
            "environment: SHAMPOO_COMM_TIMEOUT=\"0\": the timeout must be a positive number of seconds",
        ),
        (
            "-2",
            "environment: SHAMPOO_COMM_TIMEOUT=\"-2\": the timeout must be a positive number of seconds",
        ),
    ] {
        assert_eq!(with_var(v).unwrap_err().to_string(), want);
    }
}
