//! The communicator the training loop uses: `shampoo_dist`'s, from the
//! variables `shampoo-run` (or torchrun) sets.

use crate::error::{Error, Result};
use std::sync::Arc;
use tch::{Kind, Tensor};

pub use shampoo_dist::{CommOptions, Communicator, SingleProcess};

/// The communicator the launcher's variables describe (one process without
/// them).
pub fn from_env() -> Result<Arc<dyn Communicator>> {
    Ok(shampoo_dist::communicator_from_env(&CommOptions::default())?)
}

/// A world of one.
pub fn single() -> Arc<dyn Communicator> {
    Arc::new(SingleProcess)
}

/// Averages every gradient of `vs` over the ranks, as one flat float32
/// all-reduce (baseline optimizers; Shampoo averages its own).
pub fn all_reduce_gradients(vs: &tch::nn::VarStore, comm: &dyn Communicator) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let grads: Vec<Tensor> = vs.trainable_variables().iter().map(Tensor::grad).collect();
    let mut flat = Vec::new();
    let mut sizes = Vec::with_capacity(grads.len());
    for g in &grads {
        if !g.defined() {
            return Err(Error::Invalid(
                "a variable has no gradient; every rank must compute every gradient".into(),
            ));
        }
        if g.kind() != Kind::Float {
            return Err(Error::Invalid(format!(
                "gradient of kind {:?}; float32 expected",
                g.kind()
            )));
        }
        let v = Vec::<f32>::try_from(g.f_flatten(0, -1)?.f_to_device(tch::Device::Cpu)?)?;
        sizes.push(v.len());
        flat.extend_from_slice(&v);
    }
    comm.all_reduce_mean(&mut flat)?;
    let mut off = 0;
    tch::no_grad(|| -> Result<()> {
        for (g, n) in grads.iter().zip(sizes) {
            let src = Tensor::from_slice(&flat[off..off + n])
                .f_view_as(g)?
                .f_to_device(g.device())?;
            let mut g = g.shallow_clone();
            g.f_copy_(&src)?;
            off += n;
        }
        Ok(())
    })
}
