//! Metrics as JSON lines (`RUN_DIR/metrics.jsonl`), written by rank 0.
//!
//! Each line is an object with a `kind`:
//! - `"step"`: `step` (1-based, global), `epoch`, `lr`, `loss` and `acc`
//!   (training batch, averaged over ranks), `images_per_s`, and the step-time
//!   split in seconds: `data`, `fwd_bwd`, `all_reduce`, `optimizer`,
//!   `all_gather`, `step_time`;
//! - `"eval"`: `step`, `epoch`, `test_loss`, `test_acc`, `train_s` (training
//!   time so far, without evaluations and checkpoints);
//! - `"epoch"`: `epoch` (1-based), `step`, `train_loss`, `train_acc` (over
//!   the epoch), `test_loss`, `test_acc`, `train_s`.

use crate::error::{Result, io_err};
use serde::Deserialize;
use std::io::Write;
use std::path::Path;

/// Appends JSON lines to a file; a no-op writer on ranks other than 0.
#[derive(Debug)]
pub struct MetricsWriter {
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl MetricsWriter {
    /// Opens `path` for appending (creating it) when `enabled`.
    pub fn open(path: &Path, enabled: bool) -> Result<Self> {
        let file = if enabled {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_err(format!("opening {}", path.display())))?;
            Some(std::io::BufWriter::new(f))
        } else {
            None
        };
        Ok(MetricsWriter { file })
    }

    /// Writes one line.
    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{value}").map_err(io_err("writing metrics"))?;
        }
        Ok(())
    }

    /// Flushes to disk.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(f) = &mut self.file {
            f.flush().map_err(io_err("writing metrics"))?;
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`, as read back (fields a kind lacks are `None`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Record {
    /// `step`, `eval` or `epoch`.
    pub kind: String,
    /// Global step (1-based) at which the line was written.
    pub step: u64,
    /// Training-batch loss (`step` lines).
    pub loss: Option<f64>,
    /// Test accuracy in `[0, 1]` (`eval` and `epoch` lines).
    pub test_acc: Option<f64>,
    /// Test loss.
    pub test_loss: Option<f64>,
    /// Training time so far, seconds (`eval` and `epoch` lines).
    pub train_s: Option<f64>,
}

/// Reads `metrics.jsonl`.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| crate::Error::Json {
                context: format!("{} line {}", path.display(), i + 1),
                source,
            })
        })
        .collect()
}

/// Drops the lines of `path` whose `step` is after `step` (a resumed run
/// repeats those steps). A missing file is left missing.
pub fn truncate_after(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    let mut kept = String::with_capacity(text.len());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|source| crate::Error::Json {
                context: format!("{}", path.display()),
                source,
            })?;
        if v["step"].as_u64().is_some_and(|s| s <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    std::fs::write(path, kept).map_err(io_err(format!("writing {}", path.display())))
}
