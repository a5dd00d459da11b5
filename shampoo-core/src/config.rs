//! The optimizer's configuration.
//!
//! The JSON form is the schema of the published implementation's reference
//! trajectories (`lr`, `betas`, `epsilon`, ...) plus a few project keys
//! (`factor_dtype`, `tf32`). Unknown keys are rejected, so that a typo never
//! silently falls back to a default. Missing keys take the published
//! implementation's defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{DType, Error, Result};

/// Full configuration of one Shampoo parameter group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShampooConfig {
    /// Learning rate.
    pub lr: f64,
    /// `[beta1, beta2]`: beta1 filters the gradient (0 disables); beta2 is the
    /// factor statistics' EMA (1.0 sums them, AdaGrad-style).
    pub betas: [f64; 2],
    /// Damping added to the factor matrices before the root inverse.
    pub epsilon: f64,
    /// Weight decay coefficient.
    pub weight_decay: f64,
    /// How weight decay is applied.
    pub weight_decay_type: WeightDecayType,
    /// Dimensions are merged while their product stays at or below this, and
    /// split into blocks of at most this size.
    pub max_preconditioner_dim: usize,
    /// Recompute root inverses every this many steps.
    pub precondition_frequency: u64,
    /// First preconditioned step; `-1` means `precondition_frequency`;
    /// `"never"` keeps the optimizer diagonal (grafting only) for good.
    pub start_preconditioning_step: StartStep,
    /// Bias-correct the filtered gradient and the factor statistics.
    pub use_bias_correction: bool,
    /// Optimizer whose per-block step size Shampoo's direction is scaled to.
    pub grafting: Option<Grafting>,
    /// Classic momentum, applied last.
    pub momentum: Option<Momentum>,
    /// Which preconditioner to use.
    pub preconditioner: Preconditioner,
    /// Element type of the factor matrices; `null` (default) means the
    /// parameters' dtype. Project extension.
    pub factor_dtype: Option<DType>,
    /// Allow TensorFloat-32 matrix products on GPUs that have them (float32
    /// factors only). Project extension; ignored on the CPU.
    pub tf32: bool,
}

impl Default for ShampooConfig {
    /// The published implementation's defaults.
    fn default() -> Self {
        ShampooConfig {
            lr: 1e-2,
            betas: [0.9, 1.0],
            epsilon: 1e-12,
            weight_decay: 0.0,
            weight_decay_type: WeightDecayType::Decoupled,
            max_preconditioner_dim: 1024,
            precondition_frequency: 1,
            start_preconditioning_step: StartStep::Default,
            use_bias_correction: true,
            grafting: None,
            momentum: None,
            preconditioner: Preconditioner::default(),
            factor_dtype: None,
            tf32: false,
        }
    }
}

/// How weight decay enters the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDecayType {
    /// Added to the direction after grafting (AdamW-style).
    Decoupled,
    /// Added to the gradient before everything (L2 regularisation).
    L2,
}

/// `start_preconditioning_step`: `-1`, a step number, or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartStep {
    /// `-1`: the precondition frequency.
    #[default]
    Default,
    /// An explicit step (>= the frequency).
    At(u64),
    /// Never precondition: the optimizer is its grafting method.
    Never,
}

impl Serialize for StartStep {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            StartStep::Default => s.serialize_i64(-1),
            StartStep::At(n) => s.serialize_u64(*n),
            StartStep::Never => s.serialize_str("never"),
        }
    }
}

impl<'de> Deserialize<'de> for StartStep {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(-1) => Ok(StartStep::Default),
            Raw::Int(n) if n >= 0 => Ok(StartStep::At(n as u64)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!(
                "start_preconditioning_step must be -1, a step >= precondition_frequency, or \"never\"; got {n}"
            ))),
            Raw::Str(s) if s == "never" => Ok(StartStep::Never),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "start_preconditioning_step must be -1, a step number, or \"never\"; got \"{s}\""
            ))),
        }
    }
}

/// Grafting: the per-block norm of this optimizer's step is given to
/// Shampoo's direction, and before preconditioning starts it is the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Grafting {
    /// Plain gradient.
    Sgd,
    /// `G / (sqrt(sum G^2) + eps)`.
    Adagrad {
        /// Denominator damping.
        #[serde(default = "default_adagrad_eps")]
        epsilon: f64,
    },
    /// `G / (sqrt(EMA G^2) + eps)`.
    Rmsprop {
        /// EMA coefficient of the squared gradient.
        #[serde(default = "default_rmsprop_beta2")]
        beta2: f64,
        /// Denominator damping.
        #[serde(default = "default_graft_eps")]
        epsilon: f64,
    },
    /// `G / (sqrt(EMA G^2 / (1 - beta2^t)) + eps)`; always bias-corrected.
    Adam {
        /// EMA coefficient of the squared gradient.
        #[serde(default = "default_adam_beta2")]
        beta2: f64,
        /// Denominator damping.
        #[serde(default = "default_graft_eps")]
        epsilon: f64,
    },
}

fn default_adagrad_eps() -> f64 {
    1e-10
}
fn default_rmsprop_beta2() -> f64 {
    0.99
}
fn default_adam_beta2() -> f64 {
    0.999
}
fn default_graft_eps() -> f64 {
    1e-8
}

impl Grafting {
    /// Whether this grafting method keeps a squared-gradient accumulator.
    pub fn has_accumulator(&self) -> bool {
        !matches!(self, Grafting::Sgd)
    }
}

/// Classic (heavy-ball) momentum, applied to the final direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Momentum {
    /// Momentum coefficient.
    pub momentum: f64,
    /// Dampening of the new direction.
    #[serde(default)]
    pub dampening: f64,
    /// Nesterov's variant.
    #[serde(default)]
    pub nesterov: bool,
}

/// Which preconditioner Shampoo applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Preconditioner {
    /// Kronecker factors' inverse roots.
    RootInv {
        /// How the inverse roots are computed.
        #[serde(default)]
        root_inverse: RootInverse,
        /// Per-order exponent overrides (see [`ExponentOverride`]).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        inverse_exponent_override: BTreeMap<String, ExponentOverride>,
    },
    /// Eigenvalue-corrected Shampoo: Adam in the factors' eigenbasis.
    EigenvalueCorrected,
}

impl Default for Preconditioner {
    fn default() -> Self {
        Preconditioner::RootInv {
            root_inverse: RootInverse::default(),
            inverse_exponent_override: BTreeMap::new(),
        }
    }
}

/// Root inverse method.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum RootInverse {
    /// Symmetric eigendecomposition (default).
    #[default]
    Eigh,
    /// Coupled inverse Newton iteration.
    CoupledNewton {
        /// Iteration cap.
        #[serde(default = "default_newton_iters")]
        max_iterations: u32,
        /// Stop when max |M - I| is at most this.
        #[serde(default = "default_newton_tol")]
        tolerance: f64,
    },
}

fn default_newton_iters() -> u32 {
    100
}
fn default_newton_tol() -> f64 {
    1e-6
}

/// An inverse-exponent override for blocks of one order: one value for
/// every dimension, or values for some dimensions (the others keep the
/// default `1 / (2 * order)`). A value of 0 leaves that dimension
/// unpreconditioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExponentOverride {
    /// The same exponent for every dimension.
    All(f64),
    /// Exponents by dimension index (as a string key in JSON).
    PerDim(BTreeMap<String, f64>),
}

impl ShampooConfig {
    /// Parses a JSON config and validates it.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: ShampooConfig = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Serialises to pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Checks every value against the published implementation's rules.
    pub fn validate(&self) -> Result<()> {
        let fin = |name: &str, v: f64| -> Result<()> {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::config(format!("{name} must be finite, got {v:?}")))
            }
        };
        fin("lr", self.lr)?;
        if self.lr < 0.0 {
            return Err(Error::config(format!("lr must be >= 0, got {:?}", self.lr)));
        }
        let [b1, b2] = self.betas;
        if !(0.0..1.0).contains(&b1) {
            return Err(Error::config(format!(
                "betas[0] must be in [0, 1), got {b1:?}"
            )));
        }
        if !(0.0..=1.0).contains(&b2) {
            return Err(Error::config(format!(
                "betas[1] must be in [0, 1], got {b2:?}"
            )));
        }
        fin("epsilon", self.epsilon)?;
        if self.epsilon <= 0.0 {
            return Err(Error::config(format!(
                "epsilon must be > 0, got {:?}",
                self.epsilon
            )));
        }
        fin("weight_decay", self.weight_decay)?;
        if self.weight_decay < 0.0 {
            return Err(Error::config(format!(
                "weight_decay must be >= 0, got {:?}",
                self.weight_decay
            )));
        }
        if self.max_preconditioner_dim < 1 {
            return Err(Error::config("max_preconditioner_dim must be >= 1, got 0"));
        }
        if self.precondition_frequency < 1 {
            return Err(Error::config("precondition_frequency must be >= 1, got 0"));
        }
        if let StartStep::At(s) = self.start_preconditioning_step
            && s < self.precondition_frequency
        {
            return Err(Error::config(format!(
                "start_preconditioning_step must be -1 or >= precondition_frequency ({}), got {s}",
                self.precondition_frequency
            )));
        }
        match self.grafting {
            None | Some(Grafting::Sgd) => {}
            Some(Grafting::Adagrad { epsilon }) => graft_eps("adagrad", epsilon)?,
            Some(Grafting::Rmsprop { beta2, epsilon }) => {
                graft_beta2("rmsprop", beta2)?;
                graft_eps("rmsprop", epsilon)?;
            }
            Some(Grafting::Adam { beta2, epsilon }) => {
                graft_beta2("adam", beta2)?;
                graft_eps("adam", epsilon)?;
            }
        }
        if let Some(m) = self.momentum {
            if !(0.0..1.0).contains(&m.momentum) {
                return Err(Error::config(format!(
                    "momentum.momentum must be in [0, 1), got {:?}",
                    m.momentum
                )));
            }
            if !(0.0..1.0).contains(&m.dampening) {
                return Err(Error::config(format!(
                    "momentum.dampening must be in [0, 1), got {:?}",
                    m.dampening
                )));
            }
        }
        if let Preconditioner::RootInv {
            root_inverse,
            inverse_exponent_override,
        } = &self.preconditioner
        {
            if let RootInverse::CoupledNewton {
                max_iterations,
                tolerance,
            } = root_inverse
            {
                if *max_iterations < 1 {
                    return Err(Error::config(
                        "coupled_newton.max_iterations must be >= 1, got 0",
                    ));
                }
                if !tolerance.is_finite() || *tolerance < 0.0 {
                    return Err(Error::config(format!(
                        "coupled_newton.tolerance must be finite and >= 0, got {tolerance:?}"
                    )));
                }
            }
            let newton = matches!(root_inverse, RootInverse::CoupledNewton { .. });
            for (order_key, ov) in inverse_exponent_override {
                let order: usize = order_key.parse().ok().filter(|o| *o >= 1).ok_or_else(|| {
                    Error::config(format!(
                        "inverse_exponent_override key {order_key:?} must be a block order (an integer >= 1)"
                    ))
                })?;
                let check = |what: String, e: f64| -> Result<()> {
                    if !e.is_finite() || e < 0.0 {
                        return Err(Error::config(format!(
                            "inverse_exponent_override {what} must be finite and >= 0, got {e:?}"
                        )));
                    }
                    if newton && e != 0.0 && !is_integer_root(e) {
                        return Err(Error::config(format!(
                            "inverse_exponent_override {what} = {e}: coupled_newton needs 1/exponent to be an integer"
                        )));
                    }
                    Ok(())
                };
                match ov {
                    ExponentOverride::All(e) => check(format!("[{order}]"), *e)?,
                    ExponentOverride::PerDim(m) => {
                        for (dim_key, e) in m {
                            let dim: usize = dim_key.parse().ok().filter(|d| *d < order).ok_or_else(|| {
                                Error::config(format!(
                                    "inverse_exponent_override[{order}] key {dim_key:?} must be a dimension index below the order {order}"
                                ))
                            })?;
                            check(format!("[{order}][{dim}]"), *e)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The first preconditioned step, `None` for never.
    pub fn start_step(&self) -> Option<u64> {
        match self.start_preconditioning_step {
            StartStep::Default => Some(self.precondition_frequency),
            StartStep::At(s) => Some(s),
            StartStep::Never => None,
        }
    }

    /// Inverse exponent of dimension `dim` of a block of order `order`
    /// (`1 / (2 * order)` unless overridden; 0 means not preconditioned).
    pub fn inverse_exponent(&self, order: usize, dim: usize) -> f64 {
        let default = 1.0 / (2.0 * order as f64);
        match &self.preconditioner {
            Preconditioner::RootInv {
                inverse_exponent_override,
                ..
            } => match inverse_exponent_override.get(&order.to_string()) {
                Some(ExponentOverride::All(e)) => *e,
                Some(ExponentOverride::PerDim(m)) => {
                    m.get(&dim.to_string()).copied().unwrap_or(default)
                }
                None => default,
            },
            Preconditioner::EigenvalueCorrected => default,
        }
    }

    /// The factor dtype for parameters of dtype `param`.
    pub fn factor_dtype_for(&self, param: DType) -> DType {
        self.factor_dtype.unwrap_or(param)
    }
}

fn graft_eps(name: &str, e: f64) -> Result<()> {
    if !e.is_finite() || e <= 0.0 {
        return Err(Error::config(format!(
            "grafting ({name}) epsilon must be > 0, got {e:?}"
        )));
    }
    Ok(())
}

fn graft_beta2(name: &str, b: f64) -> Result<()> {
    if !(b > 0.0 && b <= 1.0) {
        return Err(Error::config(format!(
            "grafting ({name}) beta2 must be in (0, 1], got {b:?}"
        )));
    }
    Ok(())
}

/// Whether `1 / e` is (within rounding) a positive integer.
pub(crate) fn is_integer_root(e: f64) -> bool {
    let r = 1.0 / e;
    (r - r.round()).abs() <= 1e-9 * r.max(1.0) && r.round() >= 1.0
}
