//! Reference trajectories of the published implementation: reading a case
//! and replaying it.
//!
//! A case (`<case>.safetensors`) holds float64 tensors `init/<p>`,
//! `grad/<p>/<k>` and `param/<p>/<k>` (parameter `p` before step 1, its
//! gradient at step `k`, and the reference's parameter after step `k`), for
//! iterate-averaging cases `eval/<p>/<k>` (what the reference's `eval()`
//! puts in `p` after step `k`), with string metadata `config` (JSON; its
//! `lr_schedule` gives each step's lr), `params` (JSON list of names),
//! `steps`. Replaying runs this crate's optimizer on the same gradients (the
//! lr of step `k` set before it, as a scheduler would) and measures, per
//! tensor and step, `max |ours - reference| / max |reference|`; with
//! `eval/` tensors, after every step [`Shampoo::eval`] is compared too and
//! [`Shampoo::train`] goes back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::backend::Backend;
use crate::{DType, Error, HostView, HostViewMut, Result, Shampoo, ShampooConfig};

/// A reference case in memory.
#[derive(Debug, Clone)]
pub struct ReferenceCase {
    /// The file it came from.
    pub path: PathBuf,
    /// Case name (file stem).
    pub name: String,
    /// The optimizer configuration.
    pub config: ShampooConfig,
    /// Parameter names, in optimizer order.
    pub params: Vec<String>,
    /// Parameter shapes.
    pub shapes: Vec<Vec<usize>>,
    /// Number of steps.
    pub steps: usize,
    /// Initial parameters.
    pub init: Vec<Vec<f64>>,
    /// `grads[k][p]`: gradient of parameter `p` at step `k + 1`.
    pub grads: Vec<Vec<Vec<f64>>>,
    /// `expected[k][p]`: parameter `p` after step `k + 1`.
    pub expected: Vec<Vec<Vec<f64>>>,
    /// `eval[k][p]`: the evaluation view of parameter `p` after step
    /// `k + 1` (iterate-averaging cases).
    pub eval: Option<Vec<Vec<Vec<f64>>>>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a float64 tensor, checking its shape.
fn read_f64(st: &SafeTensors<'_>, path: &Path, name: &str, shape: &[usize]) -> Result<Vec<f64>> {
    let t = st
        .tensor(name)
        .map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
    if t.dtype() != Dtype::F64 {
        return Err(bad(
            path,
            format!("tensor {name} is {:?}, expected F64", t.dtype()),
        ));
    }
    let want: usize = shape.iter().product();
    let got: usize = t.shape().iter().product();
    if got != want {
        return Err(bad(
            path,
            format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.shape()
            ),
        ));
    }
    Ok(t.data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

impl ReferenceCase {
    /// Reads a case file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, e.to_string()))?;
        let meta: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(path, format!("metadata has no {k:?}")))
        };
        let config = ShampooConfig::from_json(get("config")?)
            .map_err(|e| bad(path, format!("config: {e}")))?;
        let params: Vec<String> =
            serde_json::from_str(get("params")?).map_err(|e| bad(path, format!("params: {e}")))?;
        let steps: usize = get("steps")?
            .trim()
            .parse()
            .map_err(|e| bad(path, format!("steps: {e}")))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e.to_string()))?;
        let shapes: Vec<Vec<usize>> = params
            .iter()
            .map(|p| {
                st.tensor(&format!("init/{p}"))
                    .map(|t| t.shape().to_vec())
                    .map_err(|e| bad(path, format!("init/{p}: {e}")))
            })
            .collect::<Result<_>>()?;
        let init = params
            .iter()
            .zip(&shapes)
            .map(|(p, s)| read_f64(&st, path, &format!("init/{p}"), s))
            .collect::<Result<Vec<_>>>()?;
        let mut grads = Vec::with_capacity(steps);
        let mut expected = Vec::with_capacity(steps);
        let has_eval = params
            .first()
            .is_some_and(|p| st.tensor(&format!("eval/{p}/1")).is_ok());
        let mut eval = Vec::new();
        for k in 1..=steps {
            grads.push(
                params
                    .iter()
                    .zip(&shapes)
                    .map(|(p, s)| read_f64(&st, path, &format!("grad/{p}/{k}"), s))
                    .collect::<Result<Vec<_>>>()?,
            );
            expected.push(
                params
                    .iter()
                    .zip(&shapes)
                    .map(|(p, s)| read_f64(&st, path, &format!("param/{p}/{k}"), s))
                    .collect::<Result<Vec<_>>>()?,
            );
            if has_eval {
                eval.push(
                    params
                        .iter()
                        .zip(&shapes)
                        .map(|(p, s)| read_f64(&st, path, &format!("eval/{p}/{k}"), s))
                        .collect::<Result<Vec<_>>>()?,
                );
            }
        }
        if let Some(s) = &config.lr_schedule
            && s.len() < steps
        {
            return Err(bad(
                path,
                format!("lr_schedule has {} entries for {steps} steps", s.len()),
            ));
        }
        Ok(ReferenceCase {
            name: path
                .file_stem()
                .map_or_else(|| "case".into(), |s| s.to_string_lossy().into_owned()),
            path: path.to_path_buf(),
            config,
            params,
            shapes,
            steps,
            init,
            grads,
            expected,
            eval: has_eval.then_some(eval),
        })
    }

    /// Names of the compared tensors, in the order of [`ReferenceCase::replay`]'s
    /// errors: the parameters, then `eval/<p>` when the case has them.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v = self.params.clone();
        if self.eval.is_some() {
            v.extend(self.params.iter().map(|p| format!("eval/{p}")));
        }
        v
    }

    /// Replays the case in float64 on `backend`; returns the error of every
    /// step and tensor (`errors[k][i]`, tensors as in
    /// [`ReferenceCase::tensor_names`]).
    pub fn replay<B: Backend>(&self, backend: B) -> Result<Vec<Vec<f64>>> {
        let mut opt = Shampoo::new(self.config.clone(), &self.shapes, DType::F64, backend)?;
        let b = opt.backend();
        let mut bufs = self
            .init
            .iter()
            .map(|w| {
                let mut buf = b.alloc(DType::F64, w.len())?;
                b.upload(b.view_mut(&mut buf), HostView::F64(w))?;
                Ok(buf)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut gbufs = self
            .init
            .iter()
            .map(|w| b.alloc(DType::F64, w.len()))
            .collect::<Result<Vec<_>>>()?;
        let mut errors = Vec::with_capacity(self.steps);
        let mut host: Vec<Vec<f64>> = self.init.clone();
        for k in 0..self.steps {
            if self.config.lr_schedule.is_some() {
                opt.set_lr(self.config.lr_at(k as u64 + 1))?;
            }
            {
                let b = opt.backend();
                for (g, h) in gbufs.iter_mut().zip(&self.grads[k]) {
                    b.upload(b.view_mut(g), HostView::F64(h))?;
                }
            }
            {
                // Split the borrow: the backend is inside `opt`.
                let (views, grads) = {
                    let b: &B = opt.backend();
                    let views: Vec<B::ViewMut<'_>> =
                        bufs.iter_mut().map(|x| b.view_mut(x)).collect();
                    let grads: Vec<Option<B::View<'_>>> =
                        gbufs.iter().map(|x| Some(b.view(x))).collect();
                    (views, grads)
                };
                let mut views = views;
                step_with(&mut opt, &mut views, &grads)?;
            }
            let b = opt.backend();
            let mut step_err = Vec::with_capacity(self.params.len());
            for ((buf, h), want) in bufs.iter().zip(host.iter_mut()).zip(&self.expected[k]) {
                b.download(b.view(buf), HostViewMut::F64(h))?;
                step_err.push(relative_error(h, want));
            }
            if let Some(eval) = &self.eval {
                let train_params = host.clone();
                let mut views: Vec<B::ViewMut<'_>> =
                    bufs.iter_mut().map(|x| b.view_mut(x)).collect();
                switch(&mut opt, &mut views, true)?;
                drop(views);
                let b = opt.backend();
                for ((buf, h), want) in bufs.iter().zip(host.iter_mut()).zip(&eval[k]) {
                    b.download(b.view(buf), HostViewMut::F64(h))?;
                    step_err.push(relative_error(h, want));
                }
                let mut views: Vec<B::ViewMut<'_>> =
                    bufs.iter_mut().map(|x| b.view_mut(x)).collect();
                switch(&mut opt, &mut views, false)?;
                drop(views);
                // The reference's trajectory stays exactly `y` (a round trip
                // through the evaluation view moves it by float32 rounding
                // of its coefficients, up to ~1e-8 of `Z - y`).
                let b = opt.backend();
                for (buf, y) in bufs.iter_mut().zip(&train_params) {
                    b.upload(b.view_mut(buf), HostView::F64(y))?;
                }
            }
            errors.push(step_err);
        }
        Ok(errors)
    }
}

fn switch<B: Backend>(
    opt: &mut Shampoo<B>,
    params: &mut [B::ViewMut<'_>],
    to_eval: bool,
) -> Result<()> {
    if to_eval {
        opt.eval(params)
    } else {
        opt.train(params)
    }
}

fn step_with<B: Backend>(
    opt: &mut Shampoo<B>,
    params: &mut [B::ViewMut<'_>],
    grads: &[Option<B::View<'_>>],
) -> Result<()> {
    opt.step(params, grads)
}

/// `max |a - b| / max |b|` (absolute when `b` is all zeros).
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f64, |m, e| if e > m || e.is_nan() { e } else { m });
    let den = b.iter().fold(0.0f64, |m, y| m.max(y.abs()));
    if den > 0.0 { num / den } else { num }
}
