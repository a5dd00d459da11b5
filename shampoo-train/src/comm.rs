//! The communicator the training loop uses: `shampoo_dist`'s, from the
//! variables `shampoo-run` (or torchrun) sets.

use crate::error::Result;
use std::sync::Arc;

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

/// Averages every gradient of `vs` over the ranks (baseline optimizers;
/// Shampoo averages its own), in place (`shampoo_tch::all_reduce_gradients`).
pub fn all_reduce_gradients(vs: &tch::nn::VarStore, comm: &dyn Communicator) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    Ok(shampoo_tch::all_reduce_gradients(vs, comm)?)
}
