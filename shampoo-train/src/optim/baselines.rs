//! AdamW and SGD over the trainable variables of a `VarStore`, with
//! `torch.optim.AdamW` / `torch.optim.SGD`'s update rules.

use crate::error::{Error, Result};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// AdamW: `p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// p -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)`.
#[derive(Debug)]
pub struct AdamW {
    /// Learning rate of the next step.
    pub lr: f64,
    /// `(beta1, beta2)`.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    step: i64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    /// AdamW for the trainable variables of `vs`.
    pub fn new(vs: &VarStore, lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        let vars = vs.trainable_variables();
        AdamW {
            lr,
            betas,
            eps,
            weight_decay,
            step: 0,
            exp_avg: vars.iter().map(Tensor::zeros_like).collect(),
            exp_avg_sq: vars.iter().map(Tensor::zeros_like).collect(),
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// One update from the current gradients (variables without a gradient
    /// are left alone).
    pub fn step(&mut self, vs: &VarStore) -> Result<()> {
        let vars = vs.trainable_variables();
        check_count(vars.len(), self.exp_avg.len())?;
        self.step += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        let step_size = self.lr / bc1;
        tch::no_grad(|| -> Result<()> {
            for ((p, m), v) in vars.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                let _ = p.f_mul_scalar_(1.0 - self.lr * self.weight_decay)?;
                let _ = m.f_mul_scalar_(b1)?;
                let _ = m.f_add_(&g.f_mul_scalar(1.0 - b1)?)?;
                let _ = v.f_mul_scalar_(b2)?;
                let _ = v.f_addcmul_(&g.f_mul_scalar(1.0 - b2)?, &g)?;
                let denom = v.f_sqrt()?.f_div_scalar(bc2_sqrt)?.f_add_scalar(self.eps)?;
                let _ = p.f_addcdiv_(&m.f_mul_scalar(-step_size)?, &denom)?;
            }
            Ok(())
        })
    }

    /// Whether both moments are finite everywhere.
    pub fn state_is_finite(&self) -> Result<bool> {
        crate::divergence::all_finite(self.exp_avg.iter().chain(&self.exp_avg_sq))
    }

    /// Writes the step count and the moments to `path` (libtorch's format).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> =
            vec![("step".into(), Tensor::from_slice(&[self.step]))];
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
            named.push((format!("exp_avg.{i}"), m.shallow_clone()));
            named.push((format!("exp_avg_sq.{i}"), v.shallow_clone()));
        }
        Ok(Tensor::save_multi(&named, path)?)
    }

    /// Reads what [`AdamW::save`] wrote; the moments must match the
    /// variables' shapes.
    pub fn load(&mut self, path: &Path, vs: &VarStore) -> Result<()> {
        let mut state = load_named(path)?;
        self.step = take(&mut state, "step", path)?.int64_value(&[0]);
        let vars = vs.trainable_variables();
        for (i, p) in vars.iter().enumerate() {
            let m = take(&mut state, &format!("exp_avg.{i}"), path)?;
            let v = take(&mut state, &format!("exp_avg_sq.{i}"), path)?;
            check_shape(path, i, p, &m)?;
            check_shape(path, i, p, &v)?;
            self.exp_avg[i] = m.to_device(p.device());
            self.exp_avg_sq[i] = v.to_device(p.device());
        }
        no_leftovers(state, path)
    }
}

/// SGD as `torch.optim.SGD`: `d = g + wd p; buf = mu buf + (1-dampening) d`
/// (the first step sets `buf = d`); `d = nesterov ? d + mu buf : buf;
/// p -= lr d`.
#[derive(Debug)]
pub struct Sgd {
    /// Learning rate of the next step.
    pub lr: f64,
    /// Momentum (0 disables the buffer).
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// L2 weight decay (added to the gradient).
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    buf: Vec<Option<Tensor>>,
}

impl Sgd {
    /// SGD for the trainable variables of `vs`.
    pub fn new(vs: &VarStore, lr: f64, momentum: f64, weight_decay: f64, nesterov: bool) -> Self {
        let n = vs.trainable_variables().len();
        Sgd {
            lr,
            momentum,
            dampening: 0.0,
            weight_decay,
            nesterov,
            buf: (0..n).map(|_| None).collect(),
        }
    }

    /// One update from the current gradients.
    pub fn step(&mut self, vs: &VarStore) -> Result<()> {
        let vars = vs.trainable_variables();
        check_count(vars.len(), self.buf.len())?;
        tch::no_grad(|| -> Result<()> {
            for (p, buf) in vars.iter().zip(&mut self.buf) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut d = if self.weight_decay != 0.0 {
                    g.f_add(&p.f_mul_scalar(self.weight_decay)?)?
                } else {
                    g.shallow_clone()
                };
                if self.momentum != 0.0 {
                    let b = match buf {
                        Some(b) => {
                            let _ = b.f_mul_scalar_(self.momentum)?;
                            let _ = b.f_add_(&d.f_mul_scalar(1.0 - self.dampening)?)?;
                            b.shallow_clone()
                        }
                        None => {
                            let b = d.f_detach_copy()?;
                            *buf = Some(b.shallow_clone());
                            b
                        }
                    };
                    d = if self.nesterov {
                        d.f_add(&b.f_mul_scalar(self.momentum)?)?
                    } else {
                        b
                    };
                }
                let mut p = p.shallow_clone();
                let _ = p.f_sub_(&d.f_mul_scalar(self.lr)?)?;
            }
            Ok(())
        })
    }

    /// Whether the momentum buffers are finite everywhere.
    pub fn state_is_finite(&self) -> Result<bool> {
        crate::divergence::all_finite(self.buf.iter().flatten())
    }

    /// Writes the momentum buffers to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> =
            vec![("count".into(), Tensor::from_slice(&[self.buf.len() as i64]))];
        for (i, b) in self.buf.iter().enumerate() {
            if let Some(b) = b {
                named.push((format!("momentum_buffer.{i}"), b.shallow_clone()));
            }
        }
        Ok(Tensor::save_multi(&named, path)?)
    }

    /// Reads what [`Sgd::save`] wrote.
    pub fn load(&mut self, path: &Path, vs: &VarStore) -> Result<()> {
        let mut state = load_named(path)?;
        let count = take(&mut state, "count", path)?.int64_value(&[0]) as usize;
        let vars = vs.trainable_variables();
        check_count(vars.len(), count).map_err(|_| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("{count} momentum buffers for {} variables", vars.len()),
        })?;
        for (i, p) in vars.iter().enumerate() {
            self.buf[i] = match state.remove(&format!("momentum_buffer.{i}")) {
                Some(b) => {
                    check_shape(path, i, p, &b)?;
                    Some(b.to_device(p.device()))
                }
                None => None,
            };
        }
        no_leftovers(state, path)
    }
}

fn check_count(vars: usize, state: usize) -> Result<()> {
    if vars != state {
        return Err(Error::Invalid(format!(
            "the optimizer was built for {state} variables, the model now has {vars}"
        )));
    }
    Ok(())
}

fn load_named(path: &Path) -> Result<std::collections::HashMap<String, Tensor>> {
    let named = Tensor::load_multi(path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: crate::error::torch_message(&e),
    })?;
    Ok(named.into_iter().collect())
}

fn take(
    state: &mut std::collections::HashMap<String, Tensor>,
    name: &str,
    path: &Path,
) -> Result<Tensor> {
    state.remove(name).ok_or_else(|| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("no tensor `{name}`; was it written for another model or optimizer?"),
    })
}

fn check_shape(path: &Path, i: usize, p: &Tensor, s: &Tensor) -> Result<()> {
    if p.size() != s.size() || s.kind() != p.kind() && s.kind() != Kind::Float {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!(
                "state of variable {i} has shape {:?}, the variable {:?}",
                s.size(),
                p.size()
            ),
        });
    }
    Ok(())
}

fn no_leftovers(state: std::collections::HashMap<String, Tensor>, path: &Path) -> Result<()> {
    if let Some(name) = state.keys().min() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!(
                "unexpected tensor `{name}`: the checkpoint holds more variables than the model"
            ),
        });
    }
    Ok(())
}
