//! Option values checked before any work starts: ranges of the
//! hyperparameters, and combinations of model and dataset that cannot run.

use crate::error::{Error, Result};
use crate::model::ModelKind;
use crate::train::{DatasetKind, TrainConfig};

fn invalid(msg: String) -> Result<()> {
    Err(Error::Invalid(msg))
}

/// `x` finite and in `[lo, hi)`.
fn in_unit(name: &str, x: f64) -> Result<()> {
    if !(x.is_finite() && (0.0..1.0).contains(&x)) {
        return invalid(format!("{name} must be in [0, 1), got {x}"));
    }
    Ok(())
}

/// Checks every option of `cfg` that has a valid range, and that the model
/// fits the dataset's images.
pub fn check(cfg: &TrainConfig) -> Result<()> {
    if cfg.threads == Some(0) {
        return invalid("--threads must be at least 1".into());
    }
    // Any positive size runs (the ResNets' strided layers keep at least one
    // pixel); 0 would crop nothing.
    if cfg.resolution == 0 {
        return invalid("--resolution must be at least 1 pixel, got 0".into());
    }
    match (cfg.dataset, cfg.model_kind()) {
        (DatasetKind::FashionMnist, m @ (ModelKind::Resnet18 | ModelKind::Resnet50)) => {
            return invalid(format!(
                "--model {} expects 3-channel (RGB) images, but fashion-mnist images have 1 channel; use --model cnn",
                m.name()
            ));
        }
        (DatasetKind::Imagenet, ModelKind::Cnn) => {
            return invalid(
                "--model cnn is for the 28x28 grey Fashion-MNIST images; use --model resnet18 or resnet50"
                    .into(),
            );
        }
        _ => {}
    }
    if let Some(wd) = cfg.weight_decay.filter(|w| !(w.is_finite() && *w >= 0.0)) {
        return invalid(format!("--weight-decay must be finite and >= 0, got {wd}"));
    }
    in_unit("--momentum", cfg.momentum)?;
    in_unit("--beta1", cfg.betas.0)?;
    in_unit("--beta2", cfg.betas.1)?;
    if !(cfg.adam_eps.is_finite() && cfg.adam_eps > 0.0) {
        return invalid(format!(
            "--adam-eps must be finite and > 0, got {}",
            cfg.adam_eps
        ));
    }
    if !(cfg.decay_gamma.is_finite() && cfg.decay_gamma > 0.0 && cfg.decay_gamma <= 1.0) {
        return invalid(format!(
            "--decay-gamma must be in (0, 1], got {}",
            cfg.decay_gamma
        ));
    }
    for (name, v) in [
        ("--decay-steps", cfg.decay_steps),
        ("--checkpoint-every", cfg.checkpoint_every),
        ("--eval-every", cfg.eval_every),
    ] {
        if v == Some(0) {
            return invalid(format!("{name} must be at least 1"));
        }
    }
    Ok(())
}
