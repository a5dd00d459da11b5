//! Divergence: a non-finite loss or gradient never reaches the weights, and
//! non-finite weights never reach a checkpoint.
//!
//! Every step, before the optimizer runs, each rank checks its loss and its
//! gradients (one reduction over all gradients, one device
//! synchronisation) and the ranks agree on the result; a non-finite one
//! stops the run at that step with an error naming it, unless
//! `--skip-nonfinite N` allows skipping it (no update; the step is counted
//! and listed in the metrics and the summary). Before every checkpoint the
//! weights (and the baselines' moments) are checked too, so the last
//! checkpoint written is always finite.

use crate::error::{Error, Result};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Whether every element of every tensor is finite, with one read-back: the
/// sum of each tensor in its own dtype (NaN and Inf propagate into it), and
/// only when a sum is not finite, the exact test (`isfinite`) of those
/// tensors, so that finite values whose sum overflows are not taken for
/// infinities.
pub fn all_finite<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<bool> {
    let tensors: Vec<&Tensor> = tensors
        .into_iter()
        .filter(|t| t.defined() && t.numel() > 0)
        .collect();
    let Some(first) = tensors.first() else {
        return Ok(true);
    };
    let device = first.device();
    let sums = tensors
        .iter()
        .map(|t| {
            t.f_sum(t.f_kind()?)?
                .f_to_kind(Kind::Double)?
                .f_to_device(device)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sums = Tensor::f_stack(&sums, 0)?.f_to_device(tch::Device::Cpu)?;
    let sums = Vec::<f64>::try_from(sums)?;
    for (t, s) in tensors.iter().zip(sums) {
        if !s.is_finite() && t.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether every gradient of the trainable variables of `vs` is finite.
pub fn gradients_finite(vs: &VarStore) -> Result<bool> {
    let grads: Vec<Tensor> = vs.trainable_variables().iter().map(|v| v.grad()).collect();
    all_finite(&grads)
}

/// Steps with a non-finite loss or gradient: skipped while the budget
/// lasts, then an error.
#[derive(Debug, Clone, Default)]
pub struct NonFiniteSteps {
    /// How many may be skipped (`--skip-nonfinite`).
    pub allowed: u64,
    /// The steps skipped so far (over every session of the run).
    pub skipped: Vec<u64>,
}

impl NonFiniteSteps {
    /// Step `step` (1-based) had `what` (say `the loss is NaN`): `Ok` to
    /// skip it, or the error that stops the run. `last_checkpoint` is the
    /// step of the newest checkpoint on disk, if any.
    pub fn on_nonfinite(
        &mut self,
        step: u64,
        what: &str,
        last_checkpoint: Option<u64>,
    ) -> Result<()> {
        if (self.skipped.len() as u64) < self.allowed {
            self.skipped.push(step);
            tracing::warn!(
                "step {step}: {what}; step skipped without an update ({} of the {} --skip-nonfinite allows)",
                self.skipped.len(),
                self.allowed
            );
            return Ok(());
        }
        let kept = match last_checkpoint {
            Some(s) => format!("the last checkpoint (step {s}) is kept"),
            None => "no checkpoint was written".into(),
        };
        let skipped = if self.allowed == 0 {
            "(or skip such steps with --skip-nonfinite N)".to_string()
        } else {
            format!(
                "(steps {} were skipped already, all that --skip-nonfinite {} allows)",
                list(&self.skipped),
                self.allowed
            )
        };
        Err(Error::Diverged {
            step,
            what: what.into(),
            then: format!(
                "the weights were not updated and {kept}; lower --lr or add warmup steps {skipped}"
            ),
        })
    }
}

/// `1, 2, 5`.
fn list(steps: &[u64]) -> String {
    steps
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a non-finite training loss looks like in a message.
pub fn describe_loss(loss: f64) -> String {
    if loss.is_nan() {
        "the loss is NaN".into()
    } else {
        format!("the loss is {loss}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_while_allowed_then_stops_naming_the_steps() {
        let mut g = NonFiniteSteps {
            allowed: 2,
            skipped: Vec::new(),
        };
        g.on_nonfinite(4, "the loss is NaN", Some(3)).unwrap();
        g.on_nonfinite(7, "the loss is NaN", Some(3)).unwrap();
        let e = g.on_nonfinite(9, "the loss is NaN", Some(3)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "training diverged at step 9: the loss is NaN; the weights were not updated and the last checkpoint (step 3) is kept; lower --lr or add warmup steps (steps 4, 7 were skipped already, all that --skip-nonfinite 2 allows)"
        );
        assert_eq!(g.skipped, vec![4, 7]);
    }

    #[test]
    fn nan_and_inf_anywhere_are_found() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let mut b = Tensor::from_slice(&[f32::MAX, f32::MAX]);
        assert!(all_finite([&a, &b]).unwrap());
        let _ = b.f_mul_scalar_(f64::INFINITY).unwrap();
        assert!(!all_finite([&a, &b]).unwrap());
        let nan = Tensor::from_slice(&[0.0f32, f32::NAN]);
        assert!(!all_finite([&a, &nan]).unwrap());
        assert!(all_finite(std::iter::empty::<&Tensor>()).unwrap());
    }
}
