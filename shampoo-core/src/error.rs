//! Errors returned by the optimizer.
//!
//! Every variant carries what a user needs to act on it: the block, the
//! factor dimension, the shape, the file. Numerical failures are typed
//! errors, never panics.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which kind of matrix a non-finite value was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixKind {
    /// A Kronecker factor (after bias correction and damping).
    Factor,
    /// A computed inverse root or eigenbasis.
    Root,
}

impl std::fmt::Display for MatrixKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MatrixKind::Factor => "factor matrix",
            MatrixKind::Root => "root inverse",
        })
    }
}

/// Everything that can go wrong in `shampoo-core`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Config(String),

    /// The configuration could not be parsed.
    #[error("cannot parse config: {0}")]
    ConfigParse(#[from] serde_json::Error),

    /// Parameters, gradients or views do not match the optimizer's layout.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A parameter or gradient has another dtype than the optimizer.
    #[error("dtype mismatch: {what} is {found}, the optimizer was built for {expected}")]
    DType {
        /// What was passed.
        what: String,
        /// Its dtype.
        found: crate::DType,
        /// The optimizer's dtype.
        expected: crate::DType,
    },

    /// NaN or Inf in a factor matrix or in a computed root.
    #[error(
        "non-finite values (NaN or Inf) in the {kind} of block {block} (parameter {param}, block shape {shape:?}), dimension {dim}, at step {step}"
    )]
    NonFinite {
        /// Which matrix.
        kind: MatrixKind,
        /// Global block id.
        block: usize,
        /// Parameter index.
        param: usize,
        /// Block shape after merging.
        shape: Vec<usize>,
        /// Factor dimension.
        dim: usize,
        /// Optimizer step.
        step: u64,
    },

    /// The root-inverse solver failed more than the tolerated number of
    /// consecutive times for one factor.
    #[error(
        "root inverse of block {block} (parameter {param}, block shape {shape:?}), dimension {dim} failed {failures} times in a row (last at step {step}); the statistics are likely degenerate: raise epsilon"
    )]
    RootInverseFailed {
        /// Global block id.
        block: usize,
        /// Parameter index.
        param: usize,
        /// Block shape after merging.
        shape: Vec<usize>,
        /// Factor dimension.
        dim: usize,
        /// Consecutive failures.
        failures: u32,
        /// Optimizer step.
        step: u64,
    },

    /// A checkpoint could not be read, or does not belong to this optimizer.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// An I/O error with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An optimizer that would need more memory than there is.
    #[error("{what}")]
    TooLarge {
        /// Bytes it needs.
        needed: u64,
        /// Bytes allowed.
        limit: u64,
        /// The whole message: sizes, and what makes it so large.
        what: String,
    },

    /// A backend is not available (not compiled in, library or device missing).
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),

    /// The backend cannot run a feature of the configuration yet.
    #[error(
        "the {backend} backend cannot run {feature} yet (it lacks the {op} operation); use the CPU backend for this configuration"
    )]
    Unsupported {
        /// The backend's name.
        backend: String,
        /// The configured feature.
        feature: String,
        /// The missing operation.
        op: String,
    },

    /// A step was taken while the optimizer's parameters hold the
    /// evaluation view of iterate averaging.
    #[error(
        "the optimizer is in eval mode (the parameters hold the averaged iterate): call train() before step()"
    )]
    EvalMode,

    /// A backend operation failed.
    #[error("backend error in {op}: {message}")]
    Backend {
        /// The operation.
        op: &'static str,
        /// The backend's message.
        message: String,
    },
}

impl Error {
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub(crate) fn shape(msg: impl Into<String>) -> Self {
        Error::Shape(msg.into())
    }

    /// Builds a backend error.
    pub fn backend(op: &'static str, message: impl std::fmt::Display) -> Self {
        Error::Backend {
            op,
            message: message.to_string(),
        }
    }
}
