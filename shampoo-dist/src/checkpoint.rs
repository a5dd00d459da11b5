//! Distributed checkpoints: one safetensors file per rank (its own blocks'
//! state, in `shampoo-core`'s per-block format) plus a manifest.
//!
//! ```text
//! dir/manifest.json          written by rank 0 after every file is complete
//! dir/rank-00000.safetensors blocks of rank 0
//! dir/rank-00001.safetensors ...
//! ```
//!
//! With `num_trainers_per_group = G < W`, only the first group's `G` ranks
//! write (the other groups hold copies of the same blocks). Loading opens
//! every file the manifest lists and takes each owned block from whichever
//! file holds it, so a checkpoint written by `W` ranks loads on any other
//! number of ranks (re-sharding).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shampoo_core::backend::Backend;
use shampoo_core::checkpoint::{CheckpointFile, write_atomic};

use crate::optimizer::DistributedShampoo;
use crate::{Error, Result};

/// File name of the manifest inside a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";
/// Format tag of the manifest.
pub const MANIFEST_FORMAT: &str = "shampoo-dist/1";

/// The manifest of a distributed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// World size that wrote the checkpoint.
    pub world_size: usize,
    /// Ranks per group that wrote it (files are one per group rank).
    pub trainers_per_group: usize,
    /// Optimizer step.
    pub step: u64,
    /// Total number of blocks.
    pub blocks: usize,
    /// The rank files, relative to the directory.
    pub files: Vec<String>,
}

fn cerr(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The file of group rank `r`.
pub fn rank_file(r: usize) -> String {
    format!("rank-{r:05}.safetensors")
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| cerr(&path, e.to_string()))?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| cerr(&path, format!("malformed: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(cerr(
                &path,
                format!("format {:?}, expected {MANIFEST_FORMAT:?}", m.format),
            ));
        }
        Ok(m)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!("{MANIFEST}.tmp.{}", std::process::id()));
        let text = serde_json::to_string_pretty(self).expect("manifest json");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                cerr(&path, e.to_string())
            })
    }
}

impl<B: Backend> DistributedShampoo<B> {
    /// Collective: every rank writes its own blocks' state into `dir`
    /// (created if needed); rank 0 then writes the manifest. Returns once the
    /// checkpoint is complete on every rank.
    ///
    /// Checks what the last step left outstanding first
    /// ([`DistributedShampoo::flush`]). The files hold host tensors in the
    /// core's per-block format, whatever the backend: a checkpoint written
    /// by GPU ranks loads on CPU ranks and the reverse.
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        // Every rank takes part in every agreement below, errors or not.
        let flushed = self.flush();
        let comm = self.communicator().clone();
        let g = self.trainers_per_group();
        let rank = comm.rank();
        let mine: Result<()> = if rank < g {
            flushed.and_then(|()| {
                std::fs::create_dir_all(dir)
                    .map_err(|e| cerr(dir, format!("cannot create: {e}")))
                    .and_then(|_| {
                        let (tensors, meta) = self.local().state_tensors()?;
                        write_atomic(&dir.join(rank_file(rank)), &tensors, meta)?;
                        Ok(())
                    })
            })
        } else {
            flushed
        };
        agree(comm.as_ref(), mine, dir, "write its checkpoint file")?;
        let manifest: Result<()> = if rank == 0 {
            Manifest {
                format: MANIFEST_FORMAT.into(),
                world_size: comm.world_size(),
                trainers_per_group: g,
                step: self.local().step_count(),
                blocks: self.assignment().len(),
                files: (0..g).map(rank_file).collect(),
            }
            .write(dir)
        } else {
            Ok(())
        };
        agree(comm.as_ref(), manifest, dir, "write the manifest")
    }

    /// Collective: loads the state of this rank's blocks from a checkpoint
    /// written by [`DistributedShampoo::save`] with any world size and
    /// any backend (or from one file of `shampoo_core::Shampoo::save`,
    /// which holds every block). If any rank fails, every rank returns an
    /// error and no rank's state changes meaning (each rank's load is
    /// all-or-nothing).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let blocks = self.assignment().len();
        self.load_files(dir, || {
            if dir.is_file() {
                return Ok(vec![dir.to_path_buf()]);
            }
            let m = Manifest::read(dir)?;
            if m.blocks != blocks {
                return Err(cerr(
                    &dir.join(MANIFEST),
                    format!(
                        "written for {} blocks, this optimizer has {blocks}",
                        m.blocks
                    ),
                ));
            }
            Ok(m.files.iter().map(|f| dir.join(f)).collect())
        })
    }

    /// Collective: loads this rank's blocks from whichever of the
    /// `shampoo-core` checkpoint files `files()` lists holds them: the rank
    /// files of a distributed checkpoint ([`checkpoint_files`]) or the one
    /// file of a single process (`Shampoo::save`), so the number of ranks
    /// may change from any world size to any other, 1 included. Failures
    /// are collective as in [`DistributedShampoo::load`].
    /// `origin` names the checkpoint in errors.
    pub fn load_files(
        &mut self,
        origin: &Path,
        files: impl FnOnce() -> Result<Vec<PathBuf>>,
    ) -> Result<()> {
        let comm = self.communicator().clone();
        let mine = (|| -> Result<()> {
            let paths = files()?;
            let files = paths
                .iter()
                .map(|f| CheckpointFile::open(f).map_err(Error::from))
                .collect::<Result<Vec<_>>>()?;
            self.inner_mut().load_from(&files)?;
            Ok(())
        })();
        agree(comm.as_ref(), mine, origin, "load its blocks")
    }
}

/// The rank files of the distributed checkpoint in `dir`, from its
/// manifest.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(Manifest::read(dir)?
        .files
        .iter()
        .map(|f| dir.join(f))
        .collect())
}

/// Makes a per-rank outcome collective: every rank learns whether all
/// succeeded; a rank that failed returns its own error, the others an error
/// naming the failed ranks.
fn agree(comm: &dyn crate::Communicator, mine: Result<()>, dir: &Path, what: &str) -> Result<()> {
    let mut all = vec![0u8; comm.world_size()];
    comm.all_gather_bytes(&[u8::from(mine.is_err())], &mut all)?;
    mine?;
    let failed: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, f)| **f != 0)
        .map(|(r, _)| r.to_string())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(cerr(
            &PathBuf::from(dir),
            format!(
                "rank(s) {} could not {what} (see their errors)",
                failed.join(", ")
            ),
        ))
    }
}
