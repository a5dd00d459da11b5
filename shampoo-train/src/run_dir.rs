//! The run folder (`--out`): one run at a time, never replaced by accident.
//!
//! Rank 0 takes an exclusive lock on `OUT/.lock` (`flock`, released by the
//! kernel when the process ends, however it ends) for the whole run, so a
//! second `shampoo-train` into the same folder stops at once with the
//! holder's pid and host. A fresh run (no `--resume`) refuses a folder that
//! already holds a run unless `--overwrite` is given, which removes the
//! previous run's files (and only those). Then [`checkpoint::recover`]
//! repairs what an interrupted checkpoint commit left behind.

use crate::checkpoint;
use crate::comm::Communicator;
use crate::error::{Error, Result, io_err};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file, inside the run folder.
pub const LOCK: &str = ".lock";

/// Files and folders a run writes; any of them means the folder holds a run.
const RUN_FILES: [&str; 6] = [
    "metrics.jsonl",
    "run.json",
    "summary.json",
    "checkpoint",
    "checkpoint.tmp",
    "checkpoint.old",
];

/// The held lock of a run folder (released when dropped).
#[derive(Debug)]
pub struct RunLock {
    _file: Option<File>,
}

/// What the folder holds of a previous run (names, `weights.rank*.ot`
/// included).
fn previous_run(out: &Path) -> Result<Vec<String>> {
    let mut found: Vec<String> = RUN_FILES
        .iter()
        .filter(|f| out.join(f).exists())
        .map(|f| {
            if out.join(f).is_dir() {
                format!("{f}/")
            } else {
                f.to_string()
            }
        })
        .collect();
    if out.is_dir() {
        for entry in std::fs::read_dir(out).map_err(io_err(format!("reading {}", out.display())))? {
            let name = entry
                .map_err(io_err(format!("reading {}", out.display())))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.starts_with("weights.rank") && name.ends_with(".ot") {
                found.push(name);
            }
        }
    }
    Ok(found)
}

fn lock(out: &Path) -> Result<File> {
    let path = out.join(LOCK);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(Error::RunLocked {
                path: out.to_path_buf(),
                holder: if holder.is_empty() {
                    "another process".into()
                } else {
                    holder.to_string()
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(io_err(format!("locking {}", path.display()))(e));
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let me = format!("shampoo-train pid {} on host {host}\n", std::process::id());
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(me.as_bytes()))
        .map_err(io_err(format!("writing {}", path.display())))?;
    Ok(file)
}

/// Rank 0's part of [`prepare`].
fn prepare_lead(out: &Path, resume: bool, overwrite: bool) -> Result<File> {
    if resume && overwrite {
        return Err(Error::Invalid(
            "--resume continues the run in --out and --overwrite replaces it: give one of them"
                .into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(io_err(format!("creating {}", out.display())))?;
    let file = lock(out)?;
    let found = previous_run(out)?;
    if !resume && !found.is_empty() {
        if !overwrite {
            return Err(Error::RunExists {
                path: out.to_path_buf(),
                found: found.join(", "),
            });
        }
        for name in &found {
            let p = out.join(name.trim_end_matches('/'));
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(io_err(format!("removing {}", p.display())))?;
        }
        tracing::info!(
            "--overwrite: removed the previous run's {} from {}",
            found.join(", "),
            out.display()
        );
    }
    for note in checkpoint::recover(out)? {
        tracing::warn!("{note}");
    }
    if resume {
        let ckpt = checkpoint::dir(out);
        if ckpt.is_dir() {
            checkpoint::verify(&ckpt)?;
        }
    }
    Ok(file)
}

/// Collective: rank 0 locks the run folder, refuses or clears a previous
/// run, repairs an interrupted checkpoint commit and (with `resume`)
/// verifies the checkpoint's checksums; every rank learns whether that
/// worked. The lock lives as long as the returned guard.
pub fn prepare(
    out: &Path,
    resume: bool,
    overwrite: bool,
    comm: &dyn Communicator,
) -> Result<RunLock> {
    let mine = if comm.rank() == 0 {
        prepare_lead(out, resume, overwrite).map(Some)
    } else {
        Ok(None)
    };
    let mut status = [u8::from(mine.is_err())];
    comm.broadcast_bytes(&mut status, 0)?;
    if status[0] != 0 && comm.rank() != 0 {
        // Let rank 0's error, the cause, reach the launcher first.
        std::thread::sleep(std::time::Duration::from_millis(500));
        return Err(Error::Invalid(format!(
            "rank 0 could not prepare the run folder {} (see its error)",
            out.display()
        )));
    }
    Ok(RunLock { _file: mine? })
}

/// The run folder's lock file (for messages and tests).
pub fn lock_path(out: &Path) -> PathBuf {
    out.join(LOCK)
}
