//! Errors of the training library.

use std::path::PathBuf;

/// Everything that can go wrong while loading data, training, checkpointing
/// or plotting. Messages say what to do about it where there is something to
/// do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Fashion-MNIST idx files are not where they should be.
    #[error(
        "Fashion-MNIST not found: {} does not exist; install it with `sudo apt-get install dataset-fashion-mnist` (or run scripts/setup.sh), or point --data at a folder holding the four *-ubyte.gz files",
        path.display()
    )]
    MissingFashionMnist {
        /// The file that is missing.
        path: PathBuf,
    },
    /// An idx file that does not parse.
    #[error("malformed idx file {}: {reason}", path.display())]
    Idx {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An image-folder dataset whose layout is wrong (missing split, no
    /// class folders, an empty class folder, a file where a class folder
    /// should be).
    #[error("bad dataset folder {}: {reason}", path.display())]
    DatasetLayout {
        /// The folder.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An image that does not decode (with `--on-corrupt fail`).
    #[error(
        "corrupt image {}: {reason} (use --on-corrupt skip to skip such images with a warning)",
        path.display()
    )]
    CorruptImage {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// Every image of a rank's batch was corrupt and skipped.
    #[error("every image of a batch was corrupt (step {step}); nothing to train on")]
    EmptyBatch {
        /// The global step.
        step: u64,
    },
    /// A checkpoint written for another model.
    #[error(
        "checkpoint {} was written for model `{found}`, but this run uses `{expected}`",
        path.display()
    )]
    CheckpointModel {
        /// The checkpoint folder.
        path: PathBuf,
        /// The model of this run.
        expected: String,
        /// The model the checkpoint holds.
        found: String,
    },
    /// A checkpoint that cannot be used for another reason.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An option value that makes no sense (or a combination of them).
    #[error("invalid option: {0}")]
    Invalid(String),
    /// CUDA was asked for but is not there.
    #[error(
        "--device cuda: no CUDA device is visible to libtorch (tch::Cuda::is_available() is false); run on a machine with an NVIDIA GPU and the CUDA build of PyTorch, or use --device cpu"
    )]
    NoCuda,
    /// A libtorch error (its message without libtorch's C++ stack trace).
    #[error("libtorch: {}", torch_message(.0))]
    Torch(#[from] tch::TchError),
    /// `--out` already holds a run, and neither `--resume` nor
    /// `--overwrite` was given.
    #[error(
        "run folder {} already holds a run ({found}); continue it with --resume, or replace it with --overwrite",
        path.display()
    )]
    RunExists {
        /// The run folder.
        path: PathBuf,
        /// What it holds.
        found: String,
    },
    /// Another process holds the run folder's lock.
    #[error(
        "run folder {} is in use by {holder} (it holds {}/.lock); wait for that run to end, or choose another --out",
        path.display(),
        path.display()
    )]
    RunLocked {
        /// The run folder.
        path: PathBuf,
        /// Who holds it, as the lock file says.
        holder: String,
    },
    /// A non-finite loss, gradient or weight: the run stopped.
    #[error("training diverged at step {step}: {what}; {then}")]
    Diverged {
        /// The global step (1-based).
        step: u64,
        /// What is not finite.
        what: String,
        /// What was kept and what to do.
        then: String,
    },
    /// SIGINT or SIGTERM stopped the run after a step.
    #[error(
        "interrupted by {} after step {step}; {}",
        crate::signals::name(*.signal),
        match checkpoint {
            Some(c) => format!("checkpoint written to {} (continue with --resume)", c.display()),
            None => "no checkpoint written (checkpointing is off; add --checkpoint-every N to keep one)".into(),
        }
    )]
    Interrupted {
        /// The signal.
        signal: i32,
        /// Steps done.
        step: u64,
        /// The checkpoint written, if any.
        checkpoint: Option<PathBuf>,
    },
    /// A file-system error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file that does not parse.
    #[error("{context}: {source}")]
    Json {
        /// What was being read.
        context: String,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// An error of the Shampoo optimizer.
    #[error(transparent)]
    Shampoo(#[from] shampoo_tch::Error),
    /// An error between ranks.
    #[error(transparent)]
    Comm(#[from] shampoo_dist::Error),
    /// An error while drawing a plot.
    #[error("plot: {0}")]
    Plot(String),
}

impl Error {
    /// The process exit code for this error: 128 + signal for
    /// [`Error::Interrupted`] (130 for SIGINT, 143 for SIGTERM), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Interrupted { signal, .. } => u8::try_from(128 + signal).unwrap_or(1),
            _ => 1,
        }
    }
}

/// A libtorch message without the C++ context libtorch appends ("Exception
/// raised from ...", stack frames), on one line.
pub(crate) fn torch_message(e: &tch::TchError) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Exception raised from") && !l.starts_with("frame #"))
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        text.lines().next().unwrap_or_default().to_string()
    } else {
        lines.join(" ")
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a context to an I/O error.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
