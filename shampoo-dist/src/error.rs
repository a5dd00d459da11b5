//! Errors of the distributed optimizer and its transports.
//!
//! Every communication error names the rank that reports it, the peer it
//! concerns and the collective it happened in, so that a failure on one rank
//! of a job can be traced to the rank that caused it.

use std::path::PathBuf;
use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `shampoo-dist`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error of the single-process optimizer.
    #[error(transparent)]
    Core(#[from] shampoo_core::Error),

    /// A peer did not answer within the collective timeout.
    #[error(
        "rank {rank}: rank {peer} did not answer within {timeout:?} in {op} (collective timeout; is rank {peer} hung or dead?)"
    )]
    Timeout {
        /// The rank reporting the error.
        rank: usize,
        /// The silent rank.
        peer: usize,
        /// The collective (`all_reduce #12`, `rendezvous`, ...).
        op: String,
        /// The configured timeout.
        timeout: Duration,
    },

    /// A peer's connection broke (it exited or crashed).
    #[error("rank {rank}: connection to rank {peer} lost in {op}: {reason}")]
    PeerLost {
        /// The rank reporting the error.
        rank: usize,
        /// The peer whose connection broke.
        peer: usize,
        /// The collective.
        op: String,
        /// What the operating system said.
        reason: String,
    },

    /// Ranks called different collectives, or with different sizes.
    #[error("rank {rank}: collective mismatch with rank {peer}: {detail}")]
    Mismatch {
        /// The rank reporting the error.
        rank: usize,
        /// The peer that disagrees.
        peer: usize,
        /// What differs.
        detail: String,
    },

    /// Rendezvous (the key-value store on MASTER_ADDR:MASTER_PORT) failed.
    #[error("rendezvous at {addr}: {reason}")]
    Rendezvous {
        /// `host:port` of the store.
        addr: String,
        /// What went wrong.
        reason: String,
    },

    /// Ranks built their optimizers for different parameters or configs.
    #[error("optimizer fingerprint mismatch across ranks: {0}")]
    Fingerprint(String),

    /// Ranks hold different values of something they must agree on (a
    /// run configuration).
    #[error("ranks disagree on {what}: {detail}")]
    Disagreement {
        /// What they must agree on.
        what: String,
        /// Which ranks and fields differ.
        detail: String,
    },

    /// A launcher variable (RANK, WORLD_SIZE, ...) is missing or invalid.
    #[error("environment: {0}")]
    Env(String),

    /// An argument is invalid (sizes, options).
    #[error("invalid argument: {0}")]
    Invalid(String),

    /// A distributed checkpoint is missing, inconsistent or unreadable.
    #[error("distributed checkpoint {path}: {reason}")]
    Checkpoint {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A transport is not available in this build or on this machine.
    #[error("{0}")]
    Unavailable(String),

    /// A parameter had a gradient on some ranks only (counted exactly over
    /// the ranks; the same error on every rank).
    #[error(
        "parameter {param} has a gradient on {count} of {world} ranks at step {step}; pass a gradient for it on every rank or on none"
    )]
    Presence {
        /// Parameter index (in the optimizer's parameter list).
        param: usize,
        /// The optimizer step whose gradients these were.
        step: u64,
        /// Ranks that had a gradient.
        count: usize,
        /// Number of ranks.
        world: usize,
    },

    /// Work queued on a device (an NCCL collective) did not complete within
    /// the collective timeout: a peer is hung or dead, or NCCL failed.
    #[error("rank {rank}: {op} did not complete within {timeout:?} on the device ({detail})")]
    DeviceTimeout {
        /// The rank reporting the error.
        rank: usize,
        /// What was waited for.
        op: String,
        /// The configured timeout.
        timeout: Duration,
        /// NCCL's asynchronous error state, or what else is known.
        detail: String,
    },
}

impl Error {
    /// The rank this error is a consequence of, when it is a *lost* peer
    /// (the peer exited or crashed): such a rank is a secondary failure,
    /// and a program may wait a moment before exiting so that a launcher
    /// records the dead peer as the root cause.
    pub fn lost_peer(&self) -> Option<usize> {
        match self {
            Error::PeerLost { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
