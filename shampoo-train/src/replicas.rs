//! Ranks start as exact replicas of rank 0, or not at all.
//!
//! Data-parallel training is only correct when every rank runs the same
//! configuration from the same weights. At start, the ranks exchange the
//! run's configuration (every setting that shapes the computation, plus the
//! datasets' sizes; `shampoo_dist::agreement`, the exchange the optimizer
//! uses for its own fingerprint), so a rank started with another seed,
//! batch, limit, schedule or optimizer stops the job at once with the
//! setting named. Then rank 0's initial (or resumed) weights are broadcast
//! to every rank, so replicas cannot start apart whatever the libraries'
//! random generators do.

use crate::comm::Communicator;
use crate::error::Result;
use crate::train::TrainConfig;
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// What every rank must agree on: the configuration without the settings
/// that are legitimately per rank (data and run folder paths, which may be
/// mounted differently on each node; threads, input-pipeline workers and
/// prefetch depth, which follow each node's cores; the CUDA device, which
/// follows the rank's place on its node; progress and logging; the per-rank
/// weight dump), and the datasets' sizes.
pub fn run_fingerprint(
    cfg: &TrainConfig,
    train_len: usize,
    test_len: usize,
    num_classes: usize,
) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).expect("the configuration serialises");
    if let Some(map) = v.as_object_mut() {
        for local in [
            "data",
            "out",
            "threads",
            "data_workers",
            "prefetch",
            "cuda_device",
            "progress",
            "log_every",
            "write_rank_weights",
        ] {
            map.remove(local);
        }
        map.insert(
            "dataset_sizes".into(),
            json!({ "train": train_len, "test": test_len, "classes": num_classes }),
        );
    }
    v
}

/// Collective: every rank must pass the same [`run_fingerprint`].
pub fn agree_on_config(fingerprint: &serde_json::Value, comm: &dyn Communicator) -> Result<()> {
    Ok(shampoo_dist::agreement::check_agreement(
        comm,
        "the run configuration (start every rank with the same options)",
        fingerprint,
    )?)
}

/// Collective: copies rank 0's value of every variable of `vs` (trainable
/// or not, e.g. batch-norm statistics) into the other ranks', through host
/// memory, one broadcast per variable in name order.
pub fn broadcast_variables(vs: &VarStore, comm: &dyn Communicator) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| -> Result<()> {
        for (_, mut var) in vars {
            let host = var.f_to_device(Device::Cpu)?.f_contiguous()?;
            let numel = host.numel();
            let kind = host.f_kind()?;
            let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
            host.f_copy_data_u8(&mut bytes, numel)?;
            comm.broadcast_bytes(&mut bytes, 0)?;
            if comm.rank() != 0 {
                let t = Tensor::f_from_data_size(&bytes, &host.size(), kind)?;
                var.f_copy_(&t)?;
            }
        }
        Ok(())
    })
}
