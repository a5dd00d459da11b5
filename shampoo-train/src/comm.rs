//! The communicators the training loop uses: `shampoo_dist`'s host
//! communicator, from the variables `shampoo-run` (or torchrun) sets, and
//! on GPU ranks the collective that moves device memory (`--collective`).

use crate::error::{Error, Result};
use std::sync::Arc;

pub use shampoo_dist::{Collectives, CommOptions, Communicator, SingleProcess};

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

/// How GPU ranks move device memory (gradients, directions).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CollectiveChoice {
    /// NCCL on the GPUs, on the optimizer's stream (one GPU per rank).
    #[default]
    Nccl,
    /// Through host memory over the ranks' TCP connections: for machines
    /// without NCCL, or several ranks sharing one GPU (which NCCL refuses).
    HostStaged,
}

impl CollectiveChoice {
    /// Name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CollectiveChoice::Nccl => "nccl",
            CollectiveChoice::HostStaged => "host-staged",
        }
    }
}

/// The collectives of this rank (collective: every rank calls it with the
/// same choice). CPU ranks and worlds of one use the host communicator;
/// GPU ranks of a larger world use NCCL unless `choice` is
/// [`CollectiveChoice::HostStaged`]. When NCCL cannot run on every rank the
/// error says why and suggests `--collective host-staged`: it is never
/// replaced silently.
pub fn collectives(
    device: tch::Device,
    comm: &Arc<dyn Communicator>,
    choice: CollectiveChoice,
) -> Result<Collectives> {
    let host = Collectives::host(comm.clone());
    let tch::Device::Cuda(ordinal) = device else {
        return Ok(host);
    };
    if comm.world_size() == 1 || choice == CollectiveChoice::HostStaged {
        if comm.world_size() > 1 {
            tracing::info!(ordinal, "GPU memory is communicated through the host");
        }
        return Ok(host);
    }
    nccl(ordinal, comm)
}

#[cfg(feature = "nccl")]
fn nccl(ordinal: usize, comm: &Arc<dyn Communicator>) -> Result<Collectives> {
    use shampoo_dist::collective::nccl::NcclCollective;
    use shampoo_dist::comm::nccl;
    // Every rank must take the same path: agree on the probe first (the
    // creation below is collective).
    let probe = nccl::probe_device(ordinal);
    let mut ok = vec![0u8; comm.world_size()];
    comm.all_gather_bytes(&[u8::from(probe.is_ok())], &mut ok)?;
    let hint = "(--collective host-staged communicates through the host instead)";
    if let Err(e) = probe {
        return Err(Error::Invalid(format!("NCCL cannot run here: {e} {hint}")));
    }
    if let Some(r) = ok.iter().position(|&x| x == 0) {
        return Err(Error::Invalid(format!(
            "NCCL cannot run on rank {r} (see its error) {hint}"
        )));
    }
    let n = NcclCollective::new(comm.clone(), ordinal, &CommOptions::default())
        .map_err(|e| Error::Invalid(format!("setting up NCCL on cuda:{ordinal}: {e} {hint}")))?;
    tracing::info!(ordinal, "GPU memory is communicated with NCCL");
    Ok(Collectives::with_nccl(comm.clone(), Arc::new(n))?)
}

#[cfg(not(feature = "nccl"))]
fn nccl(_ordinal: usize, _comm: &Arc<dyn Communicator>) -> Result<Collectives> {
    Err(Error::Invalid(
        "this shampoo-train was built without the `nccl` feature: use --collective host-staged"
            .into(),
    ))
}
