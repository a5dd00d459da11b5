//! Checkpoints: `RUN_DIR/checkpoint/` holds `state.json` (what was trained,
//! and where in the data the run stands), `model.ot` (the `VarStore`) and
//! `optim/` (the optimizer's state). A new checkpoint is written into
//! `checkpoint.tmp/` and then renamed over the old one, so an interrupted
//! write never leaves a half checkpoint behind.

use crate::error::{Error, Result, io_err};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Format version of `state.json`.
pub const FORMAT: u32 = 1;

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// [`FORMAT`].
    pub format: u32,
    /// Model name (`cnn`, `resnet18`, `resnet50`).
    pub model: String,
    /// Output classes of the model.
    pub num_classes: usize,
    /// Optimizer name.
    pub optimizer: String,
    /// Dataset name.
    pub dataset: String,
    /// Global batch size.
    pub global_batch: usize,
    /// Data-order seed.
    pub seed: u64,
    /// Ranks of the run that wrote it.
    pub world_size: usize,
    /// Steps done (the next step is `step + 1`).
    pub step: u64,
    /// Training time so far (seconds, without evaluations and checkpoints).
    pub train_s: f64,
    /// Running sums of the current epoch: loss, correct, count.
    pub epoch_sums: [f64; 3],
}

/// The checkpoint folder of a run.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// The folder a new checkpoint is written into before it replaces the old one.
pub fn tmp_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint.tmp")
}

/// Reads `state.json` of the checkpoint in `ckpt`.
pub fn read_state(ckpt: &Path) -> Result<State> {
    let path = ckpt.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Checkpoint {
        path: ckpt.to_path_buf(),
        reason: format!("cannot read state.json ({e}); is this a shampoo-train run folder?"),
    })?;
    let state: State = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: ckpt.to_path_buf(),
        reason: format!("state.json: {e}"),
    })?;
    if state.format != FORMAT {
        return Err(Error::Checkpoint {
            path: ckpt.to_path_buf(),
            reason: format!("format {} (this build reads {FORMAT})", state.format),
        });
    }
    Ok(state)
}

/// Writes `state.json` into `ckpt`.
pub fn write_state(ckpt: &Path, state: &State) -> Result<()> {
    let path = ckpt.join("state.json");
    let text = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
}

/// Replaces `run_dir/checkpoint` by `run_dir/checkpoint.tmp` (rank 0 only,
/// after every rank has written its part).
pub fn commit(run_dir: &Path) -> Result<()> {
    let (cur, tmp, old) = (
        dir(run_dir),
        tmp_dir(run_dir),
        run_dir.join("checkpoint.old"),
    );
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(format!("removing {}", old.display())))?;
    }
    if cur.exists() {
        std::fs::rename(&cur, &old).map_err(io_err(format!("renaming {}", cur.display())))?;
    }
    std::fs::rename(&tmp, &cur).map_err(io_err(format!("renaming {}", tmp.display())))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(format!("removing {}", old.display())))?;
    }
    Ok(())
}
