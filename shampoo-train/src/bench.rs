//! `shampoo-train bench-step`: the time of a training step on synthetic
//! ImageNet-shaped batches (random images and labels), for comparing
//! optimizers in the same binary, typically ResNet-50 at batch 128 in bf16 on
//! a GPU. The device is synchronised before every clock reading.

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::{self, ModelKind};
use crate::optim::OptTimes;
use crate::train::{self, TrainConfig};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Mean seconds of the measured steps, per part.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Optimizer name.
    pub optimizer: String,
    /// Model name.
    pub model: String,
    /// Global batch.
    pub batch_size: usize,
    /// Image side.
    pub resolution: u32,
    /// Device, as libtorch names it.
    pub device: String,
    /// bf16 autocast.
    pub bf16: bool,
    /// Measured steps (after the warmup).
    pub steps: usize,
    /// Mean step time (amortised over the measured steps, root-inverse steps
    /// included).
    pub step_s: f64,
    /// Mean forward+backward time.
    pub fwd_bwd_s: f64,
    /// Mean gradient all-reduce time.
    pub all_reduce_s: f64,
    /// Mean optimizer time: the step less forward+backward, all-reduce and
    /// all-gather (on a GPU, with the wait for the optimizer's queued work).
    pub optimizer_s: f64,
    /// Mean all-gather time.
    pub all_gather_s: f64,
    /// Ranks.
    pub world_size: usize,
    /// How GPU ranks communicated (`nccl`, `host-staged`; `host` on CPUs).
    pub collective: String,
    /// Shampoo computed every block on every rank.
    pub replicated: bool,
    /// Every rank's mean optimizer time, as `optimizer_s`.
    pub optimizer_s_per_rank: Vec<f64>,
    /// Bytes all-gathered per step on a rank (every rank's directions).
    pub gathered_bytes: usize,
    /// Every rank's optimizer state (bytes; Shampoo).
    pub state_bytes_per_rank: Vec<usize>,
    /// Every rank's final weights' digest (FNV-1a over their bytes, in
    /// name order), in hex.
    pub weights_digest_per_rank: Vec<String>,
    /// Whether every rank ended with the same weights, bit for bit.
    pub weights_identical: bool,
}

/// FNV-1a of every variable's bytes, in name order (on the host).
fn weights_digest(vs: &VarStore) -> Result<u64> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, t) in vars {
        let t = t.f_to(Device::Cpu)?.f_contiguous()?;
        let n = t.numel() * t.kind().elt_size_in_bytes();
        let mut bytes = vec![0u8; n];
        t.f_copy_data_u8(&mut bytes, n)?;
        for b in name.bytes().chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(h)
}

/// Every rank's `values`, gathered on every rank.
fn gather_u64(comm: &dyn Communicator, values: &[u64]) -> Result<Vec<Vec<u64>>> {
    let send: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut all = vec![0u8; send.len() * comm.world_size()];
    comm.all_gather_bytes(&send, &mut all)?;
    Ok(all
        .chunks(send.len().max(1))
        .map(|c| {
            c.chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect()
        })
        .collect())
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs `warmup` then `steps` training steps of `cfg`'s model and optimizer
/// on synthetic batches of `cfg.batch_size` images of `cfg.resolution` pixels
/// and 1000 classes.
pub fn bench_step(
    cfg: &TrainConfig,
    warmup: usize,
    steps: usize,
    comm: Arc<dyn Communicator>,
) -> Result<BenchResult> {
    if steps == 0 {
        return Err(Error::Invalid("--steps must be at least 1".into()));
    }
    let world = comm.world_size();
    let device = train::device_for(cfg)?;
    let collectives = crate::comm::collectives(device, &comm, cfg.collective)?;
    train::apply_threads(cfg);
    let kind = cfg.model.unwrap_or(ModelKind::Resnet50);
    let (channels, classes) = if kind == ModelKind::Cnn {
        (1, 10)
    } else {
        (3, 1000)
    };
    if !cfg.batch_size.is_multiple_of(world) {
        return Err(Error::Invalid(format!(
            "--batch-size {} is not a multiple of {world} ranks",
            cfg.batch_size
        )));
    }
    let per_rank = (cfg.batch_size / world) as i64;
    tch::manual_seed(cfg.seed as i64);
    let vs = VarStore::new(device);
    let net = model::build(&vs, kind, classes);
    train::maybe_channels_last(cfg, &vs)?;
    let mut opt = train::build_optimizer(cfg, &vs, &collectives)?;
    let r = cfg.resolution as i64;
    let mut x = Tensor::f_randn([per_rank, channels, r, r], (Kind::Float, device))?;
    if cfg.channels_last {
        x = train::to_channels_last(&x)?;
    }
    let y = Tensor::f_randint(classes, [per_rank], (Kind::Int64, device))?;
    let lr = cfg.lr.unwrap_or(1e-3);
    let mut sums = [0f64; 5];
    let mut gathered_bytes = 0;
    for i in 0..warmup + steps {
        sync(device);
        let t0 = Instant::now();
        opt.set_lr(lr)?;
        opt.zero_grad(&vs);
        let logits = tch::autocast(cfg.bf16, || net.forward_t(&x, true)).f_to_kind(Kind::Float)?;
        logits
            .f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100, 0.0)?
            .f_backward()?;
        sync(device);
        let fb = t0.elapsed().as_secs_f64();
        let t: OptTimes = opt.step(&vs)?;
        gathered_bytes = t.gathered_bytes;
        sync(device);
        let total = t0.elapsed().as_secs_f64();
        // On a GPU the optimizer returns once its work is queued; what the
        // synchronisation waited for is its time too. So the optimizer's
        // share is the rest of the step (on the CPU this equals its own
        // clock up to the clock readings).
        let optimizer = (total - fb - t.all_reduce - t.all_gather).max(0.0);
        if i >= warmup {
            for (s, v) in sums
                .iter_mut()
                .zip([total, fb, t.all_reduce, optimizer, t.all_gather])
            {
                *s += v;
            }
        }
    }
    opt.finish()?;
    let n = steps as f64;
    let digest = weights_digest(&vs)?;
    let per_rank = gather_u64(
        &*comm,
        &[(sums[3] / n).to_bits(), opt.state_bytes() as u64, digest],
    )?;
    let collective = match device {
        Device::Cpu => "host".to_string(),
        _ if world == 1 => "none".to_string(),
        _ => cfg.collective.name().to_string(),
    };
    Ok(BenchResult {
        world_size: world,
        collective,
        replicated: cfg.replicated,
        optimizer_s_per_rank: per_rank.iter().map(|r| f64::from_bits(r[0])).collect(),
        gathered_bytes,
        state_bytes_per_rank: per_rank.iter().map(|r| r[1] as usize).collect(),
        weights_digest_per_rank: per_rank.iter().map(|r| format!("{:016x}", r[2])).collect(),
        weights_identical: per_rank.iter().all(|r| r[2] == per_rank[0][2]),
        optimizer: cfg.optimizer.name().into(),
        model: kind.name().into(),
        batch_size: cfg.batch_size,
        resolution: cfg.resolution,
        device: format!("{device:?}"),
        bf16: cfg.bf16,
        steps,
        step_s: sums[0] / n,
        fwd_bwd_s: sums[1] / n,
        all_reduce_s: sums[2] / n,
        optimizer_s: sums[3] / n,
        all_gather_s: sums[4] / n,
    })
}
