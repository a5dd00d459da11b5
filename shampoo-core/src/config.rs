//! The optimizer's configuration.
//!
//! The JSON form is the schema of the published implementation's reference
//! trajectories (`lr`, `betas`, `epsilon`, `preconditioner`, ...; see
//! `docs/config.md`) plus a few project keys (`factor_dtype`, `tf32`).
//! Unknown keys are rejected, so that a typo never silently falls back to a
//! default. Missing keys take the published implementation's defaults.
//! [`ShampooConfig::validate`] enforces every restriction of the published
//! implementation with an error that names the key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{DType, Error, Result};

/// Full configuration of one Shampoo parameter group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShampooConfig {
    /// Learning rate; also the peak learning rate that the `corrected` and
    /// `independent` weight decays divide by (the lr the optimizer is built
    /// with; [`crate::Shampoo::set_lr`] changes the step's lr, not the peak).
    pub lr: f64,
    /// The learning rate of each step (`lr_schedule[k - 1]` for step `k`),
    /// standing for a scheduler in the training loop. The optimizer does not
    /// apply it by itself: the reference replay
    /// ([`crate::reference::ReferenceCase::replay`], `shampoo-bench parity`)
    /// sets it before every step with [`crate::Shampoo::set_lr`], as a
    /// training loop's scheduler would. [`ShampooConfig::lr_at`] reads it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_schedule: Option<Vec<f64>>,
    /// `[beta1, beta2]`: beta1 filters the gradient (0 disables); beta2 is the
    /// factor statistics' EMA (1.0 sums them, AdaGrad-style).
    pub betas: [f64; 2],
    /// The filtered gradient of a step is `beta3 M1 + (1 - beta3) G`, taken
    /// before `M1`'s own update (Lion's two betas); `-1` means `beta1`.
    pub beta3: f64,
    /// Damping added to the factor matrices before the root inverse (must be
    /// 0 with a pseudo-inverse, > 0 otherwise).
    pub epsilon: f64,
    /// Weight decay coefficient.
    pub weight_decay: f64,
    /// How weight decay is applied.
    pub weight_decay_type: WeightDecayType,
    /// Dimensions are merged while their product stays at or below this, and
    /// split into blocks of at most this size.
    pub max_preconditioner_dim: usize,
    /// Recompute root inverses every this many steps (forced to 1 for
    /// spectral and sign descent).
    pub precondition_frequency: u64,
    /// First preconditioned step; `-1` means `precondition_frequency`;
    /// `"never"` keeps the optimizer diagonal (grafting only) for good.
    pub start_preconditioning_step: StartStep,
    /// Bias-correct the filtered gradient and the factor statistics.
    pub use_bias_correction: bool,
    /// Optimizer whose per-block step size Shampoo's direction is scaled to.
    pub grafting: Option<Grafting>,
    /// Classic momentum, applied last (exclusive with `iterate_averaging`).
    pub momentum: Option<Momentum>,
    /// Iterate averaging (GPA or Schedule-Free), with an evaluation view
    /// ([`crate::Shampoo::eval`]); exclusive with `momentum`.
    pub iterate_averaging: Option<IterateAveraging>,
    /// Which preconditioner to use.
    pub preconditioner: Preconditioner,
    /// Element type of the factor matrices; `null` (default) means the
    /// parameters' dtype. Project extension.
    pub factor_dtype: Option<DType>,
    /// Allow TensorFloat-32 matrix products for the statistics and the
    /// preconditioning (float32 data only): shorthand for `precision`
    /// `{"statistics": "tf32", "preconditioning": "tf32"}`. Project
    /// extension.
    pub tf32: bool,
    /// Operand precision of the matrix products, per use (project
    /// extension; default full precision everywhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<MatmulPrecision>,
}

/// Operand precision of each use of matrix products (float32 data; the
/// products accumulate in float32 either way). See [`Precision`].
///
/// [`Precision`]: crate::backend::Precision
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatmulPrecision {
    /// The factor statistics (`f32` or `tf32`).
    pub statistics: crate::backend::Precision,
    /// The preconditioning products (`f32`, `tf32` or `bf16`).
    pub preconditioning: crate::backend::Precision,
    /// The matrix-only root iterations (`coupled_newton`,
    /// `coupled_higher_order`, `batched_newton`; `f32`, `tf32` or `bf16`).
    pub root_iteration: crate::backend::Precision,
}

impl Default for ShampooConfig {
    /// The published implementation's defaults.
    fn default() -> Self {
        ShampooConfig {
            lr: 1e-2,
            lr_schedule: None,
            betas: [0.9, 1.0],
            beta3: -1.0,
            epsilon: 1e-12,
            weight_decay: 0.0,
            weight_decay_type: WeightDecayType::Decoupled,
            max_preconditioner_dim: 1024,
            precondition_frequency: 1,
            start_preconditioning_step: StartStep::Default,
            use_bias_correction: true,
            grafting: None,
            momentum: None,
            iterate_averaging: None,
            preconditioner: Preconditioner::default(),
            factor_dtype: None,
            tf32: false,
            precision: None,
        }
    }
}

/// How weight decay enters the step (`alpha` is the coefficient the
/// direction, or with iterate averaging the averaging state, is decayed
/// with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDecayType {
    /// `alpha = wd`, added to the direction after grafting (AdamW-style).
    Decoupled,
    /// Added to the gradient before everything (L2 regularisation).
    L2,
    /// `alpha = wd * lr_t / peak_lr`: decoupled, following the schedule.
    Corrected,
    /// `alpha = wd / peak_lr`: decoupled, independent of the lr's size.
    Independent,
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
        /// `V <- beta2 V + G^2` (no `1 - beta2`, no bias correction).
        #[serde(default)]
        drop_weighting_factor_on_gsquare: bool,
    },
    /// `G / (sqrt(EMA G^2 / (1 - beta2^t)) + eps)`; always bias-corrected
    /// unless the weighting factor is dropped.
    Adam {
        /// EMA coefficient of the squared gradient.
        #[serde(default = "default_adam_beta2")]
        beta2: f64,
        /// Denominator damping.
        #[serde(default = "default_graft_eps")]
        epsilon: f64,
        /// `V <- beta2 V + G^2` and no bias correction.
        #[serde(default)]
        drop_weighting_factor_on_gsquare: bool,
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

/// Iterate averaging: the optimizer keeps a second sequence `Z` per block
/// and takes gradients at an interpolation `y` of it with the averaged
/// sequence `x`, which [`crate::Shampoo::eval`] puts in the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum IterateAveraging {
    /// Generalized primal averaging with constant coefficients.
    Gpa {
        /// `mu_x`, in [0, 1).
        #[serde(default = "default_gpa_eval")]
        eval_interp_coeff: f64,
        /// `mu_y`, in (0, 1].
        #[serde(default = "default_train_interp")]
        train_interp_coeff: f64,
    },
    /// Schedule-Free: `mu_x = 1 - lr_t^p / sum_i lr_i^p`.
    ScheduleFree {
        /// `mu_y`, in (0, 1].
        #[serde(default = "default_train_interp")]
        train_interp_coeff: f64,
        /// `p`.
        #[serde(default = "default_lr_power")]
        eval_coeff_lr_power: f64,
    },
}

fn default_gpa_eval() -> f64 {
    0.9
}
fn default_train_interp() -> f64 {
    0.8
}
fn default_lr_power() -> f64 {
    2.0
}

impl IterateAveraging {
    /// `mu_y`.
    pub fn train_interp_coeff(&self) -> f64 {
        match *self {
            IterateAveraging::Gpa {
                train_interp_coeff, ..
            }
            | IterateAveraging::ScheduleFree {
                train_interp_coeff, ..
            } => train_interp_coeff,
        }
    }
}

/// Which preconditioner Shampoo applies.
///
/// The Shampoo family (`root_inv`, `eigendecomposed`,
/// `eigenvalue_corrected`, `kl_shampoo`) shares three optional keys:
/// `use_trace_scaling`, `trace_scaling_exponent` and
/// `drop_weighting_factor_on_gsquare` (see [`ShampooOptions`]).
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
        /// Scale each factor by `max(trace, eps)^-trace_scaling_exponent`
        /// before its amortized computation.
        #[serde(default)]
        use_trace_scaling: bool,
        /// Exponent of the trace scaling, in (0, 1].
        #[serde(default = "default_trace_exponent")]
        trace_scaling_exponent: f64,
        /// `L <- beta2 L + C` (no `1 - beta2`, no bias correction).
        #[serde(default)]
        drop_weighting_factor_on_gsquare: bool,
    },
    /// Cached eigendecompositions of the factors; the inverse roots are
    /// formed from them.
    Eigendecomposed {
        /// How the eigendecompositions are computed.
        #[serde(default)]
        eigendecomposition: Eigendecomposition,
        /// Per-order exponent overrides (see [`ExponentOverride`]).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        inverse_exponent_override: BTreeMap<String, ExponentOverride>,
        /// See [`Preconditioner::RootInv`].
        #[serde(default)]
        use_trace_scaling: bool,
        /// See [`Preconditioner::RootInv`].
        #[serde(default = "default_trace_exponent")]
        trace_scaling_exponent: f64,
        /// See [`Preconditioner::RootInv`].
        #[serde(default)]
        drop_weighting_factor_on_gsquare: bool,
    },
    /// Eigenvalue-corrected Shampoo (SOAP): Adam in the factors' eigenbasis.
    EigenvalueCorrected {
        /// How the eigenbases are computed (QR is SOAP's published default
        /// in `DefaultSOAPConfig`; the default here is eigh, as the
        /// published `EigenvalueCorrectedShampooPreconditionerConfig`).
        #[serde(default)]
        eigendecomposition: Eigendecomposition,
        /// `{order: [dims]}`: those dimensions of blocks of that order get no
        /// factor and no rotation.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        ignored_basis_change_dims: BTreeMap<String, Vec<usize>>,
        /// `{order: e}`: divide by `(D / bc2)^e + eps` instead of the square
        /// root.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        inverse_exponent_override: BTreeMap<String, f64>,
        /// See [`Preconditioner::RootInv`].
        #[serde(default)]
        use_trace_scaling: bool,
        /// See [`Preconditioner::RootInv`].
        #[serde(default = "default_trace_exponent")]
        trace_scaling_exponent: f64,
        /// See [`Preconditioner::RootInv`] (also drops it for `D`).
        #[serde(default)]
        drop_weighting_factor_on_gsquare: bool,
    },
    /// KL-Shampoo: the statistics of each factor are taken of the gradient
    /// preconditioned along the other dimensions.
    KlShampoo {
        /// Cached root inverses (`root_inv`) or eigendecompositions.
        variant: KlVariant,
        /// For `variant: root_inv`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root_inverse: Option<RootInverse>,
        /// For `variant: eigendecomposed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eigendecomposition: Option<Eigendecomposition>,
        /// Per-order exponent overrides (see [`ExponentOverride`]).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        inverse_exponent_override: BTreeMap<String, ExponentOverride>,
        /// See [`Preconditioner::RootInv`].
        #[serde(default)]
        use_trace_scaling: bool,
        /// See [`Preconditioner::RootInv`].
        #[serde(default = "default_trace_exponent")]
        trace_scaling_exponent: f64,
        /// See [`Preconditioner::RootInv`].
        #[serde(default)]
        drop_weighting_factor_on_gsquare: bool,
    },
    /// Spectral descent (Muon-style): the direction is the orthogonalized
    /// filtered gradient of each 2-D block.
    SpectralDescent {
        /// How blocks are orthogonalized.
        #[serde(default)]
        orthogonalization: Orthogonalization,
    },
    /// Sign descent (Lion with `beta3`): the direction is `sign(Gf)`.
    SignDescent,
}

fn default_trace_exponent() -> f64 {
    0.5
}

impl Default for Preconditioner {
    fn default() -> Self {
        Preconditioner::RootInv {
            root_inverse: RootInverse::default(),
            inverse_exponent_override: BTreeMap::new(),
            use_trace_scaling: false,
            trace_scaling_exponent: 0.5,
            drop_weighting_factor_on_gsquare: false,
        }
    }
}

/// The two KL-Shampoo variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlVariant {
    /// Cached root inverses (`root_inverse`).
    RootInv,
    /// Cached eigendecompositions (`eigendecomposition`).
    Eigendecomposed,
}

/// Root inverse method.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum RootInverse {
    /// Symmetric eigendecomposition (default).
    Eigh {
        /// How rank-deficient factors are handled.
        #[serde(default, skip_serializing_if = "RankDeficientStability::is_default")]
        rank_deficient_stability: RankDeficientStability,
        /// Accepted only as 0 (the published `EigenConfig` requires it):
        /// adaptive updates need cached eigenvectors, see
        /// [`Preconditioner::Eigendecomposed`].
        #[serde(default, skip_serializing_if = "is_zero")]
        tolerance: f64,
    },
    /// Coupled inverse Newton iteration (integer roots only).
    CoupledNewton {
        /// Iteration cap.
        #[serde(default = "default_newton_iters")]
        max_iterations: u32,
        /// Stop when max |M - I| is at most this.
        #[serde(default = "default_newton_tol")]
        tolerance: f64,
    },
    /// Coupled higher-order iteration (any root with a short binary
    /// fraction); ignores the group epsilon.
    CoupledHigherOrder {
        /// Ridge relative to the infinity norm of the factor.
        rel_epsilon: f64,
        /// Smallest ridge.
        abs_epsilon: f64,
        /// Iteration cap.
        #[serde(default = "default_newton_iters")]
        max_iterations: u32,
        /// Stop when max |M - I| is at most this.
        #[serde(default = "default_higher_order_tol")]
        tolerance: f64,
        /// Order of the method (2 is Newton).
        #[serde(default = "default_order")]
        order: u32,
    },
    /// Coupled inverse Newton iteration (integer roots only) with a fixed
    /// iteration count and no host read-back inside the loop: every block
    /// of a group runs the same batched matrix products. A block whose
    /// final `max |M - I|` exceeds `tolerance` (or whose root is not
    /// finite) keeps its previous root and counts a failure.
    BatchedNewton {
        /// Newton steps, always all of them.
        #[serde(default = "default_batched_iters")]
        iterations: u32,
        /// Largest accepted final residual `max |M - I|`.
        #[serde(default = "default_batched_tol")]
        tolerance: f64,
    },
}

impl Default for RootInverse {
    fn default() -> Self {
        RootInverse::Eigh {
            rank_deficient_stability: RankDeficientStability::default(),
            tolerance: 0.0,
        }
    }
}

fn default_newton_iters() -> u32 {
    100
}
fn default_newton_tol() -> f64 {
    1e-6
}
/// Default [`RootInverse::BatchedNewton`] iteration count: enough for a
/// condition number of about `1e8` (see `docs/tuning.md`).
pub const DEFAULT_BATCHED_NEWTON_ITERATIONS: u32 = 30;
/// Default [`RootInverse::BatchedNewton`] residual tolerance.
pub const DEFAULT_BATCHED_NEWTON_TOLERANCE: f64 = 1e-3;
/// Largest [`RootInverse::BatchedNewton`] iteration count accepted (a
/// typo guard: 30 steps already cover a condition number of `1e8`).
pub const MAX_BATCHED_NEWTON_ITERATIONS: u32 = 1000;
fn default_batched_iters() -> u32 {
    DEFAULT_BATCHED_NEWTON_ITERATIONS
}
fn default_batched_tol() -> f64 {
    DEFAULT_BATCHED_NEWTON_TOLERANCE
}
fn default_higher_order_tol() -> f64 {
    1e-8
}
fn default_order() -> u32 {
    3
}
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// Eigendecomposition method of cached eigenbases.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Eigendecomposition {
    /// Symmetric eigendecomposition; with `tolerance > 0`, skipped while the
    /// current basis still fits (relative off-diagonal norm of `Q^T A Q`).
    Eigh {
        /// Adaptive-update tolerance, in [0, 1] (0: always recompute).
        #[serde(default)]
        tolerance: f64,
        /// How rank-deficient factors are handled.
        #[serde(default)]
        rank_deficient_stability: RankDeficientStability,
    },
    /// Warm-started QR (simultaneous) iteration from the current basis.
    Qr {
        /// Iterations at most.
        #[serde(default = "default_qr_iters")]
        max_iterations: u32,
        /// Stop once the relative off-diagonal norm is at most this.
        #[serde(default)]
        tolerance: f64,
        /// How rank-deficient factors are handled.
        #[serde(default)]
        rank_deficient_stability: RankDeficientStability,
    },
}

fn default_qr_iters() -> u32 {
    1
}

impl Default for Eigendecomposition {
    fn default() -> Self {
        Eigendecomposition::Eigh {
            tolerance: 0.0,
            rank_deficient_stability: RankDeficientStability::default(),
        }
    }
}

impl Eigendecomposition {
    /// The adaptive or QR stopping tolerance.
    pub fn tolerance(&self) -> f64 {
        match *self {
            Eigendecomposition::Eigh { tolerance, .. }
            | Eigendecomposition::Qr { tolerance, .. } => tolerance,
        }
    }
    /// How rank-deficient factors are handled.
    pub fn rank_deficient_stability(&self) -> RankDeficientStability {
        match *self {
            Eigendecomposition::Eigh {
                rank_deficient_stability,
                ..
            }
            | Eigendecomposition::Qr {
                rank_deficient_stability,
                ..
            } => rank_deficient_stability,
        }
    }
}

/// How eigenvalue-based roots treat (nearly) singular factors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RankDeficientStability {
    /// Damping by `epsilon`, before the decomposition (`A + eps I`, then a
    /// shift if the smallest eigenvalue is below `eps`) or after it (always
    /// `lambda - min(lambda_min, 0) + eps`).
    Perturbation {
        /// Add `eps I` before decomposing (default true).
        #[serde(default = "default_true")]
        perturb_before_computation: bool,
    },
    /// Pseudo-inverse: eigenvalues at or below
    /// `max(rank_rtol * max(lambda_max, 0), rank_atol)` are dropped
    /// (`epsilon` must be 0).
    PseudoInverse {
        /// Absolute cutoff.
        #[serde(default)]
        rank_atol: f64,
        /// Relative cutoff; `null` means `n * machine epsilon` for an `n x n`
        /// factor.
        #[serde(default = "default_rtol")]
        rank_rtol: Option<f64>,
    },
}

fn default_true() -> bool {
    true
}
fn default_rtol() -> Option<f64> {
    Some(0.0)
}

impl Default for RankDeficientStability {
    fn default() -> Self {
        RankDeficientStability::Perturbation {
            perturb_before_computation: true,
        }
    }
}

impl RankDeficientStability {
    fn is_default(&self) -> bool {
        *self == RankDeficientStability::default()
    }
    /// Whether `epsilon I` is added before decomposing.
    pub fn perturbs_before(&self) -> bool {
        matches!(
            self,
            RankDeficientStability::Perturbation {
                perturb_before_computation: true
            }
        )
    }
    fn is_pseudo_inverse(&self) -> bool {
        matches!(self, RankDeficientStability::PseudoInverse { .. })
    }
}

/// How spectral descent orthogonalizes a block.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Orthogonalization {
    /// Newton-Schulz iteration `X <- a X + b (X X^T) X + c (X X^T)^2 X`.
    NewtonSchulz {
        /// Iterations.
        #[serde(default = "default_ns_iters")]
        num_iterations: u32,
        /// `[a, b, c]` (Muon's by default).
        #[serde(default = "default_ns_coefficients")]
        coefficients: [f64; 3],
    },
    /// `U V^T` of the reduced SVD.
    Svd {
        /// Multiply by the sum of the singular values.
        #[serde(default)]
        scale_by_nuclear_norm: bool,
    },
}

fn default_ns_iters() -> u32 {
    5
}
fn default_ns_coefficients() -> [f64; 3] {
    [3.4445, -4.775, 2.0315]
}

impl Default for Orthogonalization {
    fn default() -> Self {
        Orthogonalization::NewtonSchulz {
            num_iterations: default_ns_iters(),
            coefficients: default_ns_coefficients(),
        }
    }
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

/// The options every Shampoo-family preconditioner shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShampooOptions {
    /// `Some(exponent)` when trace scaling is on.
    pub trace_scaling: Option<f64>,
    /// `drop_weighting_factor_on_gsquare`.
    pub drop_weighting_factor: bool,
}

/// What a preconditioner computes at its amortized (root-inverse) steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amortized {
    /// Inverse roots `X_k` (root_inv, KL root_inv).
    RootInverse(RootInverse),
    /// Eigenpairs, from which `X_k` are formed (eigendecomposed, KL
    /// eigendecomposed).
    Eigenpairs(Eigendecomposition),
    /// Eigenbases only (eigenvalue-corrected).
    Eigenbasis(Eigendecomposition),
    /// Nothing (spectral and sign descent).
    None,
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

    /// The learning rate of step `t` (1-based): `lr_schedule[t - 1]` while
    /// the schedule lasts, else `lr`.
    pub fn lr_at(&self, t: u64) -> f64 {
        self.lr_schedule
            .as_ref()
            .and_then(|s| s.get((t as usize).checked_sub(1)?))
            .copied()
            .unwrap_or(self.lr)
    }

    /// `beta3` with `-1` resolved to `beta1`.
    pub fn beta3(&self) -> f64 {
        if self.beta3 == -1.0 {
            self.betas[0]
        } else {
            self.beta3
        }
    }

    /// The shared Shampoo-family options (`None` for spectral and sign
    /// descent).
    pub fn shampoo_options(&self) -> Option<ShampooOptions> {
        let (use_trace, exponent, drop) = match &self.preconditioner {
            Preconditioner::RootInv {
                use_trace_scaling,
                trace_scaling_exponent,
                drop_weighting_factor_on_gsquare,
                ..
            }
            | Preconditioner::Eigendecomposed {
                use_trace_scaling,
                trace_scaling_exponent,
                drop_weighting_factor_on_gsquare,
                ..
            }
            | Preconditioner::EigenvalueCorrected {
                use_trace_scaling,
                trace_scaling_exponent,
                drop_weighting_factor_on_gsquare,
                ..
            }
            | Preconditioner::KlShampoo {
                use_trace_scaling,
                trace_scaling_exponent,
                drop_weighting_factor_on_gsquare,
                ..
            } => (
                *use_trace_scaling,
                *trace_scaling_exponent,
                *drop_weighting_factor_on_gsquare,
            ),
            Preconditioner::SpectralDescent { .. } | Preconditioner::SignDescent => return None,
        };
        Some(ShampooOptions {
            trace_scaling: use_trace.then_some(exponent),
            drop_weighting_factor: drop,
        })
    }

    /// What the preconditioner computes at amortized steps.
    pub fn amortized(&self) -> Amortized {
        match &self.preconditioner {
            Preconditioner::RootInv { root_inverse, .. } => Amortized::RootInverse(*root_inverse),
            Preconditioner::Eigendecomposed {
                eigendecomposition, ..
            } => Amortized::Eigenpairs(*eigendecomposition),
            Preconditioner::EigenvalueCorrected {
                eigendecomposition, ..
            } => Amortized::Eigenbasis(*eigendecomposition),
            Preconditioner::KlShampoo {
                variant: KlVariant::RootInv,
                root_inverse,
                ..
            } => Amortized::RootInverse(root_inverse.unwrap_or_default()),
            Preconditioner::KlShampoo {
                variant: KlVariant::Eigendecomposed,
                eigendecomposition,
                ..
            } => Amortized::Eigenpairs(eigendecomposition.unwrap_or_default()),
            Preconditioner::SpectralDescent { .. } | Preconditioner::SignDescent => Amortized::None,
        }
    }

    /// Whether the factor statistics are KL-Shampoo's.
    pub fn is_kl(&self) -> bool {
        matches!(self.preconditioner, Preconditioner::KlShampoo { .. })
    }

    /// Whether the preconditioner is eigenvalue-corrected (SOAP).
    pub fn is_eigenvalue_corrected(&self) -> bool {
        matches!(
            self.preconditioner,
            Preconditioner::EigenvalueCorrected { .. }
        )
    }

    /// The precondition frequency in effect (1 for spectral and sign
    /// descent, which have nothing to amortize).
    pub fn effective_frequency(&self) -> u64 {
        match self.preconditioner {
            Preconditioner::SpectralDescent { .. } | Preconditioner::SignDescent => 1,
            _ => self.precondition_frequency,
        }
    }

    /// The rank-deficient stability rule of eigenvalue-based roots.
    pub fn rank_deficient_stability(&self) -> RankDeficientStability {
        match self.amortized() {
            Amortized::RootInverse(RootInverse::Eigh {
                rank_deficient_stability,
                ..
            }) => rank_deficient_stability,
            Amortized::Eigenpairs(e) | Amortized::Eigenbasis(e) => e.rank_deficient_stability(),
            _ => RankDeficientStability::default(),
        }
    }

    /// Operand precision of the factor statistics.
    pub fn statistics_precision(&self) -> crate::backend::Precision {
        self.matmul_precision().statistics
    }

    /// Operand precision of the preconditioning products.
    pub fn preconditioning_precision(&self) -> crate::backend::Precision {
        self.matmul_precision().preconditioning
    }

    /// Operand precision of the matrix-only root iterations.
    pub fn root_precision(&self) -> crate::backend::Precision {
        self.matmul_precision().root_iteration
    }

    fn matmul_precision(&self) -> MatmulPrecision {
        use crate::backend::Precision;
        match (self.precision, self.tf32) {
            (Some(p), _) => p,
            (None, true) => MatmulPrecision {
                statistics: Precision::Tf32,
                preconditioning: Precision::Tf32,
                root_iteration: Precision::F32,
            },
            (None, false) => MatmulPrecision::default(),
        }
    }

    fn validate_precision(&self) -> Result<()> {
        if self.tf32 && self.precision.is_some() {
            return Err(Error::config(
                "give either tf32 or precision, not both (tf32: true is precision {\"statistics\": \"tf32\", \"preconditioning\": \"tf32\"})",
            ));
        }
        if self.statistics_precision() == crate::backend::Precision::Bf16 {
            return Err(Error::config(
                "precision.statistics must be f32 or tf32: the statistics accumulate squared gradients, which bf16 operands would round to 8 significant bits",
            ));
        }
        Ok(())
    }

    /// Checks every value against the published implementation's rules.
    pub fn validate(&self) -> Result<()> {
        self.validate_precision()?;
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
        if let Some((k, v)) = self
            .lr_schedule
            .iter()
            .flatten()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || **v < 0.0)
        {
            return Err(Error::config(format!(
                "lr_schedule[{k}] must be finite and >= 0, got {v:?}"
            )));
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
        if self.beta3 != -1.0 && !(0.0..1.0).contains(&self.beta3) {
            return Err(Error::config(format!(
                "beta3 must be -1 (= betas[0]) or in [0, 1), got {:?}",
                self.beta3
            )));
        }
        self.validate_epsilon()?;
        fin("weight_decay", self.weight_decay)?;
        if self.weight_decay < 0.0 {
            return Err(Error::config(format!(
                "weight_decay must be >= 0, got {:?}",
                self.weight_decay
            )));
        }
        if matches!(
            self.weight_decay_type,
            WeightDecayType::Corrected | WeightDecayType::Independent
        ) && self.lr <= 0.0
        {
            return Err(Error::config(format!(
                "weight_decay_type {:?} divides by the peak learning rate: lr must be > 0, got {:?}",
                self.weight_decay_type, self.lr
            )));
        }
        if self.max_preconditioner_dim < 1 {
            return Err(Error::config("max_preconditioner_dim must be >= 1, got 0"));
        }
        if self.precondition_frequency < 1 {
            return Err(Error::config("precondition_frequency must be >= 1, got 0"));
        }
        if let StartStep::At(s) = self.start_preconditioning_step
            && s < self.effective_frequency()
        {
            return Err(Error::config(format!(
                "start_preconditioning_step must be -1 or >= precondition_frequency ({}), got {s}",
                self.effective_frequency()
            )));
        }
        match self.grafting {
            None | Some(Grafting::Sgd) => {}
            Some(Grafting::Adagrad { epsilon }) => graft_eps("adagrad", epsilon)?,
            Some(Grafting::Rmsprop { beta2, epsilon, .. }) => {
                graft_beta2("rmsprop", beta2)?;
                graft_eps("rmsprop", epsilon)?;
            }
            Some(Grafting::Adam { beta2, epsilon, .. }) => {
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
        self.validate_iterate_averaging()?;
        self.validate_preconditioner()
    }

    fn validate_epsilon(&self) -> Result<()> {
        let eps = self.epsilon;
        if !eps.is_finite() {
            return Err(Error::config(format!(
                "epsilon must be finite, got {eps:?}"
            )));
        }
        let pseudo = self.rank_deficient_stability().is_pseudo_inverse();
        if pseudo && eps != 0.0 {
            return Err(Error::config(format!(
                "a pseudo_inverse rank_deficient_stability needs epsilon = 0, got {eps:?}"
            )));
        }
        if !pseudo && eps <= 0.0 {
            return Err(Error::config(format!(
                "epsilon must be > 0, got {eps:?} (0 only with a pseudo_inverse rank_deficient_stability)"
            )));
        }
        Ok(())
    }

    fn validate_iterate_averaging(&self) -> Result<()> {
        let Some(avg) = self.iterate_averaging else {
            return Ok(());
        };
        if self.momentum.is_some() {
            return Err(Error::config(
                "momentum and iterate_averaging are exclusive (the published optimizer has one iterate_averaging_config): set one of them to null",
            ));
        }
        let mu_y = avg.train_interp_coeff();
        if !(mu_y > 0.0 && mu_y <= 1.0) {
            return Err(Error::config(format!(
                "iterate_averaging.train_interp_coeff must be in (0, 1], got {mu_y:?}"
            )));
        }
        match avg {
            IterateAveraging::Gpa {
                eval_interp_coeff, ..
            } => {
                if !(0.0..1.0).contains(&eval_interp_coeff) {
                    return Err(Error::config(format!(
                        "iterate_averaging.eval_interp_coeff must be in [0, 1), got {eval_interp_coeff:?}"
                    )));
                }
            }
            IterateAveraging::ScheduleFree {
                eval_coeff_lr_power,
                ..
            } => {
                if !eval_coeff_lr_power.is_finite() {
                    return Err(Error::config(format!(
                        "iterate_averaging.eval_coeff_lr_power must be finite, got {eval_coeff_lr_power:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn validate_preconditioner(&self) -> Result<()> {
        if let Some(opts) = self.shampoo_options()
            && let Some(e) = opts.trace_scaling
            && !(e > 0.0 && e <= 1.0)
        {
            return Err(Error::config(format!(
                "trace_scaling_exponent must be in (0, 1] with use_trace_scaling, got {e:?}"
            )));
        }
        match &self.preconditioner {
            Preconditioner::RootInv {
                root_inverse,
                inverse_exponent_override,
                ..
            } => {
                validate_root_inverse(root_inverse)?;
                validate_overrides(inverse_exponent_override, Some(root_inverse))
            }
            Preconditioner::Eigendecomposed {
                eigendecomposition,
                inverse_exponent_override,
                ..
            } => {
                validate_eigendecomposition(eigendecomposition)?;
                validate_overrides(inverse_exponent_override, None)
            }
            Preconditioner::KlShampoo {
                variant,
                root_inverse,
                eigendecomposition,
                inverse_exponent_override,
                ..
            } => {
                match (variant, root_inverse, eigendecomposition) {
                    (KlVariant::RootInv, _, Some(_)) => {
                        return Err(Error::config(
                            "kl_shampoo variant \"root_inv\" takes root_inverse, not eigendecomposition",
                        ));
                    }
                    (KlVariant::Eigendecomposed, Some(_), _) => {
                        return Err(Error::config(
                            "kl_shampoo variant \"eigendecomposed\" takes eigendecomposition, not root_inverse",
                        ));
                    }
                    (KlVariant::RootInv, r, None) => {
                        validate_root_inverse(&r.unwrap_or_default())?;
                    }
                    (KlVariant::Eigendecomposed, None, e) => {
                        validate_eigendecomposition(&e.unwrap_or_default())?;
                    }
                }
                let ri = match variant {
                    KlVariant::RootInv => Some(root_inverse.unwrap_or_default()),
                    KlVariant::Eigendecomposed => None,
                };
                validate_overrides(inverse_exponent_override, ri.as_ref())
            }
            Preconditioner::EigenvalueCorrected {
                eigendecomposition,
                ignored_basis_change_dims,
                inverse_exponent_override,
                ..
            } => {
                validate_eigendecomposition(eigendecomposition)?;
                if eigendecomposition
                    .rank_deficient_stability()
                    .is_pseudo_inverse()
                {
                    return Err(Error::config(
                        "eigenvalue_corrected does not accept a pseudo_inverse rank_deficient_stability (only perturbation)",
                    ));
                }
                for (order_key, dims) in ignored_basis_change_dims {
                    let order = parse_order("ignored_basis_change_dims", order_key, 0)?;
                    let mut seen = Vec::new();
                    for &d in dims {
                        if d > order.saturating_sub(1) {
                            return Err(Error::config(format!(
                                "ignored_basis_change_dims[{order}] has dimension {d}; blocks of order {order} have dimensions 0..={}",
                                order.saturating_sub(1)
                            )));
                        }
                        if seen.contains(&d) {
                            return Err(Error::config(format!(
                                "ignored_basis_change_dims[{order}] lists dimension {d} twice"
                            )));
                        }
                        seen.push(d);
                    }
                }
                for (order_key, &e) in inverse_exponent_override {
                    let order = parse_order("inverse_exponent_override", order_key, 0)?;
                    if !(e.is_finite() && e > 0.0) {
                        return Err(Error::config(format!(
                            "inverse_exponent_override[{order}] of eigenvalue_corrected must be finite and > 0, got {e:?}"
                        )));
                    }
                }
                Ok(())
            }
            Preconditioner::SpectralDescent { orthogonalization } => match orthogonalization {
                Orthogonalization::NewtonSchulz { coefficients, .. } => {
                    if coefficients.iter().any(|c| !c.is_finite()) {
                        return Err(Error::config(format!(
                            "orthogonalization.coefficients must be finite, got {coefficients:?}"
                        )));
                    }
                    Ok(())
                }
                Orthogonalization::Svd { .. } => Ok(()),
            },
            Preconditioner::SignDescent => Ok(()),
        }
    }

    /// The first preconditioned step, `None` for never.
    pub fn start_step(&self) -> Option<u64> {
        match self.start_preconditioning_step {
            StartStep::Default => Some(self.effective_frequency()),
            StartStep::At(s) => Some(s),
            StartStep::Never => None,
        }
    }

    /// Inverse exponent of dimension `dim` of a block of order `order`
    /// (`1 / (2 * order)` unless overridden; 0 means the dimension has no
    /// factor). For eigenvalue-corrected Shampoo every dimension that is not
    /// in `ignored_basis_change_dims` has a factor (exponent 1/2, unused);
    /// spectral and sign descent have none.
    pub fn inverse_exponent(&self, order: usize, dim: usize) -> f64 {
        let default = 1.0 / (2.0 * order as f64);
        let overrides = match &self.preconditioner {
            Preconditioner::RootInv {
                inverse_exponent_override,
                ..
            }
            | Preconditioner::Eigendecomposed {
                inverse_exponent_override,
                ..
            }
            | Preconditioner::KlShampoo {
                inverse_exponent_override,
                ..
            } => inverse_exponent_override,
            Preconditioner::EigenvalueCorrected {
                ignored_basis_change_dims,
                ..
            } => {
                let ignored = ignored_basis_change_dims
                    .get(&order.to_string())
                    .is_some_and(|d| d.contains(&dim));
                return if ignored { 0.0 } else { 0.5 };
            }
            Preconditioner::SpectralDescent { .. } | Preconditioner::SignDescent => return 0.0,
        };
        match overrides.get(&order.to_string()) {
            Some(ExponentOverride::All(e)) => *e,
            Some(ExponentOverride::PerDim(m)) => {
                m.get(&dim.to_string()).copied().unwrap_or(default)
            }
            None => default,
        }
    }

    /// Eigenvalue-corrected Shampoo's exponent on `D / bc2` for blocks of
    /// order `order`: 1/2 unless overridden, evaluated as `1 / (1 / e)` as
    /// the published implementation does.
    pub fn eigenvalue_exponent(&self, order: usize) -> f64 {
        match &self.preconditioner {
            Preconditioner::EigenvalueCorrected {
                inverse_exponent_override,
                ..
            } => inverse_exponent_override
                .get(&order.to_string())
                .map_or(0.5, |e| 1.0 / (1.0 / e)),
            _ => 0.5,
        }
    }

    /// The factor dtype for parameters of dtype `param`.
    pub fn factor_dtype_for(&self, param: DType) -> DType {
        self.factor_dtype.unwrap_or(param)
    }
}

fn validate_root_inverse(r: &RootInverse) -> Result<()> {
    match *r {
        RootInverse::Eigh { tolerance, .. } => {
            if tolerance != 0.0 {
                return Err(Error::config(format!(
                    "root_inverse eigh has no adaptive tolerance (got {tolerance:?}): adaptive eigenbasis updates need cached eigenvectors, use preconditioner type \"eigendecomposed\" with eigendecomposition {{\"method\": \"eigh\", \"tolerance\": ...}}"
                )));
            }
        }
        RootInverse::CoupledNewton {
            max_iterations,
            tolerance,
        } => {
            if max_iterations < 1 {
                return Err(Error::config(
                    "coupled_newton.max_iterations must be >= 1, got 0",
                ));
            }
            if !tolerance.is_finite() || tolerance < 0.0 {
                return Err(Error::config(format!(
                    "coupled_newton.tolerance must be finite and >= 0, got {tolerance:?}"
                )));
            }
        }
        RootInverse::CoupledHigherOrder {
            rel_epsilon,
            abs_epsilon,
            max_iterations,
            tolerance,
            order,
        } => {
            for (name, v) in [
                ("rel_epsilon", rel_epsilon),
                ("abs_epsilon", abs_epsilon),
                ("tolerance", tolerance),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(Error::config(format!(
                        "coupled_higher_order.{name} must be finite and >= 0, got {v:?}"
                    )));
                }
            }
            if max_iterations < 1 {
                return Err(Error::config(
                    "coupled_higher_order.max_iterations must be >= 1, got 0",
                ));
            }
            if order < 2 {
                return Err(Error::config(format!(
                    "coupled_higher_order.order must be >= 2 (2 is Newton's method), got {order}"
                )));
            }
        }
        RootInverse::BatchedNewton {
            iterations,
            tolerance,
        } => {
            if !(1..=MAX_BATCHED_NEWTON_ITERATIONS).contains(&iterations) {
                return Err(Error::config(format!(
                    "batched_newton.iterations must be in 1..={MAX_BATCHED_NEWTON_ITERATIONS}, got {iterations}"
                )));
            }
            if !tolerance.is_finite() || tolerance <= 0.0 {
                return Err(Error::config(format!(
                    "batched_newton.tolerance must be finite and > 0 (the largest accepted max |M - I|), got {tolerance:?}"
                )));
            }
        }
    }
    Ok(())
}

fn validate_eigendecomposition(e: &Eigendecomposition) -> Result<()> {
    let t = e.tolerance();
    if !(0.0..=1.0).contains(&t) {
        return Err(Error::config(format!(
            "eigendecomposition.tolerance must be in [0, 1], got {t:?}"
        )));
    }
    if let RankDeficientStability::PseudoInverse {
        rank_atol,
        rank_rtol,
    } = e.rank_deficient_stability()
    {
        if !rank_atol.is_finite() || rank_atol < 0.0 {
            return Err(Error::config(format!(
                "pseudo_inverse.rank_atol must be finite and >= 0, got {rank_atol:?}"
            )));
        }
        if let Some(r) = rank_rtol
            && (!r.is_finite() || r < 0.0)
        {
            return Err(Error::config(format!(
                "pseudo_inverse.rank_rtol must be null or finite and >= 0, got {r:?}"
            )));
        }
    }
    Ok(())
}

fn parse_order(what: &str, key: &str, min: usize) -> Result<usize> {
    key.parse().ok().filter(|o| *o >= min).ok_or_else(|| {
        Error::config(format!(
            "{what} key {key:?} must be a block order (an integer >= {min})"
        ))
    })
}

/// Checks `inverse_exponent_override` of the Shampoo preconditioners whose
/// factors have root inverses; `root` is the root-inverse method when the
/// roots are computed by one (iterations need special roots).
fn validate_overrides(
    overrides: &BTreeMap<String, ExponentOverride>,
    root: Option<&RootInverse>,
) -> Result<()> {
    let newton = match root {
        Some(RootInverse::CoupledNewton { .. }) => Some("coupled_newton"),
        Some(RootInverse::BatchedNewton { .. }) => Some("batched_newton"),
        _ => None,
    };
    let higher = matches!(root, Some(RootInverse::CoupledHigherOrder { .. }));
    for (order_key, ov) in overrides {
        let order = parse_order("inverse_exponent_override", order_key, 1)?;
        let check = |what: String, e: f64| -> Result<()> {
            if !e.is_finite() || e < 0.0 {
                return Err(Error::config(format!(
                    "inverse_exponent_override {what} must be finite and >= 0, got {e:?}"
                )));
            }
            if let Some(method) = newton
                && e != 0.0
                && !is_integer_root(e)
            {
                return Err(Error::config(format!(
                    "inverse_exponent_override {what} = {e}: {method} needs 1/exponent to be an integer"
                )));
            }
            if higher && e != 0.0 && root_fraction(e).is_none() {
                return Err(Error::config(format!(
                    "inverse_exponent_override {what} = {e}: coupled_higher_order needs 1/exponent to be a short binary fraction p/q (p, q <= {MAX_ROOT_TERM}), e.g. 4 or 2.5"
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
    Ok(())
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

/// Largest numerator or denominator of a higher-order root.
pub const MAX_ROOT_TERM: u64 = 1024;

/// `1 / e` as the exact fraction `p / q` of its float64 value (as Python's
/// `Fraction(1 / e)`), when both terms are at most [`MAX_ROOT_TERM`].
pub fn root_fraction(e: f64) -> Option<(u64, u64)> {
    let r = 1.0 / e;
    if !(r.is_finite() && r > 0.0) {
        return None;
    }
    // r = m * 2^k exactly; reduce.
    let bits = r.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64;
    let frac = bits & ((1u64 << 52) - 1);
    let (mut m, mut k) = if exp == 0 {
        (frac, -1074i64)
    } else {
        (frac | (1u64 << 52), exp - 1075)
    };
    while m % 2 == 0 && k < 0 {
        m /= 2;
        k += 1;
    }
    let (p, q) = if k >= 0 {
        (m.checked_shl(k as u32).filter(|v| v >> k == m)?, 1)
    } else if -k < 64 {
        (m, 1u64 << (-k))
    } else {
        return None;
    };
    (p <= MAX_ROOT_TERM && q <= MAX_ROOT_TERM).then_some((p, q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_exact_binary_fractions() {
        assert_eq!(root_fraction(0.25), Some((4, 1)));
        assert_eq!(root_fraction(0.4), Some((5, 2)));
        assert_eq!(root_fraction(1.0 / 6.0), Some((6, 1)));
        assert_eq!(root_fraction(0.5), Some((2, 1)));
        assert_eq!(root_fraction(2.0), Some((1, 2)));
        assert_eq!(root_fraction(0.3), None, "1/0.3 has a 2^51 denominator");
    }

    #[test]
    fn lr_schedule_gives_each_steps_lr() {
        let c = ShampooConfig {
            lr: 0.5,
            lr_schedule: Some(vec![0.1, 0.2]),
            ..Default::default()
        };
        assert_eq!([c.lr_at(1), c.lr_at(2), c.lr_at(3)], [0.1, 0.2, 0.5]);
    }
}
