//! Per-step scalars: what a step does and with which constants.
//!
//! The published implementation holds the learning rate and every bias
//! correction `1 - beta^t` as float32 numbers, even when parameters and
//! factors are float64. [`StepScalars`] reproduces that rounding, so that a
//! float64 run matches the reference trajectories to about 1e-14 instead of
//! a few 1e-6.

use crate::config::{Grafting, IterateAveraging, ShampooConfig, WeightDecayType};

/// Rounds through float32, as the published implementation's scalars are.
pub fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

/// `1 - beta^t` computed in float32.
pub fn bias_correction(beta: f64, t: u64) -> f64 {
    (1.0f32 - (beta as f32).powf(t as f32)) as f64
}

/// The filtered gradient's `1 - beta3 beta1^(t-1)` in float32 (with
/// `beta3 = beta1` this is `1 - beta1^t` up to float32 rounding).
pub fn bias_correction_beta3(beta1: f64, beta3: f64, t: u64) -> f64 {
    let p = (beta1 as f32).powf(t.saturating_sub(1) as f32);
    (1.0f32 - (beta3 as f32) * p) as f64
}

/// `x^e` as PyTorch's `pow` computes it on a float32 scalar: the exponents
/// it special-cases (1/2, 2, 3, -1/2, -1, -2) exactly as they are
/// special-cased, the rest with `powf`.
pub fn torch_pow_f32(x: f32, e: f64) -> f32 {
    match e {
        1.0 => x,
        2.0 => x * x,
        3.0 => x * x * x,
        0.5 => x.sqrt(),
        -0.5 => 1.0 / x.sqrt(),
        -1.0 => 1.0 / x,
        -2.0 => 1.0 / (x * x),
        _ => x.powf(e as f32),
    }
}

/// Iterate averaging's coefficients of one step, all float32 numbers as in
/// the published implementation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AveragingScalars {
    /// `1 - mu_y mu_x`: the weight of `-lr P` in the parameter increment.
    pub c1: f64,
    /// `1 - mu_x`: the weight of `Z - W`.
    pub c2: f64,
    /// `1 - lr alpha`: weight decay's shrink of `Z`, when there is one.
    pub shrink: Option<f64>,
}

impl AveragingScalars {
    /// The coefficients of a step with learning rate `lr32` (already
    /// float32), updating the Schedule-Free running sum `lr_sum`.
    pub fn step(avg: &IterateAveraging, lr32: f64, lr_sum: &mut f32, alpha: Option<f64>) -> Self {
        let mu_y = avg.train_interp_coeff() as f32;
        let mu_x = match *avg {
            IterateAveraging::Gpa {
                eval_interp_coeff, ..
            } => eval_interp_coeff as f32,
            IterateAveraging::ScheduleFree {
                eval_coeff_lr_power,
                ..
            } => {
                let p = torch_pow_f32(lr32 as f32, eval_coeff_lr_power);
                *lr_sum += p;
                1.0f32 - p / *lr_sum
            }
        };
        AveragingScalars {
            c1: (1.0f32 - mu_y * mu_x) as f64,
            c2: (1.0f32 - mu_x) as f64,
            shrink: alpha.map(|a| (1.0f32 - (lr32 as f32) * (a as f32)) as f64),
        }
    }

    /// `1 - 1/mu_y` (train to eval) or `1 - mu_y` (eval to train).
    pub fn switch(avg: &IterateAveraging, to_eval: bool) -> f64 {
        let mu_y = avg.train_interp_coeff() as f32;
        if to_eval {
            (1.0f32 - 1.0f32 / mu_y) as f64
        } else {
            (1.0f32 - mu_y) as f64
        }
    }
}

/// Everything one step needs to know, computed once.
#[derive(Debug, Clone, PartialEq)]
pub struct StepScalars {
    /// The step number (first step: 1).
    pub t: u64,
    /// Learning rate (float32-rounded).
    pub lr: f64,
    /// Divisor of the filtered gradient (1 without bias correction).
    pub bc1: f64,
    /// Divisor of the factor statistics (1 without bias correction or when
    /// beta2 == 1).
    pub bc2: f64,
    /// Divisor of Adam grafting's accumulator.
    pub graft_bc: f64,
    /// Recompute root inverses (or eigenbases) this step.
    pub root_inverse: bool,
    /// Before the first preconditioned step.
    pub before_start: bool,
    /// Weight decay's `alpha` (decoupled, corrected or independent; `None`
    /// without weight decay or with L2).
    pub decay: Option<f64>,
    /// Iterate averaging's coefficients (set by the optimizer, which holds
    /// the running sums).
    pub averaging: Option<AveragingScalars>,
}

impl StepScalars {
    /// The scalars of step `t` under `config` (whose `lr` is this step's
    /// learning rate), for an optimizer built with learning rate `peak_lr`.
    pub fn new(config: &ShampooConfig, t: u64, peak_lr: f64) -> Self {
        let [beta1, beta2] = config.betas;
        let bc1 = if config.use_bias_correction && beta1 != 0.0 {
            bias_correction_beta3(beta1, config.beta3(), t)
        } else {
            1.0
        };
        let drop = config
            .shampoo_options()
            .is_some_and(|o| o.drop_weighting_factor);
        let bc2 = if config.use_bias_correction && beta2 < 1.0 && !drop {
            bias_correction(beta2, t)
        } else {
            1.0
        };
        let graft_bc = match config.grafting {
            Some(Grafting::Adam {
                beta2,
                drop_weighting_factor_on_gsquare: false,
                ..
            }) if beta2 < 1.0 => bias_correction(beta2, t),
            _ => 1.0,
        };
        let lr = f32_round(config.lr);
        let wd = config.weight_decay;
        let decay = (wd != 0.0)
            .then_some(())
            .and_then(|()| match config.weight_decay_type {
                WeightDecayType::L2 => None,
                WeightDecayType::Decoupled => Some(wd),
                WeightDecayType::Corrected => Some(wd * lr / peak_lr),
                WeightDecayType::Independent => Some(wd / peak_lr),
            });
        let f = config.effective_frequency();
        let (root_inverse, before_start) = match config.start_step() {
            Some(s) => ((t.is_multiple_of(f) && t > s) || t == s, t < s),
            None => (false, true),
        };
        StepScalars {
            t,
            lr,
            bc1,
            bc2,
            graft_bc,
            root_inverse,
            before_start,
            decay,
            averaging: None,
        }
    }

    /// Whether this step uses the grafting direction alone.
    pub fn graft_only(&self, config: &ShampooConfig) -> bool {
        self.before_start && config.grafting.is_some()
    }

    /// Whether Shampoo's preconditioned direction is computed this step.
    pub fn uses_preconditioner(&self, config: &ShampooConfig) -> bool {
        if config.is_eigenvalue_corrected() {
            // Eigenvalue-corrected Shampoo is diagonal Adam in the identity
            // basis before its first basis, so it always runs.
            !self.graft_only(config)
        } else {
            !self.before_start
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StartStep;

    #[test]
    fn root_inverse_schedule_follows_the_spec() {
        let mut c = ShampooConfig {
            precondition_frequency: 3,
            start_preconditioning_step: StartStep::At(6),
            ..Default::default()
        };
        let roots: Vec<u64> = (1..=13)
            .filter(|&t| StepScalars::new(&c, t, c.lr).root_inverse)
            .collect();
        assert_eq!(roots, vec![6, 9, 12]);
        c.start_preconditioning_step = StartStep::At(4);
        let roots: Vec<u64> = (1..=13)
            .filter(|&t| StepScalars::new(&c, t, c.lr).root_inverse)
            .collect();
        assert_eq!(
            roots,
            vec![4, 6, 9, 12],
            "t == s, then multiples of f after s"
        );
        c.start_preconditioning_step = StartStep::Default;
        let roots: Vec<u64> = (1..=7)
            .filter(|&t| StepScalars::new(&c, t, c.lr).root_inverse)
            .collect();
        assert_eq!(roots, vec![3, 6]);
        assert!(StepScalars::new(&c, 2, c.lr).before_start);
        assert!(!StepScalars::new(&c, 3, c.lr).before_start);
        c.start_preconditioning_step = StartStep::Never;
        assert!((1..100).all(|t| {
            let s = StepScalars::new(&c, t, c.lr);
            !s.root_inverse && s.before_start
        }));
    }

    #[test]
    fn bias_corrections_are_float32_numbers() {
        let bc = bias_correction(0.999, 3);
        assert_eq!(bc, bc as f32 as f64);
        assert!((bc - (1.0 - 0.999f64.powi(3))).abs() < 1e-7);
        let c = ShampooConfig {
            use_bias_correction: false,
            betas: [0.9, 0.95],
            grafting: Some(Grafting::Adam {
                beta2: 0.999,
                epsilon: 1e-8,
                drop_weighting_factor_on_gsquare: false,
            }),
            ..Default::default()
        };
        let s = StepScalars::new(&c, 2, c.lr);
        assert_eq!((s.bc1, s.bc2), (1.0, 1.0));
        assert_ne!(s.graft_bc, 1.0, "Adam grafting is always bias-corrected");
        assert_eq!(s.lr, 0.01f32 as f64);
    }
}
