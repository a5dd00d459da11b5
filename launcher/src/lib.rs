//! `shampoo-run`: a process launcher for data-parallel training programs,
//! compatible with programs written for PyTorch's `torchrun`.
//!
//! The flow is: [`args::RawArgs`] (what was typed) → [`plan::LaunchPlan`]
//! (validated against the environment: Slurm, GPUs, cores) → [`launch`],
//! which runs attempts until success, a signal, or the restart budget is
//! spent, and returns an [`Outcome`] carrying the exit code and the failure
//! report. See `docs/launcher.md` for the user-facing behaviour.

#![cfg(unix)]
#![warn(missing_docs)]

pub mod args;
pub mod env;
pub mod error;
pub mod gpu;
pub mod logging;
pub mod output;
pub mod plan;
pub mod port;
pub mod signals;
pub mod slurm;
pub mod supervise;
mod sys;

use std::fmt::Write as _;
use std::io::Write as _;

pub use crate::args::RawArgs;
pub use crate::error::{Error, LaunchError};
pub use crate::plan::{LaunchPlan, MasterPort, RealSystem};
pub use crate::supervise::{AttemptOutcome, RankFailure};

use crate::signals::{signal_exit_code, signal_name};
use crate::supervise::Supervisor;

/// How a run ended (other than by a launcher error).
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every rank exited with code 0.
    Succeeded {
        /// Attempts made, 1 + restarts used.
        attempts: u32,
    },
    /// A rank failed and no restarts were left.
    Failed {
        /// The root cause of the last attempt.
        failure: Box<RankFailure>,
        /// Restarts used before giving up.
        restarts: u32,
    },
    /// The launcher was interrupted by this signal and stopped all ranks.
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// `--dry-run`: the plan was printed, nothing was started.
    DryRun,
}

impl Outcome {
    /// The process exit code: 0, the failed rank's code (128+N for signal N),
    /// or 128+N when the launcher itself got signal N.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Succeeded { .. } | Outcome::DryRun => 0,
            Outcome::Failed { failure, .. } if failure.still_running_after.is_some() => {
                crate::error::EXIT_EXIT_BARRIER
            }
            Outcome::Failed { failure, .. } => failure.termination.exit_code(),
            Outcome::Interrupted { signal } => signal_exit_code(*signal),
        }
    }

    /// The text to print on stderr at exit, if any: for a failure, the
    /// root-cause line and the failed rank's last lines of output.
    pub fn report(&self) -> Option<String> {
        match self {
            Outcome::Succeeded { .. } | Outcome::DryRun => None,
            Outcome::Interrupted { signal } => Some(format!(
                "shampoo-run: interrupted by {}; all ranks were stopped\n",
                signal_name(*signal)
            )),
            Outcome::Failed { failure, restarts } => {
                let mut s = format!("shampoo-run: error: {}\n", failure.headline());
                if failure.tail.is_empty() {
                    let _ = writeln!(s, "shampoo-run: rank {} printed nothing", failure.rank);
                } else {
                    let _ = writeln!(
                        s,
                        "shampoo-run: last {} line(s) of rank {} output:",
                        failure.tail.len(),
                        failure.rank
                    );
                    for line in &failure.tail {
                        let _ = writeln!(s, "{}", String::from_utf8_lossy(line));
                    }
                }
                if let Some(dir) = &failure.log_dir {
                    let _ = writeln!(
                        s,
                        "shampoo-run: full output of rank {}: {}/{{stdout,stderr}}.log",
                        failure.rank,
                        dir.display()
                    );
                }
                if *restarts > 0 {
                    let _ = writeln!(s, "shampoo-run: gave up after {restarts} restart(s)");
                }
                Some(s)
            }
        }
    }
}

/// Validates `raw` against this machine and runs it (or, with `--dry-run`,
/// prints the plan).
pub fn run(raw: &RawArgs) -> Result<Outcome, Error> {
    let plan = LaunchPlan::new(raw, &RealSystem)?;
    tracing::debug!("launch plan:\n{}", plan.describe());
    if raw.dry_run {
        // A closed stdout is not worth a panic.
        let _ = std::io::stdout()
            .lock()
            .write_all(dry_run_text(&plan).as_bytes());
        return Ok(Outcome::DryRun);
    }
    Ok(launch(&plan)?)
}

/// What `--dry-run` prints: the plan, then each local rank's variables.
pub fn dry_run_text(plan: &LaunchPlan) -> String {
    let mut s = plan.describe();
    let port = match plan.master_port {
        MasterPort::Fixed(p) => p,
        MasterPort::PickFreshPerAttempt => 0,
    };
    for local_rank in 0..plan.nproc_per_node {
        let env = env::rank_env(plan, local_rank, 0, port, &|name| std::env::var_os(name));
        let _ = writeln!(s, "\nlocal rank {local_rank}:");
        for (name, value) in &env.set {
            let value = value.to_string_lossy();
            let value = if *name == "MASTER_PORT" && port == 0 {
                "<picked at launch>".into()
            } else {
                value
            };
            let _ = writeln!(s, "  {name}={value}");
        }
        for name in &env.remove {
            let _ = writeln!(s, "  (unset {name})");
        }
    }
    s
}

/// Runs `plan`: attempt 0, then up to `max_restarts` restarts after failures.
///
/// Must be called from the main thread (see [`supervise`]).
pub fn launch(plan: &LaunchPlan) -> Result<Outcome, LaunchError> {
    let mut supervisor = Supervisor::new()?;
    let mut attempt = 0;
    loop {
        if let Some(signal) = supervisor.pending_signal() {
            tracing::warn!("received {} before starting ranks", signal_name(signal));
            return Ok(Outcome::Interrupted { signal });
        }
        let port = match plan.master_port {
            MasterPort::PickFreshPerAttempt => port::pick_free_port()?,
            MasterPort::Fixed(p) => {
                if plan.checks_master_port() {
                    port::check_port_free(p)?;
                }
                p
            }
        };
        let first = plan.global_rank(0);
        let last = plan.global_rank(plan.nproc_per_node - 1);
        tracing::info!(
            "attempt {attempt}: starting rank(s) {first}..={last} of {} on {} \
             (MASTER_ADDR={} MASTER_PORT={port})",
            plan.world_size(),
            plan.hostname,
            plan.master_addr,
        );
        match supervisor.run_attempt(plan, attempt, port)? {
            AttemptOutcome::Succeeded => {
                tracing::info!(
                    "all {} local rank(s) exited successfully",
                    plan.nproc_per_node
                );
                return Ok(Outcome::Succeeded {
                    attempts: attempt + 1,
                });
            }
            AttemptOutcome::Interrupted(signal) => return Ok(Outcome::Interrupted { signal }),
            AttemptOutcome::Failed(failure) => {
                if attempt >= plan.max_restarts {
                    return Ok(Outcome::Failed {
                        failure,
                        restarts: attempt,
                    });
                }
                attempt += 1;
                tracing::warn!(
                    "{}; restarting all local ranks (restart {attempt} of {})",
                    failure.headline(),
                    plan.max_restarts
                );
            }
        }
    }
}
