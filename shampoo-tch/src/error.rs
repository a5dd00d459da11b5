//! Errors of the libtorch adapter.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when Shampoo drives a `tch` model.
///
/// Flat: an error of the optimizer's numerics, config or state is always
/// [`Error::Core`], whatever the world size and the device (the distributed
/// optimizer's wrapper around it is removed), and [`Error::Dist`] is only
/// what communication adds (a peer, a timeout, a fingerprint, a
/// distributed checkpoint). A gradient present on some ranks only is an
/// [`Error::Variable`] naming the variable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The optimizer itself failed (config, shapes, numerics, checkpoint).
    #[error(transparent)]
    Core(#[from] shampoo_core::Error),

    /// Communication failed: a collective, a peer, the ranks' agreement, or
    /// a distributed checkpoint (never an optimizer error, which is
    /// [`Error::Core`]).
    #[error(transparent)]
    Dist(shampoo_dist::Error),

    /// libtorch reported an error (for example in `backward`): its message,
    /// without libtorch's C++ backtrace.
    #[error("libtorch: {0}")]
    Torch(String),

    /// A variable or its gradient cannot be used in place: wrong device,
    /// dtype, layout, or memory shared with another variable.
    #[error("variable {name:?}: {reason}")]
    Variable {
        /// The variable's name in the `VarStore`.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A parameter group does not exist or is used inconsistently.
    #[error("parameter group {group}: {reason}")]
    Group {
        /// The `VarStore` group id.
        group: usize,
        /// What is wrong.
        reason: String,
    },

    /// An optimizer checkpoint cannot be written or does not fit this model.
    #[error("optimizer checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The builder's options do not fit together.
    #[error("optimizer options: {0}")]
    Options(String),

    /// An I/O error with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl From<shampoo_dist::Error> for Error {
    fn from(e: shampoo_dist::Error) -> Self {
        match e {
            shampoo_dist::Error::Core(c) => Error::Core(c),
            other => Error::Dist(other),
        }
    }
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        let text = match e {
            tch::TchError::Torch(s) => s,
            other => other.to_string(),
        };
        let first = text.split("\nException raised from").next().unwrap_or("");
        let first = first
            .strip_prefix("Internal torch error: ")
            .unwrap_or(first);
        Error::Torch(first.trim_end().to_string())
    }
}

impl Error {
    pub(crate) fn variable(name: &str, reason: impl Into<String>) -> Self {
        Error::Variable {
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn checkpoint(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
