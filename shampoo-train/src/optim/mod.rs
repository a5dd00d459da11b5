//! Optimizers of the training loop: AdamW and SGD baselines (libtorch tensor
//! operations, with state that checkpoints can hold) and Shampoo.
//!
//! The baselines implement `torch.optim.AdamW` and `torch.optim.SGD`'s update
//! rules with libtorch operations on the variables of a `VarStore`. tch's
//! `nn::Optimizer` wraps the same C++ optimizers but cannot read or write
//! their state, which an exact `--resume` needs; a test checks that
//! [`AdamW`] follows tch's `nn::AdamW` step for step.

mod baselines;

pub use baselines::{AdamW, Sgd};

use crate::comm::{Collectives, Communicator};
use crate::error::Result;
use shampoo_tch::GradientAveraging;
use std::path::Path;
use std::time::Instant;
use tch::nn::VarStore;

/// Seconds spent in the parts of a step after the backward pass, and the
/// bytes the step all-gathered.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OptTimes {
    /// Gradient averaging across ranks.
    pub all_reduce: f64,
    /// The optimizer's own computation.
    pub optimizer: f64,
    /// Sharing the directions between ranks (distributed Shampoo).
    pub all_gather: f64,
    /// Bytes all-gathered on this rank (every rank's directions; zero when
    /// nothing is sharded).
    pub gathered_bytes: usize,
}

/// Which optimizer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay).
    Adamw,
    /// SGD with momentum (L2 weight decay, as torch.optim.SGD).
    Sgd,
    /// Distributed Shampoo (shampoo-tch).
    Shampoo,
}

impl OptimizerKind {
    /// Name on the command line and in checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Shampoo => "shampoo",
        }
    }
}

/// An optimizer over every trainable variable of a `VarStore`.
pub enum Optimizer {
    /// AdamW baseline, and how its gradients are averaged over the ranks.
    AdamW(AdamW, GradientAveraging),
    /// SGD baseline, and how its gradients are averaged over the ranks.
    Sgd(Sgd, GradientAveraging),
    /// Shampoo (which averages gradients and shares directions itself).
    Shampoo {
        /// The optimizer.
        opt: Box<shampoo_tch::Shampoo>,
        /// Its configured (peak) learning rate.
        lr: f64,
    },
}

impl Optimizer {
    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self, vs: &VarStore) {
        if let Optimizer::Shampoo { opt, .. } = self {
            opt.zero_grad();
            return;
        }
        for mut v in vs.trainable_variables() {
            v.zero_grad();
        }
    }

    /// The learning rate the optimizer was built with (the schedule's peak).
    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::AdamW(o, _) => o.lr,
            Optimizer::Sgd(o, _) => o.lr,
            Optimizer::Shampoo { lr, .. } => *lr,
        }
    }

    /// Sets the learning rate of the next step.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        match self {
            Optimizer::AdamW(o, _) => o.lr = lr,
            Optimizer::Sgd(o, _) => o.lr = lr,
            Optimizer::Shampoo { opt, .. } => opt.set_lr(lr)?,
        }
        Ok(())
    }

    /// A baseline over `vs`'s variables whose gradients are averaged over
    /// the ranks of `collectives` (on the device for GPU ranks).
    pub fn adamw(o: AdamW, collectives: &Collectives) -> Self {
        Optimizer::AdamW(o, GradientAveraging::new(collectives.clone()))
    }

    /// As [`Optimizer::adamw`] for SGD.
    pub fn sgd(o: Sgd, collectives: &Collectives) -> Self {
        Optimizer::Sgd(o, GradientAveraging::new(collectives.clone()))
    }

    /// Averages the gradients over the ranks and updates the variables.
    pub fn step(&mut self, vs: &VarStore) -> Result<OptTimes> {
        fn baseline_step(
            avg: &mut GradientAveraging,
            vs: &VarStore,
            step: &mut dyn FnMut() -> Result<()>,
        ) -> Result<OptTimes> {
            let t0 = Instant::now();
            avg.all_reduce(vs)?;
            let t1 = Instant::now();
            step()?;
            Ok(OptTimes {
                all_reduce: (t1 - t0).as_secs_f64(),
                optimizer: t1.elapsed().as_secs_f64(),
                all_gather: 0.0,
                gathered_bytes: 0,
            })
        }
        match self {
            Optimizer::AdamW(o, avg) => baseline_step(avg, vs, &mut || o.step(vs)),
            Optimizer::Sgd(o, avg) => baseline_step(avg, vs, &mut || o.step(vs)),
            Optimizer::Shampoo { opt, .. } => {
                opt.step()?;
                let t = opt.timings();
                Ok(OptTimes {
                    all_reduce: t.all_reduce.as_secs_f64(),
                    optimizer: t.optimizer.as_secs_f64(),
                    all_gather: t.all_gather.as_secs_f64(),
                    gathered_bytes: t.gathered_bytes,
                })
            }
        }
    }

    /// Checks what the last step left outstanding (with NCCL, gradient
    /// presence is checked a step late).
    pub fn finish(&mut self) -> Result<()> {
        match self {
            Optimizer::AdamW(_, avg) | Optimizer::Sgd(_, avg) => Ok(avg.finish()?),
            Optimizer::Shampoo { opt, .. } => Ok(opt.flush()?),
        }
    }

    /// Bytes of optimizer state this rank holds (Shampoo; the baselines'
    /// state is not counted).
    pub fn state_bytes(&self) -> usize {
        match self {
            Optimizer::Shampoo { opt, .. } => opt.state_bytes(),
            _ => 0,
        }
    }

    /// Whether the model is evaluated with other parameters than it is
    /// trained with (Shampoo with iterate averaging).
    pub fn has_eval_view(&self) -> bool {
        match self {
            Optimizer::Shampoo { opt, .. } => opt
                .groups()
                .iter()
                .any(|&g| opt.config(g).iterate_averaging.is_some()),
            _ => false,
        }
    }

    /// Puts the parameters the model is evaluated with into the variables:
    /// Shampoo's evaluation view with iterate averaging (the averaged
    /// sequence, as the published `eval()`), the parameters themselves
    /// otherwise. Collective. Undo with [`Optimizer::train_view`].
    pub fn eval_view(&mut self) -> Result<()> {
        if let Optimizer::Shampoo { opt, .. } = self {
            opt.eval()?;
        }
        Ok(())
    }

    /// Back to the parameters the next step updates (the published
    /// `train()`, which recomputes them from the evaluation view: up to
    /// float32 rounding of its coefficients). Collective.
    pub fn train_view(&mut self) -> Result<()> {
        if let Optimizer::Shampoo { opt, .. } = self {
            opt.train()?;
        }
        Ok(())
    }

    /// Writes the optimizer state into the folder `dir` (which exists).
    /// Collective: every rank calls it (Shampoo's ranks each write their
    /// part; the baselines' state, the same on every rank, is written by
    /// rank 0).
    pub fn save(&mut self, dir: &Path, comm: &dyn Communicator) -> Result<()> {
        match self {
            Optimizer::Shampoo { opt, .. } => Ok(opt.save(&dir.join("shampoo"))?),
            _ if comm.rank() != 0 => Ok(()),
            Optimizer::AdamW(o, _) => o.save(&dir.join("adamw.ot")),
            Optimizer::Sgd(o, _) => o.save(&dir.join("sgd.ot")),
        }
    }

    /// Whether the optimizer's own state is finite: the baselines' moments
    /// (Shampoo checks its factors and roots itself, at every root inverse).
    pub fn state_is_finite(&self) -> Result<bool> {
        match self {
            Optimizer::AdamW(o, _) => o.state_is_finite(),
            Optimizer::Sgd(o, _) => o.state_is_finite(),
            Optimizer::Shampoo { .. } => Ok(true),
        }
    }

    /// Shampoo's root-inverse counters of the blocks this rank reports
    /// (see `shampoo_tch::Shampoo::root_inverse_stats`); empty for the
    /// baselines.
    pub fn root_inverse_stats(&self) -> Vec<shampoo_tch::VariableRootInverseStats> {
        match self {
            Optimizer::Shampoo { opt, .. } => opt.root_inverse_stats(),
            _ => Vec::new(),
        }
    }

    /// [`Optimizer::root_inverse_stats`] summed.
    pub fn root_inverse_totals(&self) -> shampoo_core::RootInverseCounters {
        let mut total = shampoo_core::RootInverseCounters::default();
        for s in self.root_inverse_stats() {
            total.add(&s.stats.counters);
        }
        total
    }

    /// Reads the state [`Optimizer::save`] wrote.
    pub fn load(&mut self, dir: &Path, vs: &VarStore) -> Result<()> {
        match self {
            Optimizer::AdamW(o, _) => o.load(&dir.join("adamw.ot"), vs),
            Optimizer::Sgd(o, _) => o.load(&dir.join("sgd.ot"), vs),
            Optimizer::Shampoo { opt, .. } => Ok(opt.load(&dir.join("shampoo"))?),
        }
    }
}

/// Refuses a Shampoo configuration whose state would not fit in this
/// machine's memory, before anything is allocated; the error gives the
/// size and the variable with the widest factor.
pub(crate) fn check_shampoo_memory(
    vs: &VarStore,
    config: &shampoo_core::ShampooConfig,
) -> std::result::Result<(), String> {
    let Some(limit) = shampoo_core::memory::host_memory_bytes() else {
        return Ok(());
    };
    let mut vars: Vec<(String, tch::Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let shapes: Vec<Vec<usize>> = vars
        .iter()
        .map(|(_, t)| t.size().iter().map(|&d| d.max(0) as usize).collect())
        .collect();
    let dtype = match vars.first().map(|(_, t)| t.kind()) {
        Some(tch::Kind::Double) => shampoo_core::DType::F64,
        _ => shampoo_core::DType::F32,
    };
    let name = |i: usize| format!("variable {}", vars[i].0);
    shampoo_core::memory::check_allocation(
        &shapes,
        config,
        dtype,
        limit,
        "this machine's memory",
        &name,
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}
