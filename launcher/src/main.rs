//! `shampoo-run`: launch and supervise the ranks of a data-parallel training
//! program. See `docs/launcher.md`.
//!
//! Exit codes: 0 when every rank succeeded; the first failed rank's code
//! (128+N if killed by signal N); 2 for usage errors; 125 when the launcher
//! itself fails; 126/127 when PROGRAM cannot be executed / is not found;
//! 130/143 (129, 131) when interrupted by SIGINT/SIGTERM (SIGHUP, SIGQUIT).

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use shampoo_launcher::{RawArgs, logging};

fn main() -> ExitCode {
    // Usage errors print clap's message and exit with code 2.
    let raw = RawArgs::parse();
    logging::init(raw.verbose);
    match shampoo_launcher::run(&raw) {
        Ok(outcome) => {
            if let Some(report) = outcome.report() {
                let _ = std::io::stderr().lock().write_all(report.as_bytes());
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(err) => {
            let code = err.exit_code();
            let message = format!("shampoo-run: error: {:#}\n", anyhow::Error::new(err));
            let _ = std::io::stderr().lock().write_all(message.as_bytes());
            ExitCode::from(code)
        }
    }
}
