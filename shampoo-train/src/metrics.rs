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
//!
//! `step` lines of Shampoo runs also carry `root_inverse`: this step's
//! root-inverse failures, float64 retries and kept previous roots, summed
//! over blocks and ranks; a step skipped for a non-finite loss or gradient
//! (`--skip-nonfinite`) has `"skipped": true`.

use crate::error::{Result, io_err};
use serde::Deserialize;
use std::io::Write;
use std::path::Path;

/// Appends JSON lines to a file; a no-op writer on ranks other than 0.
///
/// Every line goes to the operating system in one `write` as soon as it is
/// written (an interrupted process loses no line and tears none, short of
/// the machine failing mid-write), and [`MetricsWriter::sync`] makes the
/// file durable: the training loop calls it before every checkpoint, so the
/// metrics always cover the newest checkpoint's step.
#[derive(Debug)]
pub struct MetricsWriter {
    file: Option<std::fs::File>,
    line: Vec<u8>,
}

impl MetricsWriter {
    /// Opens `path` for appending (creating it) when `enabled`.
    pub fn open(path: &Path, enabled: bool) -> Result<Self> {
        let file = if enabled {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io_err(format!("opening {}", path.display())))?,
            )
        } else {
            None
        };
        Ok(MetricsWriter {
            file,
            line: Vec::new(),
        })
    }

    /// Writes one line.
    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            self.line.clear();
            serde_json::to_writer(&mut self.line, value).expect("JSON values serialise");
            self.line.push(b'\n');
            f.write_all(&self.line).map_err(io_err("writing metrics"))?;
        }
        Ok(())
    }

    /// Makes every line written so far durable (fsync).
    pub fn sync(&mut self) -> Result<()> {
        if let Some(f) = &mut self.file {
            f.sync_data().map_err(io_err("writing metrics"))?;
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

/// The lines of a metrics file, parsed: every complete line must parse; a
/// last line that does not (a write torn by a crash, without its newline)
/// is left out and reported as the second value.
type Parsed<'t, T> = (Vec<(T, &'t str)>, Option<String>);

fn parse_lines<'t, T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &'t str,
) -> Result<Parsed<'t, T>> {
    let mut out = Vec::new();
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => out.push((v, *line)),
            Err(_) if i + 1 == lines.len() && !complete => {
                let note = format!(
                    "{} line {}: dropped a torn last line ({} bytes without a newline; the writing process was killed)",
                    path.display(),
                    i + 1,
                    line.len()
                );
                return Ok((out, Some(note)));
            }
            Err(source) => {
                return Err(crate::Error::Json {
                    context: format!("{} line {}", path.display(), i + 1),
                    source,
                });
            }
        }
    }
    Ok((out, None))
}

/// Reads `metrics.jsonl` (a torn last line is left out with a warning).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
    let (records, note) = parse_lines::<Record>(path, &text)?;
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    Ok(records.into_iter().map(|(r, _)| r).collect())
}

/// Drops the lines of `path` whose `step` is after `step` (a resumed run
/// repeats those steps), and a torn last line. A missing file is left
/// missing. Returns a note for the user when it dropped a torn line.
pub fn truncate_after(path: &Path, step: u64) -> Result<Option<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    let (lines, note) = parse_lines::<serde_json::Value>(path, &text)?;
    let mut kept = String::with_capacity(text.len());
    for (v, line) in lines {
        if v["step"].as_u64().is_some_and(|s| s <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    std::fs::write(path, kept).map_err(io_err(format!("writing {}", path.display())))?;
    Ok(note)
}
