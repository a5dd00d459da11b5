//! Checkpoints: the whole optimizer state in safetensors files.
//!
//! Tensors are stored per block (global block ids), in the canonical
//! row-major layout, so a checkpoint written by one backend loads on another
//! and a distributed run can re-shard them:
//!
//! | tensor | contents |
//! | --- | --- |
//! | `block/<id>/factor/<dim>` | statistics `L` (factor dtype, symmetric) |
//! | `block/<id>/root/<dim>` | inverse root `X`, or the eigenbasis (rows are eigenvectors) |
//! | `block/<id>/eigenvectors/<dim>` | eigendecomposed Shampoo's eigenvectors (rows) |
//! | `block/<id>/eigenvalues/<dim>` | eigendecomposed Shampoo's eigenvalues |
//! | `block/<id>/failures` | consecutive root-inverse failures per factor (u32) |
//! | `block/<id>/graft` | grafting accumulator |
//! | `block/<id>/filtered` | filtered gradient `M1` |
//! | `block/<id>/momentum` | momentum buffer |
//! | `block/<id>/corrected` | eigenvalue-corrected second moments |
//! | `block/<id>/z` | iterate averaging's sequence `Z` |
//!
//! Metadata: `format`, `config` (JSON), `step`, `dtype`, `shapes` (JSON),
//! `blocks` (JSON list of the block ids in the file), `peak_lr` (the lr the
//! optimizer was built with), and with iterate averaging `lr_sum` and
//! `mode` (`train` or `eval`). Files are written to a
//! temporary name and renamed, so a crash never leaves a half-written
//! checkpoint under the real name.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::algorithm::Shampoo;
use crate::algorithm::state::GroupState;
use crate::backend::Backend;
use crate::matrix::mirror_lower;
use crate::{DType, Error, HostView, HostViewMut, Result};

/// Format tag written into every checkpoint.
pub const FORMAT: &str = "shampoo-rs/1";

fn err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A host tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    /// float32 data.
    F32(Vec<f32>, Vec<usize>),
    /// float64 data.
    F64(Vec<f64>, Vec<usize>),
    /// u32 data.
    U32(Vec<u32>, Vec<usize>),
}

impl HostTensor {
    fn dtype(&self) -> Dtype {
        match self {
            HostTensor::F32(..) => Dtype::F32,
            HostTensor::F64(..) => Dtype::F64,
            HostTensor::U32(..) => Dtype::U32,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32(_, s) | HostTensor::F64(_, s) | HostTensor::U32(_, s) => s,
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            HostTensor::F32(d, _) => bytemuck::cast_slice(d),
            HostTensor::F64(d, _) => bytemuck::cast_slice(d),
            HostTensor::U32(d, _) => bytemuck::cast_slice(d),
        }
    }
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> Dtype {
        HostTensor::dtype(self)
    }
    fn shape(&self) -> &[usize] {
        HostTensor::shape(self)
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.bytes())
    }
    fn data_len(&self) -> usize {
        self.bytes().len()
    }
}

/// Writes tensors and metadata to `path` atomically (temporary file, fsync,
/// rename).
pub fn write_atomic(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes =
        safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
            .map_err(|e| err(path, format!("cannot serialise: {e}")))?;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// A tensor's dtype, shape and little-endian bytes.
type RawTensor<'a> = (Dtype, Vec<usize>, &'a [u8]);

/// A checkpoint file read into memory.
pub struct CheckpointFile {
    path: PathBuf,
    bytes: Vec<u8>,
    metadata: HashMap<String, String>,
    blocks: Vec<usize>,
}

impl CheckpointFile {
    /// Reads and validates a checkpoint file's header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| {
            err(
                &path,
                format!("not a valid safetensors file ({e}); truncated?"),
            )
        })?;
        // Also validate that every tensor's data is inside the file.
        SafeTensors::deserialize(&bytes)
            .map_err(|e| err(&path, format!("corrupt or truncated: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        match metadata.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => return Err(err(&path, format!("format {f:?}, expected {FORMAT:?}"))),
            None => return Err(err(&path, "not a shampoo checkpoint (no format metadata)")),
        }
        let blocks: Vec<usize> = serde_json::from_str(
            metadata
                .get("blocks")
                .ok_or_else(|| err(&path, "metadata has no block list"))?,
        )
        .map_err(|e| err(&path, format!("block list: {e}")))?;
        Ok(CheckpointFile {
            path,
            bytes,
            metadata,
            blocks,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// A metadata value.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| err(&self.path, format!("metadata has no {key:?}")))
    }
    /// Global ids of the blocks stored in the file.
    pub fn blocks(&self) -> &[usize] {
        &self.blocks
    }

    fn tensor(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        let st =
            SafeTensors::deserialize(&self.bytes).map_err(|e| err(&self.path, e.to_string()))?;
        match st.tensor(name) {
            Ok(t) => {
                let (dt, shape) = (t.dtype(), t.shape().to_vec());
                // Borrow from our own bytes (SafeTensors borrows them too).
                let data = t.data();
                Ok(Some((dt, shape, data)))
            }
            Err(_) => Ok(None),
        }
    }
}

/// The state buffers of one block, by checkpoint name.
fn block_buffers<B: Backend>(g: &GroupState<B>) -> Vec<(&'static str, &B::Buffer)> {
    let mut v = Vec::new();
    if let Some(b) = &g.graft {
        v.push(("graft", b));
    }
    if let Some((m1, _)) = &g.filtered {
        v.push(("filtered", m1));
    }
    if let Some(b) = &g.momentum {
        v.push(("momentum", b));
    }
    if let Some(b) = &g.corrected {
        v.push(("corrected", b));
    }
    if let Some(b) = &g.z {
        v.push(("z", b));
    }
    v
}

fn block_buffers_mut<B: Backend>(g: &mut GroupState<B>) -> Vec<(&'static str, &mut B::Buffer)> {
    let mut v = Vec::new();
    if let Some(b) = &mut g.graft {
        v.push(("graft", b));
    }
    if let Some((m1, _)) = &mut g.filtered {
        v.push(("filtered", m1));
    }
    if let Some(b) = &mut g.momentum {
        v.push(("momentum", b));
    }
    if let Some(b) = &mut g.corrected {
        v.push(("corrected", b));
    }
    if let Some(b) = &mut g.z {
        v.push(("z", b));
    }
    v
}

fn download<B: Backend>(b: &B, buf: &B::Buffer, dtype: DType) -> Result<HostTensor> {
    let v = b.view(buf);
    let n = crate::backend::ViewOps::len(&v);
    Ok(match dtype {
        DType::F32 => {
            let mut h = vec![0f32; n];
            b.download(v, HostViewMut::F32(&mut h))?;
            HostTensor::F32(h, vec![n])
        }
        DType::F64 => {
            let mut h = vec![0f64; n];
            b.download(v, HostViewMut::F64(&mut h))?;
            HostTensor::F64(h, vec![n])
        }
    })
}

/// Slices `per` elements at block `slot` out of a group download.
fn slice(t: &HostTensor, slot: usize, per: usize, shape: Vec<usize>) -> HostTensor {
    let r = slot * per..(slot + 1) * per;
    match t {
        HostTensor::F32(d, _) => HostTensor::F32(d[r].to_vec(), shape),
        HostTensor::F64(d, _) => HostTensor::F64(d[r].to_vec(), shape),
        HostTensor::U32(d, _) => HostTensor::U32(d[r].to_vec(), shape),
    }
}

fn symmetrize(t: &mut HostTensor, n: usize) {
    match t {
        HostTensor::F32(d, _) => mirror_lower(d, n),
        HostTensor::F64(d, _) => mirror_lower(d, n),
        HostTensor::U32(..) => {}
    }
}

impl<B: Backend> Shampoo<B> {
    /// Bytes of persistent optimizer state of the owned blocks, as allocated
    /// on the backend: exactly what [`Shampoo::state_tensors`] holds
    /// (factors, roots, failure counters, grafting accumulators, filtered
    /// gradients, momentum, corrected second moments), without scratch.
    pub fn state_bytes(&self) -> usize {
        let bytes = |buf: &B::Buffer| {
            let v = self.backend.view(buf);
            crate::backend::ViewOps::len(&v) * crate::backend::ViewOps::dtype(&v).size()
        };
        self.groups
            .iter()
            .map(|g| {
                let per_block: usize = block_buffers(g).into_iter().map(|(_, b)| bytes(b)).sum();
                let factors: usize = g
                    .factors
                    .iter()
                    .map(|f| {
                        let eigen = f.eigen.as_ref().map_or(0, |(v, l)| bytes(v) + bytes(l));
                        bytes(&f.stats) + bytes(&f.root) + eigen + 4 * f.failures.len()
                    })
                    .sum();
                per_block + factors
            })
            .sum()
    }

    /// The optimizer state of the owned blocks as named host tensors, plus
    /// the metadata that identifies it.
    pub fn state_tensors(&self) -> Result<(BTreeMap<String, HostTensor>, HashMap<String, String>)> {
        self.backend.synchronize()?;
        let b = &self.backend;
        let fdtype = self.config.factor_dtype_for(self.dtype);
        let mut out = BTreeMap::new();
        let mut owned: Vec<usize> = Vec::new();
        for (g, spec) in self.groups.iter().zip(&self.layout.groups) {
            owned.extend(&spec.blocks);
            let group_dl = block_buffers(g)
                .into_iter()
                .map(|(name, buf)| Ok((name, download(b, buf, self.dtype)?)))
                .collect::<Result<Vec<_>>>()?;
            let factor_dl = g
                .factors
                .iter()
                .map(|f| {
                    let eigen = match &f.eigen {
                        Some((v, l)) => Some((download(b, v, fdtype)?, download(b, l, fdtype)?)),
                        None => None,
                    };
                    Ok((
                        download(b, &f.stats, fdtype)?,
                        download(b, &f.root, self.dtype)?,
                        eigen,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            for (slot, &id) in spec.blocks.iter().enumerate() {
                for (name, t) in &group_dl {
                    out.insert(
                        format!("block/{id}/{name}"),
                        slice(t, slot, spec.numel, spec.dims.clone()),
                    );
                }
                for (f, (stats, root, eigen)) in g.factors.iter().zip(&factor_dl) {
                    let n = f.spec.size;
                    let mut s = slice(stats, slot, n * n, vec![n, n]);
                    symmetrize(&mut s, n);
                    out.insert(format!("block/{id}/factor/{}", f.spec.dim), s);
                    out.insert(
                        format!("block/{id}/root/{}", f.spec.dim),
                        slice(root, slot, n * n, vec![n, n]),
                    );
                    if let Some((v, l)) = eigen {
                        out.insert(
                            format!("block/{id}/eigenvectors/{}", f.spec.dim),
                            slice(v, slot, n * n, vec![n, n]),
                        );
                        out.insert(
                            format!("block/{id}/eigenvalues/{}", f.spec.dim),
                            slice(l, slot, n, vec![n]),
                        );
                    }
                }
                if !g.factors.is_empty() {
                    let fails: Vec<u32> = g.factors.iter().map(|f| f.failures[slot]).collect();
                    let k = fails.len();
                    out.insert(
                        format!("block/{id}/failures"),
                        HostTensor::U32(fails, vec![k]),
                    );
                }
            }
        }
        owned.sort_unstable();
        let shapes: Vec<&Vec<usize>> = self.layout.params.iter().map(|p| &p.shape).collect();
        let mut meta = HashMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert(
            "config".into(),
            serde_json::to_string(&self.config).expect("config json"),
        );
        meta.insert("step".into(), self.step.to_string());
        meta.insert("dtype".into(), self.dtype.name().into());
        meta.insert(
            "shapes".into(),
            serde_json::to_string(&shapes).expect("shapes json"),
        );
        meta.insert(
            "blocks".into(),
            serde_json::to_string(&owned).expect("blocks json"),
        );
        meta.insert("backend".into(), self.backend.name());
        meta.insert("peak_lr".into(), format!("{:?}", self.peak_lr));
        if self.config.iterate_averaging.is_some() {
            meta.insert("lr_sum".into(), format!("{:?}", self.averaging.lr_sum));
            let mode = if self.averaging.train_mode {
                "train"
            } else {
                "eval"
            };
            meta.insert("mode".into(), mode.into());
        }
        Ok((out, meta))
    }

    /// Saves the state of the owned blocks to `path` (atomically).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let (tensors, meta) = self.state_tensors()?;
        write_atomic(path.as_ref(), &tensors, meta)
    }

    /// Loads the state saved by [`Shampoo::save`] from `path`.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let file = CheckpointFile::open(path)?;
        self.load_from(&[file])
    }

    /// Loads the owned blocks' state from any of `files` (several files:
    /// a distributed checkpoint, possibly written by another world size).
    /// The files must agree on step, shapes, dtype and config (all but the
    /// learning rate, which stays the caller's). Nothing is changed unless
    /// every owned block is found and valid.
    pub fn load_from(&mut self, files: &[CheckpointFile]) -> Result<()> {
        let Some(first) = files.first() else {
            return Err(Error::Checkpoint {
                path: PathBuf::new(),
                reason: "no checkpoint files given".into(),
            });
        };
        let step: u64 = first
            .meta("step")?
            .parse()
            .map_err(|e| err(first.path(), format!("step: {e}")))?;
        for f in files {
            self.check_compatible(f, step)?;
        }
        let mut where_: HashMap<usize, &CheckpointFile> = HashMap::new();
        for f in files {
            for &b in f.blocks() {
                where_.insert(b, f);
            }
        }
        // Read everything into host tensors first; upload only when all is well.
        let fdtype = self.config.factor_dtype_for(self.dtype);
        let mut uploads: Vec<(usize, UploadTarget, HostTensor)> = Vec::new();
        for (gi, (g, spec)) in self.groups.iter().zip(&self.layout.groups).enumerate() {
            let names: Vec<&str> = block_buffers(g).into_iter().map(|(n, _)| n).collect();
            for (slot, &id) in spec.blocks.iter().enumerate() {
                let file = where_.get(&id).ok_or_else(|| Error::Checkpoint {
                    path: first.path().to_path_buf(),
                    reason: format!(
                        "block {id} is in none of the {} checkpoint file(s)",
                        files.len()
                    ),
                })?;
                for (k, name) in names.iter().enumerate() {
                    let t =
                        read_tensor(file, &format!("block/{id}/{name}"), self.dtype, &spec.dims)?;
                    uploads.push((gi, UploadTarget::State(k, slot), t));
                }
                for (fi, f) in g.factors.iter().enumerate() {
                    let n = f.spec.size;
                    let stats = read_tensor(
                        file,
                        &format!("block/{id}/factor/{}", f.spec.dim),
                        fdtype,
                        &[n, n],
                    )?;
                    let root = read_tensor(
                        file,
                        &format!("block/{id}/root/{}", f.spec.dim),
                        self.dtype,
                        &[n, n],
                    )?;
                    uploads.push((gi, UploadTarget::Stats(fi, slot), stats));
                    uploads.push((gi, UploadTarget::Root(fi, slot), root));
                    if f.eigen.is_some() {
                        let v = read_tensor(
                            file,
                            &format!("block/{id}/eigenvectors/{}", f.spec.dim),
                            fdtype,
                            &[n, n],
                        )?;
                        let l = read_tensor(
                            file,
                            &format!("block/{id}/eigenvalues/{}", f.spec.dim),
                            fdtype,
                            &[n],
                        )?;
                        uploads.push((gi, UploadTarget::Eigenvectors(fi, slot), v));
                        uploads.push((gi, UploadTarget::Eigenvalues(fi, slot), l));
                    }
                }
                if !g.factors.is_empty() {
                    let name = format!("block/{id}/failures");
                    match file.tensor(&name)? {
                        Some((Dtype::U32, shape, data)) if shape == [g.factors.len()] => {
                            let v: Vec<u32> = data
                                .chunks_exact(4)
                                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                                .collect();
                            uploads.push((
                                gi,
                                UploadTarget::Failures(slot),
                                HostTensor::U32(v, shape),
                            ));
                        }
                        _ => return Err(err(file.path(), format!("missing or malformed {name}"))),
                    }
                }
            }
        }
        let peak_lr = match first.metadata.get("peak_lr") {
            Some(v) => Some(
                v.parse::<f64>()
                    .map_err(|e| err(first.path(), format!("peak_lr: {e}")))?,
            ),
            None => None,
        };
        let mut averaging = self.averaging;
        if self.config.iterate_averaging.is_some() {
            averaging.lr_sum = first
                .meta("lr_sum")?
                .parse::<f32>()
                .map_err(|e| err(first.path(), format!("lr_sum: {e}")))?;
            averaging.train_mode = match first.meta("mode")? {
                "train" => true,
                "eval" => false,
                other => {
                    return Err(err(
                        first.path(),
                        format!("mode {other:?}, expected \"train\" or \"eval\""),
                    ));
                }
            };
        }
        for (gi, target, t) in uploads {
            let b = &self.backend;
            let g = &mut self.groups[gi];
            let spec = &self.layout.groups[gi];
            match target {
                UploadTarget::State(k, slot) => {
                    let mut bufs = block_buffers_mut(g);
                    let buf = &mut bufs[k].1;
                    upload_slot(b, buf, slot, spec.numel, &t)?;
                }
                UploadTarget::Stats(fi, slot) => {
                    let n = g.factors[fi].spec.size;
                    upload_slot(b, &mut g.factors[fi].stats, slot, n * n, &t)?;
                }
                UploadTarget::Root(fi, slot) => {
                    let n = g.factors[fi].spec.size;
                    upload_slot(b, &mut g.factors[fi].root, slot, n * n, &t)?;
                }
                UploadTarget::Eigenvectors(fi, slot) => {
                    let f = &mut g.factors[fi];
                    let n = f.spec.size;
                    let (v, _) = f.eigen.as_mut().expect("eigendecomposed state");
                    upload_slot(b, v, slot, n * n, &t)?;
                }
                UploadTarget::Eigenvalues(fi, slot) => {
                    let f = &mut g.factors[fi];
                    let n = f.spec.size;
                    let (_, l) = f.eigen.as_mut().expect("eigendecomposed state");
                    upload_slot(b, l, slot, n, &t)?;
                }
                UploadTarget::Failures(slot) => {
                    if let HostTensor::U32(v, _) = &t {
                        for (f, &c) in g.factors.iter_mut().zip(v) {
                            f.failures[slot] = c;
                        }
                    }
                }
            }
        }
        self.step = step;
        if let Some(p) = peak_lr {
            self.peak_lr = p;
        }
        self.averaging = averaging;
        Ok(())
    }

    fn check_compatible(&self, f: &CheckpointFile, step: u64) -> Result<()> {
        let s: u64 = f
            .meta("step")?
            .parse()
            .map_err(|e| err(f.path(), format!("step: {e}")))?;
        if s != step {
            return Err(err(
                f.path(),
                format!("step {s} differs from the other files' {step}"),
            ));
        }
        if f.meta("dtype")? != self.dtype.name() {
            return Err(err(
                f.path(),
                format!(
                    "saved for {} parameters, this optimizer has {}",
                    f.meta("dtype")?,
                    self.dtype
                ),
            ));
        }
        let shapes: Vec<Vec<usize>> = serde_json::from_str(f.meta("shapes")?)
            .map_err(|e| err(f.path(), format!("shapes: {e}")))?;
        let ours: Vec<Vec<usize>> = self.layout.params.iter().map(|p| p.shape.clone()).collect();
        if shapes != ours {
            let first_diff = shapes
                .iter()
                .zip(&ours)
                .position(|(a, b)| a != b)
                .map(|i| {
                    format!(
                        "parameter {i} is {:?} there and {:?} here",
                        shapes[i], ours[i]
                    )
                })
                .unwrap_or_else(|| {
                    format!("{} parameters there, {} here", shapes.len(), ours.len())
                });
            return Err(err(
                f.path(),
                format!("parameter shapes differ: {first_diff}"),
            ));
        }
        // Compared as this version reads them (absent keys take defaults).
        let theirs: crate::ShampooConfig = serde_json::from_str(f.meta("config")?)
            .map_err(|e| err(f.path(), format!("config: {e}")))?;
        let theirs = serde_json::to_value(&theirs).expect("config json");
        let mine = serde_json::to_value(&self.config).expect("config json");
        if let (Some(t), Some(m)) = (theirs.as_object(), mine.as_object()) {
            let mut keys: Vec<&String> = t.keys().chain(m.keys()).collect();
            keys.sort();
            keys.dedup();
            let differ: Vec<&str> = keys
                .into_iter()
                .filter(|k| !matches!(k.as_str(), "lr" | "lr_schedule") && t.get(*k) != m.get(*k))
                .map(String::as_str)
                .collect();
            if !differ.is_empty() {
                return Err(err(
                    f.path(),
                    format!("saved with another config: {} differ", differ.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

enum UploadTarget {
    State(usize, usize),
    Stats(usize, usize),
    Root(usize, usize),
    Eigenvectors(usize, usize),
    Eigenvalues(usize, usize),
    Failures(usize),
}

fn read_tensor(
    file: &CheckpointFile,
    name: &str,
    dtype: DType,
    shape: &[usize],
) -> Result<HostTensor> {
    let Some((dt, s, data)) = file.tensor(name)? else {
        return Err(err(file.path(), format!("missing tensor {name}")));
    };
    if s != shape {
        return Err(err(
            file.path(),
            format!("tensor {name} has shape {s:?}, expected {shape:?}"),
        ));
    }
    match (dt, dtype) {
        (Dtype::F32, DType::F32) => Ok(HostTensor::F32(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            s,
        )),
        (Dtype::F64, DType::F64) => Ok(HostTensor::F64(
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            s,
        )),
        (dt, want) => Err(err(
            file.path(),
            format!("tensor {name} is {dt:?}, expected {want}"),
        )),
    }
}

fn upload_slot<B: Backend>(
    b: &B,
    buf: &mut B::Buffer,
    slot: usize,
    per: usize,
    t: &HostTensor,
) -> Result<()> {
    use crate::backend::ViewMutOps;
    let v = b.view_mut(buf);
    let (_, rest) = v.split_at(slot * per);
    let (mine, _) = rest.split_at(per);
    match t {
        HostTensor::F32(d, _) => b.upload(mine, HostView::F32(d)),
        HostTensor::F64(d, _) => b.upload(mine, HostView::F64(d)),
        HostTensor::U32(..) => Ok(()),
    }
}
