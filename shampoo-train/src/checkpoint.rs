//! Checkpoints: `RUN_DIR/checkpoint/` holds `state.json` (what was trained,
//! and where in the data the run stands), `model.ot` (the `VarStore`),
//! `optim/` (the optimizer's state) and `checksums.json` (the size and
//! CRC-32 of every other file).
//!
//! A new checkpoint is written into `checkpoint.tmp/`; once every rank has
//! written its part, rank 0 checksums every file (flushing it to disk),
//! writes `checksums.json` last, and commits: `checkpoint/` is renamed to
//! `checkpoint.old/`, `checkpoint.tmp/` to `checkpoint/`, and
//! `checkpoint.old/` is removed. A folder with a valid `checksums.json` is
//! complete, so a process killed anywhere in this sequence leaves a
//! complete checkpoint that [`recover`] finds (the newer of `checkpoint.tmp/`
//! and `checkpoint.old/` when `checkpoint/` is missing) and nothing that
//! could be taken for one.
//!
//! CRC-32 (`crc32fast`, the crate `flate2` already uses for gzip) detects
//! flipped bits and partial copies at several GB/s; it is not meant to
//! resist deliberate tampering, which a checkpoint folder cannot anyway.

use crate::error::{Error, Result, io_err};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Format version of `state.json` written by this build (format 1, from
/// before checksums, is still read).
pub const FORMAT: u32 = 2;

/// The file that lists every file of a checkpoint with its checksum.
pub const CHECKSUMS: &str = "checksums.json";

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
    /// Training samples (the data order is a permutation of them).
    #[serde(default)]
    pub train_len: Option<usize>,
    /// Epochs of the run.
    #[serde(default)]
    pub epochs: Option<u64>,
    /// The learning-rate schedule (peak, warmup, total steps, kind, decay).
    #[serde(default)]
    pub schedule: Option<serde_json::Value>,
    /// Steps skipped for a non-finite loss or gradient (`--skip-nonfinite`).
    #[serde(default)]
    pub skipped_steps: Vec<u64>,
    /// Root-inverse counters over every session so far (Shampoo).
    #[serde(default)]
    pub root_inverse: shampoo_core::RootInverseCounters,
}

/// The checkpoint folder of a run.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// The folder a new checkpoint is written into before it replaces the old one.
pub fn tmp_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint.tmp")
}

/// Where the previous checkpoint goes while a new one is committed.
pub fn old_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint.old")
}

fn ckpt_err(ckpt: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: ckpt.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads `state.json` of the checkpoint in `ckpt`.
pub fn read_state(ckpt: &Path) -> Result<State> {
    let path = ckpt.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ckpt_err(
            ckpt,
            format!("cannot read state.json ({e}); is this a shampoo-train run folder?"),
        )
    })?;
    let state: State =
        serde_json::from_str(&text).map_err(|e| ckpt_err(ckpt, format!("state.json: {e}")))?;
    if !(1..=FORMAT).contains(&state.format) {
        return Err(ckpt_err(
            ckpt,
            format!("format {} (this build reads 1 to {FORMAT})", state.format),
        ));
    }
    Ok(state)
}

/// Writes `state.json` into `ckpt`.
pub fn write_state(ckpt: &Path, state: &State) -> Result<()> {
    let path = ckpt.join("state.json");
    let text = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
}

/// One file's entry in `checksums.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    crc32: String,
}

/// `checksums.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Checksums {
    algorithm: String,
    /// By path relative to the checkpoint folder, `/`-separated.
    files: BTreeMap<String, FileSum>,
}

/// Size and CRC-32 of a file; with `sync`, also flushes it to disk.
fn file_sum(path: &Path, sync: bool) -> std::io::Result<FileSum> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    if sync {
        f.sync_all()?;
    }
    Ok(FileSum {
        bytes,
        crc32: format!("{:08x}", hasher.finalize()),
    })
}

/// Every file under `dir` (recursively), as sorted relative `/` paths.
fn files_under(dir: &Path) -> std::io::Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root).expect("under root");
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Flushes a folder's entries (file creations and renames) to disk.
fn sync_dir(dir: &Path) {
    // Best effort: not every file system lets a folder be opened or synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Checksums every file of the checkpoint folder `ckpt` (flushing each to
/// disk) and writes `checksums.json` last: from then on the folder is a
/// complete checkpoint.
pub fn seal(ckpt: &Path) -> Result<()> {
    let ctx = |what: &str| io_err(format!("{what} {}", ckpt.display()));
    let mut files = BTreeMap::new();
    for rel in files_under(ckpt).map_err(ctx("listing"))? {
        if rel == CHECKSUMS {
            continue;
        }
        let sum = file_sum(&ckpt.join(&rel), true).map_err(ctx("checksumming"))?;
        files.insert(rel, sum);
    }
    let sums = Checksums {
        algorithm: "crc32".into(),
        files,
    };
    let path = ckpt.join(CHECKSUMS);
    let text = serde_json::to_string_pretty(&sums).expect("checksums serialise");
    std::fs::write(&path, text)
        .and_then(|_| std::fs::File::open(&path)?.sync_all())
        .map_err(io_err(format!("writing {}", path.display())))?;
    for rel in files_under(ckpt).map_err(ctx("listing"))? {
        if let Some(parent) = ckpt.join(rel).parent() {
            sync_dir(parent);
        }
    }
    Ok(())
}

/// Checks every file `checksums.json` lists: present, of the recorded size
/// and CRC-32. A checkpoint without `checksums.json` is accepted only in
/// format 1 (written before checksums), with a warning.
pub fn verify(ckpt: &Path) -> Result<()> {
    let path = ckpt.join(CHECKSUMS);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let state = read_state(ckpt)?;
            if state.format == 1 {
                tracing::warn!(
                    "{}: written before checkpoints had checksums; its files are not verified",
                    ckpt.display()
                );
                return Ok(());
            }
            return Err(ckpt_err(
                ckpt,
                format!(
                    "{CHECKSUMS} is missing: the checkpoint is incomplete (its writing was interrupted)"
                ),
            ));
        }
        Err(e) => return Err(ckpt_err(ckpt, format!("cannot read {CHECKSUMS}: {e}"))),
    };
    let sums: Checksums = serde_json::from_str(&text)
        .map_err(|e| ckpt_err(ckpt, format!("{CHECKSUMS} is malformed: {e}")))?;
    if sums.algorithm != "crc32" {
        return Err(ckpt_err(
            ckpt,
            format!(
                "{CHECKSUMS} uses {:?}; this build checks crc32",
                sums.algorithm
            ),
        ));
    }
    for (rel, want) in &sums.files {
        let file = ckpt.join(rel);
        let got = file_sum(&file, false).map_err(|e| {
            ckpt_err(
                ckpt,
                format!("{rel} is listed in {CHECKSUMS} but cannot be read ({e})"),
            )
        })?;
        if got.bytes != want.bytes {
            return Err(ckpt_err(
                ckpt,
                format!(
                    "{rel} is corrupt: {} bytes, the checkpoint recorded {} (a truncated or partial copy)",
                    got.bytes, want.bytes
                ),
            ));
        }
        if got.crc32 != want.crc32 {
            return Err(ckpt_err(
                ckpt,
                format!(
                    "{rel} is corrupt: its CRC-32 is {}, the checkpoint recorded {} (flipped bits on disk or in a copy)",
                    got.crc32, want.crc32
                ),
            ));
        }
    }
    Ok(())
}

/// Replaces `run_dir/checkpoint` by the sealed `run_dir/checkpoint.tmp`
/// (rank 0 only, after every rank has written its part).
pub fn commit(run_dir: &Path) -> Result<()> {
    let (cur, tmp, old) = (dir(run_dir), tmp_dir(run_dir), old_dir(run_dir));
    seal(&tmp)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(format!("removing {}", old.display())))?;
    }
    if cur.exists() {
        std::fs::rename(&cur, &old).map_err(io_err(format!("renaming {}", cur.display())))?;
    }
    std::fs::rename(&tmp, &cur).map_err(io_err(format!("renaming {}", tmp.display())))?;
    sync_dir(run_dir);
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(format!("removing {}", old.display())))?;
    }
    Ok(())
}

/// Repairs what an interrupted commit left in `run_dir` (rank 0, before
/// anything reads or writes checkpoints) and returns a note per repair:
/// with `checkpoint/` present, a leftover `checkpoint.tmp/` (a checkpoint
/// being written) or `checkpoint.old/` is removed; without it, the newest
/// complete one of `checkpoint.tmp/` and `checkpoint.old/` becomes
/// `checkpoint/` and the other is removed.
pub fn recover(run_dir: &Path) -> Result<Vec<String>> {
    let (cur, tmp, old) = (dir(run_dir), tmp_dir(run_dir), old_dir(run_dir));
    let remove =
        |p: &Path| std::fs::remove_dir_all(p).map_err(io_err(format!("removing {}", p.display())));
    let mut notes = Vec::new();
    if cur.exists() {
        for (p, what) in [
            (&tmp, "an unfinished checkpoint"),
            (&old, "the previous checkpoint"),
        ] {
            if p.exists() {
                remove(p)?;
                notes.push(format!(
                    "removed {} ({what}, left by an interrupted run)",
                    p.display()
                ));
            }
        }
        return Ok(notes);
    }
    let complete = |p: &Path| -> Option<u64> {
        if !p.is_dir() {
            return None;
        }
        verify(p).ok()?;
        read_state(p).ok().map(|s| s.step)
    };
    let candidates = [(complete(&tmp), &tmp), (complete(&old), &old)];
    let best = candidates
        .iter()
        .filter_map(|(s, p)| s.map(|s| (s, *p)))
        .max_by_key(|(s, p)| (*s, *p == &tmp));
    if let Some((step, from)) = best {
        std::fs::rename(from, &cur).map_err(io_err(format!("renaming {}", from.display())))?;
        sync_dir(run_dir);
        notes.push(format!(
            "recovered the checkpoint of step {step} from {} (a checkpoint commit was interrupted)",
            from.display()
        ));
    }
    for p in [&tmp, &old] {
        if p.exists() {
            remove(p)?;
            notes.push(format!(
                "removed {} (an incomplete or older checkpoint left by an interrupted run)",
                p.display()
            ));
        }
    }
    Ok(notes)
}
