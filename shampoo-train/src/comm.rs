//! The communicator the training loop uses: `shampoo_dist`'s, from the
//! variables `shampoo-run` (or torchrun) sets.

use crate::error::Result;
use std::sync::Arc;

pub use shampoo_dist::{CommOptions, Communicator, SingleProcess};

/// The communicator the launcher's variables describe (one process without
/// them).
/// The collectives' peer timeout is `SHAMPOO_COMM_TIMEOUT` seconds (300 by
/// default; `shampoo-run --comm-timeout` sets it).
pub fn from_env() -> Result<Arc<dyn Communicator>> {
    Ok(shampoo_dist::communicator_from_env(
        &CommOptions::from_env()?,
    )?)
}

/// A world of one.
pub fn single() -> Arc<dyn Communicator> {
    Arc::new(SingleProcess)
}

/// Averages every gradient of `vs` over the ranks (baseline optimizers;
/// Shampoo averages its own), in place: with NCCL on the GPU when
/// [`init_gpu`] set it up (`shampoo_tch::all_reduce_gradients_nccl`),
/// otherwise through host memory (`shampoo_tch::all_reduce_gradients`).
pub fn all_reduce_gradients(vs: &tch::nn::VarStore, comm: &dyn Communicator) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    #[cfg(feature = "nccl")]
    if let Some(nccl) = gpu() {
        return Ok(shampoo_tch::all_reduce_gradients_nccl(vs, nccl)?);
    }
    Ok(shampoo_tch::all_reduce_gradients(vs, comm)?)
}

/// The NCCL communicator of this process's GPU rank (see [`init_gpu`]).
#[cfg(feature = "nccl")]
static GPU: std::sync::OnceLock<shampoo_tch::SharedNccl> = std::sync::OnceLock::new();

/// The NCCL communicator set up by [`init_gpu`], if any.
#[cfg(feature = "nccl")]
pub fn gpu() -> Option<&'static shampoo_tch::SharedNccl> {
    GPU.get()
}

/// On a CUDA device with several ranks, creates the NCCL communicator of
/// `comm`'s world (collective: every rank calls it), so that gradients are
/// averaged on the GPUs. When NCCL cannot be set up (or this build lacks
/// the `nccl` feature) gradients are averaged through host memory, with a
/// warning that says why.
pub fn init_gpu(device: tch::Device, comm: &Arc<dyn Communicator>) {
    let tch::Device::Cuda(ordinal) = device else {
        return;
    };
    if comm.world_size() == 1 {
        return;
    }
    #[cfg(feature = "nccl")]
    {
        if GPU.get().is_some() {
            return;
        }
        use shampoo_dist::comm::nccl;
        // Every rank must take the same path: agree on the probe first (the
        // creation below is collective).
        let probe = nccl::probe_device(ordinal);
        let mut ready = [if probe.is_ok() { 1.0f32 } else { 0.0 }];
        if let Err(e) = comm.all_reduce_mean(&mut ready) {
            tracing::warn!(
                "cannot agree on NCCL ({e}); gradients are averaged through host memory"
            );
            return;
        }
        if ready[0] != 1.0 {
            let why = probe
                .err()
                .map_or("not on every rank".to_string(), |e| e.to_string());
            tracing::warn!(
                "NCCL is not available ({why}); gradients are averaged through host memory"
            );
            return;
        }
        match nccl::NcclCommunicator::on_device(&**comm, ordinal) {
            Ok(n) => {
                tracing::info!(ordinal, "gradients are averaged with NCCL");
                let _ = GPU.set(Arc::new(std::sync::Mutex::new(n)));
            }
            Err(e) => tracing::warn!(
                "NCCL is not available ({e}); gradients are averaged through host memory"
            ),
        }
    }
    #[cfg(not(feature = "nccl"))]
    tracing::warn!(
        ordinal,
        "built without the `nccl` feature: gradients are averaged through host memory"
    );
}
