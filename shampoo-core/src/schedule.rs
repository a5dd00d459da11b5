//! Per-step scalars: what a step does and with which constants.
//!
//! The published implementation holds the learning rate and every bias
//! correction `1 - beta^t` as float32 numbers, even when parameters and
//! factors are float64. [`StepScalars`] reproduces that rounding, so that a
//! float64 run matches the reference trajectories to about 1e-14 instead of
//! a few 1e-6.

use crate::config::{Grafting, Preconditioner, ShampooConfig};

/// Rounds through float32, as the published implementation's scalars are.
pub fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

/// `1 - beta^t` computed in float32.
pub fn bias_correction(beta: f64, t: u64) -> f64 {
    (1.0f32 - (beta as f32).powf(t as f32)) as f64
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
}

impl StepScalars {
    /// The scalars of step `t` under `config`.
    pub fn new(config: &ShampooConfig, t: u64) -> Self {
        let [beta1, beta2] = config.betas;
        let bc1 = if config.use_bias_correction && beta1 != 0.0 {
            bias_correction(beta1, t)
        } else {
            1.0
        };
        let bc2 = if config.use_bias_correction && beta2 < 1.0 {
            bias_correction(beta2, t)
        } else {
            1.0
        };
        let graft_bc = match config.grafting {
            Some(Grafting::Adam { beta2, .. }) if beta2 < 1.0 => bias_correction(beta2, t),
            _ => 1.0,
        };
        let f = config.precondition_frequency;
        let (root_inverse, before_start) = match config.start_step() {
            Some(s) => ((t.is_multiple_of(f) && t > s) || t == s, t < s),
            None => (false, true),
        };
        StepScalars {
            t,
            lr: f32_round(config.lr),
            bc1,
            bc2,
            graft_bc,
            root_inverse,
            before_start,
        }
    }

    /// Whether this step uses the grafting direction alone.
    pub fn graft_only(&self, config: &ShampooConfig) -> bool {
        self.before_start && config.grafting.is_some()
    }

    /// Whether Shampoo's preconditioned direction is computed this step.
    pub fn uses_preconditioner(&self, config: &ShampooConfig) -> bool {
        match config.preconditioner {
            // Eigenvalue-corrected Shampoo is diagonal Adam in the identity
            // basis before its first basis, so it always runs.
            Preconditioner::EigenvalueCorrected => !self.graft_only(config),
            Preconditioner::RootInv { .. } => !self.before_start,
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
            .filter(|&t| StepScalars::new(&c, t).root_inverse)
            .collect();
        assert_eq!(roots, vec![6, 9, 12]);
        c.start_preconditioning_step = StartStep::At(4);
        let roots: Vec<u64> = (1..=13)
            .filter(|&t| StepScalars::new(&c, t).root_inverse)
            .collect();
        assert_eq!(
            roots,
            vec![4, 6, 9, 12],
            "t == s, then multiples of f after s"
        );
        c.start_preconditioning_step = StartStep::Default;
        let roots: Vec<u64> = (1..=7)
            .filter(|&t| StepScalars::new(&c, t).root_inverse)
            .collect();
        assert_eq!(roots, vec![3, 6]);
        assert!(StepScalars::new(&c, 2).before_start);
        assert!(!StepScalars::new(&c, 3).before_start);
        c.start_preconditioning_step = StartStep::Never;
        assert!((1..100).all(|t| {
            let s = StepScalars::new(&c, t);
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
            }),
            ..Default::default()
        };
        let s = StepScalars::new(&c, 2);
        assert_eq!((s.bc1, s.bc2), (1.0, 1.0));
        assert_ne!(s.graft_bc, 1.0, "Adam grafting is always bias-corrected");
        assert_eq!(s.lr, 0.01f32 as f64);
    }
}
