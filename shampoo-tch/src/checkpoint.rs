//! Saving and loading the optimizer state of every group.
//!
//! A checkpoint is a directory: `manifest.json` lists the groups, their
//! segments and each segment's variables (names, shapes, dtype); each
//! segment's state is a `shampoo_core` checkpoint file next to it (one
//! process), or a `shampoo_dist` checkpoint directory (data-parallel: every
//! rank writes its own blocks). The directory is written under a temporary
//! name and renamed into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shampoo_core::DType;
use tch::Device;

use std::sync::Arc;

use shampoo_dist::Communicator;

use crate::optimizer::{Engine, Group, Segment, new_segment};
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
    /// Data-parallel, this is collective: every rank must call it with the
    /// same `path`, on a file system all ranks share; every rank writes its
    /// own blocks' state and rank 0 the manifest.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = sibling(path, ".tmp");
        let Some(comm) = &self.comm else {
            prepare_dir(&tmp)?;
            self.write_segments(&tmp, path)?;
            return replace_dir(&tmp, path);
        };
        let root = comm.rank() == 0;
        let prepared = if root { prepare_dir(&tmp) } else { Ok(()) };
        agree_root(comm, prepared, path, "prepare the temporary directory")?;
        // Every rank takes part in every collective below, errors or not, so
        // that no rank waits for one that gave up.
        let written = self.write_segments(&tmp, path);
        let what = "write the manifest and move the checkpoint into place";
        if root {
            let done = written.and_then(|()| replace_dir(&tmp, path));
            agree_root(comm, done, path, what)
        } else {
            let agreed = agree_root(comm, Ok(()), path, what);
            written.and(agreed)
        }
    }

    /// Writes every segment's state and (on rank 0) the manifest into `tmp`.
    fn write_segments(&self, tmp: &Path, path: &Path) -> Result<()> {
        let mut groups = Vec::new();
        for (&gid, group) in &self.groups {
            let mut segments = Vec::new();
            for (i, seg) in group.segments.iter().enumerate() {
                let state = match &seg.engine {
                    Engine::Local(o) => {
                        let state = format!("group{gid}-segment{i}.safetensors");
                        o.save(&tmp.join(&state))?;
                        state
                    }
                    Engine::Dist(o) => {
                        let state = format!("group{gid}-segment{i}");
                        o.save(&tmp.join(&state))?;
                        state
                    }
                    Engine::Replicated(o) => {
                        // Every rank holds the same state; rank 0 writes it.
                        let state = format!("group{gid}-segment{i}.safetensors");
                        if self.comm.as_ref().is_none_or(|c| c.rank() == 0) {
                            o.save(&tmp.join(&state))?;
                        }
                        state
                    }
                };
                segments.push(ManifestSegment {
                    state,
                    dtype: seg.dtype,
                    names: seg.names.clone(),
                    shapes: seg.shapes.clone(),
                    replicated: matches!(seg.engine, Engine::Replicated(_)),
                });
            }
            groups.push(ManifestGroup {
                group: gid,
                segments,
            });
        }
        if self.comm.as_ref().is_some_and(|c| c.rank() != 0) {
            return Ok(());
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            distributed: self.comm.is_some(),
            world_size: self.comm.as_ref().map_or(1, |c| c.world_size()),
            groups,
        };
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::checkpoint(path, format!("cannot encode the manifest: {e}")))?;
        let mpath = tmp.join(MANIFEST);
        std::fs::write(&mpath, text).map_err(|e| Error::io(&mpath, e))
    }

    /// Loads a state saved by [`Shampoo::save`]. Every variable of the
    /// checkpoint must be in the `VarStore`, in the same group, with the
    /// same shape and dtype, and each group's config must match (all but
    /// the learning rate, which stays this optimizer's). On any error the
    /// optimizer is left as it was. Variables of the `VarStore` that the
    /// checkpoint does not know start with fresh state at the next step.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mpath = path.join(MANIFEST);
        let text = std::fs::read_to_string(&mpath).map_err(|e| Error::io(&mpath, e))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(path, format!("malformed {MANIFEST}: {e}")))?;
        if manifest.format != FORMAT {
            return Err(Error::checkpoint(
                path,
                format!("format {:?}, expected {FORMAT:?}", manifest.format),
            ));
        }
        // Any world size loads any other's state (1 included): every
        // segment's blocks are read by id from the files that hold them.
        let current = vars::read_groups(&self.variables)?;
        let mut groups = BTreeMap::new();
        for mg in &manifest.groups {
            let mut segments = Vec::new();
            for ms in &mg.segments {
                let device = check_segment(path, mg.group, ms, &current)?;
                let mut seg = new_segment(
                    self.config(mg.group),
                    ms.names.clone(),
                    ms.shapes.clone(),
                    (ms.dtype, device),
                    &self.engine_opts,
                    self.comm.as_ref(),
                    &self.dist_opts,
                )?;
                load_segment(&mut seg, &path.join(&ms.state))?;
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

/// Loads a segment's state from `state`: a `shampoo-core` file (one
/// process, or replicated ranks) or a `shampoo-dist` directory (sharded
/// ranks), whatever this segment's engine is.
fn load_segment(seg: &mut Segment, state: &Path) -> Result<()> {
    let files = || -> shampoo_dist::Result<Vec<PathBuf>> {
        if state.is_dir() {
            shampoo_dist::checkpoint_files(state)
        } else {
            Ok(vec![state.to_path_buf()])
        }
    };
    match &mut seg.engine {
        Engine::Local(o) | Engine::Replicated(o) => o.load_files(&files()?)?,
        Engine::Dist(o) => o.load_files(state, files)?,
    }
    Ok(())
}

/// Checks that the segment's variables are in the `VarStore`, in `group`,
/// with the recorded shapes and dtype; returns the device they are on now
/// (the state follows the variables: a checkpoint does not record devices).
fn check_segment(
    path: &Path,
    group: usize,
    ms: &ManifestSegment,
    current: &BTreeMap<usize, Vec<vars::Var>>,
) -> Result<Device> {
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
            Some((_, v)) => device = v.device,
        }
    }
    Ok(device)
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
