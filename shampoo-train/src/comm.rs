//! The communicator the training loop uses (rank, world size, collectives).
//!
//! Placeholder until `shampoo-dist` lands: a single-process communicator with
//! the same method names as `shampoo_dist::Communicator`.

use crate::error::{Error, Result};
use std::sync::Arc;

/// Collectives between the ranks of a job.
pub trait Communicator: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// In-place average over the ranks.
    fn all_reduce_mean_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Waits for every rank.
    fn barrier(&self) -> Result<()>;
}

/// One process.
#[derive(Debug, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// The communicator the launcher's variables describe.
pub fn from_env() -> Result<Arc<dyn Communicator>> {
    match std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse::<usize>().ok())
    {
        None | Some(1) => Ok(Arc::new(Single)),
        Some(w) => Err(Error::Invalid(format!(
            "WORLD_SIZE={w}: this build has no multi-process communicator yet"
        ))),
    }
}

/// Averages every gradient of `vs` over the ranks.
pub fn all_reduce_gradients(_vs: &tch::nn::VarStore, comm: &dyn Communicator) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    Err(Error::Invalid(
        "no multi-process gradient averaging in this build".into(),
    ))
}
