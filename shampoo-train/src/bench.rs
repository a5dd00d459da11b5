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
    crate::comm::init_gpu(device, &comm);
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
    let mut opt = train::build_optimizer(cfg, &vs, &comm)?;
    let r = cfg.resolution as i64;
    let mut x = Tensor::f_randn([per_rank, channels, r, r], (Kind::Float, device))?;
    if cfg.channels_last {
        x = train::to_channels_last(&x)?;
    }
    let y = Tensor::f_randint(classes, [per_rank], (Kind::Int64, device))?;
    let lr = cfg.lr.unwrap_or(1e-3);
    let mut sums = [0f64; 5];
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
        let t: OptTimes = opt.step(&vs, &*comm)?;
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
    let n = steps as f64;
    Ok(BenchResult {
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
