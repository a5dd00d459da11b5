//! Errors of the launcher itself (as opposed to failures of ranks, which are
//! an [`Outcome`](crate::Outcome)), and the exit codes they map to.

use std::io;
use std::path::PathBuf;

use crate::plan::PlanError;
use crate::port::PortError;

/// Exit code for usage errors: bad flags, impossible combinations.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when a rank was still running `--exit-barrier-timeout` after
/// every other rank exited successfully (as `timeout(1)`'s 124).
pub const EXIT_EXIT_BARRIER: u8 = 124;
/// Exit code when shampoo-run itself fails (after a valid command line).
pub const EXIT_LAUNCHER: u8 = 125;
/// Exit code when PROGRAM exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: u8 = 126;
/// Exit code when PROGRAM cannot be found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// Failures while starting or supervising ranks.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// MASTER_PORT is taken, or no free port could be found.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The `--log-dir` tree could not be created or written.
    #[error("cannot create log file or directory {}", .path.display())]
    LogDir {
        /// The path that failed.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// PROGRAM could not be started for a rank.
    #[error("cannot start rank {rank}: {program}")]
    Spawn {
        /// Global rank being started.
        rank: u32,
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] io::Error),
    /// A supervision thread could not be started.
    #[error("cannot start a supervision thread")]
    Thread(#[source] io::Error),
}

impl LaunchError {
    /// The exit code for this error: 127/126 for a PROGRAM that is missing or
    /// not executable (like a shell), 125 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Spawn { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                io::ErrorKind::PermissionDenied => EXIT_NOT_EXECUTABLE,
                _ => EXIT_LAUNCHER,
            },
            _ => EXIT_LAUNCHER,
        }
    }
}

/// Any error of the launcher.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line cannot work (exit code 2).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Starting or supervising ranks failed.
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Plan(_) => EXIT_USAGE,
            Error::Launch(e) => e.exit_code(),
        }
    }
}
