//! Saving and loading the optimizer state of every group.
//!
//! A checkpoint is a directory: `manifest.json` lists the groups, their
//! segments and each segment's variables (names, shapes, dtype); each
//! segment's state is a `shampoo_dist` checkpoint directory next to it
//! (every rank writes its own blocks; one process is a world of one). The
//! directory is written under a temporary name and renamed into place.
//! Earlier checkpoints whose segments are single `shampoo_core` files load
//! too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shampoo_core::DType;
use tch::Device;

use std::sync::Arc;

use shampoo_dist::Communicator;

use crate::optimizer::{Group, new_segment};
use crate::{Error, Result, Shampoo, vars};

const FORMAT: &str = "shampoo-tch/1";
const MANIFEST: &str = "manifest.json";

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    distributed: bool,
    world_size: usize,
    groups: Vec<ManifestGroup>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestGroup {
    group: usize,
    segments: Vec<ManifestSegment>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestSegment {
    state: String,
    dtype: DType,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    /// Data-parallel without sharding: one state file, written by rank 0,
    /// that every rank loads.
    #[serde(default)]
    replicated: bool,
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn remove_any(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

impl Shampoo {
    /// Saves the optimizer state of every group into the directory `path`
    /// (created, or replaced as a whole). The model's weights are not part
    /// of it: save them with `VarStore::save`.
    ///
    /// Checks what the last step left outstanding first ([`Shampoo::flush`]).
    /// Data-parallel, this is collective: every rank must call it with the
    /// same `path`, on a file system all ranks share; every rank writes its
    /// own blocks' state and rank 0 the manifest.
    pub fn save(&mut self, path: &Path) -> Result<()> {
        let tmp = sibling(path, ".tmp");
        let Some(comm) = self.communicator().cloned() else {
            self.flush()?;
            prepare_dir(&tmp)?;
            self.write_segments(&tmp, path, 0, 1)?;
            return replace_dir(&tmp, path);
        };
        let root = comm.rank() == 0;
        let prepared = if root { prepare_dir(&tmp) } else { Ok(()) };
        agree_root(&comm, prepared, path, "prepare the temporary directory")?;
        // Every rank takes part in every collective below, errors or not, so
        // that no rank waits for one that gave up.
        let written = self.write_segments(&tmp, path, comm.rank(), comm.world_size());
        let what = "write the manifest and move the checkpoint into place";
        if root {
            let done = written.and_then(|()| replace_dir(&tmp, path));
            agree_root(&comm, done, path, what)
        } else {
            let agreed = agree_root(&comm, Ok(()), path, what);
            written.and(agreed)
        }
    }

    /// Writes every segment's state (a `shampoo_dist` checkpoint directory
    /// each) and, on rank 0, the manifest into `tmp`.
    fn write_segments(&mut self, tmp: &Path, path: &Path, rank: usize, world: usize) -> Result<()> {
        let mut groups = Vec::new();
        for (&gid, group) in &mut self.groups {
            let mut segments = Vec::new();
            for (i, seg) in group.segments.iter_mut().enumerate() {
                let state = format!("group{gid}-segment{i}");
                let names = seg.names.clone();
                seg.engine.save(&tmp.join(&state)).map_err(|e| match e {
                    Error::Dist(d) => crate::dist::name_presence(d, &names),
                    e => e,
                })?;
                segments.push(ManifestSegment {
                    state,
                    dtype: seg.dtype,
                    names: seg.names.clone(),
                    shapes: seg.shapes.clone(),
                    replicated: seg.engine.replicated(),
                });
            }
            groups.push(ManifestGroup {
                group: gid,
                segments,
            });
        }
        if rank != 0 {
            return Ok(());
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            distributed: world > 1,
            world_size: world,
            groups,
        };
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::checkpoint(path, format!("cannot encode the manifest: {e}")))?;
        let mpath = tmp.join(MANIFEST);
        std::fs::write(&mpath, text).map_err(|e| Error::io(&mpath, e))
    }

    /// Loads a state saved by [`Shampoo::save`], by any number of ranks,
    /// sharded or replicated, on any device (the state follows the
    /// variables: a GPU checkpoint loads on the CPU and back). Every
    /// variable of the checkpoint must be in the `VarStore`, in the same
    /// group, with the same shape and dtype, and each group's config must
    /// match (all but the learning rate, which stays this optimizer's). On
    /// any error the optimizer is left as it was. Variables of the
    /// `VarStore` that the checkpoint does not know start with fresh state
    /// at the next step.
    ///
    /// Data-parallel, this is collective.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mpath = path.join(MANIFEST);
        let manifest: Result<Manifest> = std::fs::read_to_string(&mpath)
            .map_err(|e| Error::io(&mpath, e))
            .and_then(|text| {
                serde_json::from_str(&text)
                    .map_err(|e| Error::checkpoint(path, format!("malformed {MANIFEST}: {e}")))
            })
            .and_then(|m: Manifest| {
                if m.format == FORMAT {
                    Ok(m)
                } else {
                    Err(Error::checkpoint(
                        path,
                        format!("format {:?}, expected {FORMAT:?}", m.format),
                    ))
                }
            });
        // Every rank reads the manifest; any rank's failure is every rank's,
        // before the collectives of building and loading segments.
        let manifest = match self.communicator().cloned() {
            Some(comm) => agree_all(&comm, manifest, path, "read the manifest")?,
            None => manifest?,
        };
        let current = vars::read_groups(&self.variables)?;
        let mut groups = BTreeMap::new();
        for mg in &manifest.groups {
            let mut segments = Vec::new();
            for ms in &mg.segments {
                let (device, strides) = check_segment(path, mg.group, ms, &current)?;
                let mut seg = new_segment(
                    self.config(mg.group),
                    ms.names.clone(),
                    (ms.shapes.clone(), strides),
                    (ms.dtype, device),
                    &self.engine_opts,
                    self.collectives.as_ref(),
                    &self.dist_opts,
                )?;
                seg.engine.load(&path.join(&ms.state))?;
                segments.push(seg);
            }
            groups.insert(
                mg.group,
                Group {
                    config: self.config(mg.group).clone(),
                    segments,
                },
            );
        }
        self.groups = groups;
        Ok(())
    }
}

/// Checks that the segment's variables are in the `VarStore`, in `group`,
/// with the recorded shapes and dtype; returns the device they are on now
/// and their strides (the state follows the variables: a checkpoint holds
/// blocks in logical order, and records neither devices nor layouts).
fn check_segment(
    path: &Path,
    group: usize,
    ms: &ManifestSegment,
    current: &BTreeMap<usize, Vec<vars::Var>>,
) -> Result<(Device, Vec<Vec<usize>>)> {
    if ms.names.is_empty() || ms.names.len() != ms.shapes.len() {
        return Err(Error::checkpoint(
            path,
            format!(
                "segment {:?} lists {} names and {} shapes",
                ms.state,
                ms.names.len(),
                ms.shapes.len()
            ),
        ));
    }
    let mut device = Device::Cpu;
    let mut strides = Vec::with_capacity(ms.names.len());
    for (name, shape) in ms.names.iter().zip(&ms.shapes) {
        let found = current
            .iter()
            .find_map(|(g, vs)| vs.iter().find(|v| &v.name == name).map(|v| (*g, v)));
        match found {
            None => {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "variable {name:?} (group {group}) is not a trainable variable of the VarStore"
                    ),
                ));
            }
            Some((g, _)) if g != group => {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "variable {name:?} is in group {g} of the VarStore but in group {group} of the checkpoint"
                    ),
                ));
            }
            Some((_, v)) if v.shape != *shape || v.dtype != ms.dtype => {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "variable {name:?} is {} {:?} in the VarStore but {} {:?} in the checkpoint",
                        v.dtype, v.shape, ms.dtype, shape
                    ),
                ));
            }
            Some((_, v)) => {
                device = v.device;
                strides.push(v.strides.clone());
            }
        }
    }
    Ok((device, strides))
}

/// Removes a stale `tmp` and creates it empty.
fn prepare_dir(tmp: &Path) -> Result<()> {
    remove_any(tmp)?;
    std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))
}

/// Moves `tmp` to `path`, replacing what was there.
fn replace_dir(tmp: &Path, path: &Path) -> Result<()> {
    let old = sibling(path, ".old");
    if path.exists() {
        remove_any(&old)?;
        std::fs::rename(path, &old).map_err(|e| Error::io(path, e))?;
    }
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    remove_any(&old)
}

/// Makes every rank's outcome of `what` everyone's: a rank that failed
/// returns its own error, the others one naming the failed ranks.
fn agree_all<T>(
    comm: &Arc<dyn Communicator>,
    result: Result<T>,
    path: &Path,
    what: &str,
) -> Result<T> {
    let mut all = vec![0u8; comm.world_size()];
    comm.all_gather_bytes(&[u8::from(result.is_err())], &mut all)?;
    let value = result?;
    let failed: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, f)| **f != 0)
        .map(|(r, _)| r.to_string())
        .collect();
    if failed.is_empty() {
        Ok(value)
    } else {
        Err(Error::checkpoint(
            path,
            format!("rank(s) {} could not {what}", failed.join(", ")),
        ))
    }
}

/// Shares rank 0's outcome of `what` with every rank: rank 0 returns its
/// own result, the others an error when rank 0 failed.
fn agree_root(
    comm: &Arc<dyn Communicator>,
    result: Result<()>,
    path: &Path,
    what: &str,
) -> Result<()> {
    let mut status = [u8::from(result.is_err())];
    comm.broadcast_bytes(&mut status, 0)?;
    if comm.rank() == 0 {
        result
    } else if status[0] != 0 {
        Err(Error::checkpoint(path, format!("rank 0 failed to {what}")))
    } else {
        Ok(())
    }
}
