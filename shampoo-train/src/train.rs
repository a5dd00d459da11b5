//! The training loop: data-parallel, with metrics, progress, evaluation and
//! checkpoints.

use crate::checkpoint::{self, State};
use crate::comm::{CollectiveChoice, Collectives, Communicator};
use crate::data::fashion_mnist::{self, FashionMnist};
use crate::data::imagenet::{ImageFolder, OnCorrupt};
use crate::data::loader::{self, ChunkPlan, Loader, LoaderOptions, TrainPlan};
use crate::data::{self, Dataset, Split};
use crate::divergence::{self, NonFiniteSteps};
use crate::error::{Error, Result, io_err};
use crate::metrics::MetricsWriter;
use crate::model::{self, ModelKind};
use crate::optim::{AdamW, OptTimes, Optimizer, OptimizerKind, Sgd};
use crate::schedule::{Schedule, ScheduleKind};
use crate::signals::Interrupt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

/// The protocol's Shampoo configuration (`configs/fashion_mnist_shampoo.json`),
/// used when `--shampoo-config` is not given.
pub const PROTOCOL_SHAMPOO: &str = include_str!("../configs/fashion_mnist_shampoo.json");

/// Which dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// Fashion-MNIST idx files.
    FashionMnist,
    /// ImageNet-layout class folders.
    Imagenet,
}

impl DatasetKind {
    /// Name on the command line and in checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Imagenet => "imagenet",
        }
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// The CPU.
    Cpu,
    /// The GPU `LOCAL_RANK` (0 without the launcher).
    Cuda,
}

/// Everything a training run needs to know.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Dataset.
    pub dataset: DatasetKind,
    /// Dataset folder (default for Fashion-MNIST: the Debian package's).
    pub data: Option<PathBuf>,
    /// Model (default: `cnn` for Fashion-MNIST, `resnet50` for ImageNet).
    pub model: Option<ModelKind>,
    /// Image side for ImageNet.
    pub resolution: u32,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Shampoo configuration file (JSON, docs/config.md).
    pub shampoo_config: Option<PathBuf>,
    /// Epochs.
    pub epochs: u64,
    /// Global batch size (split evenly over the ranks).
    pub batch_size: usize,
    /// Peak learning rate (default: the Shampoo file's `lr` for Shampoo,
    /// 1e-3 otherwise).
    pub lr: Option<f64>,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Schedule after the warmup.
    pub schedule: ScheduleKind,
    /// Step decay period (default: a third of the steps).
    pub decay_steps: Option<u64>,
    /// Step decay factor.
    pub decay_gamma: f64,
    /// Weight decay, decoupled for AdamW and Shampoo, L2 for SGD (default:
    /// the Shampoo file's for Shampoo, 1e-4 otherwise).
    pub weight_decay: Option<f64>,
    /// SGD momentum.
    pub momentum: f64,
    /// Adam betas.
    pub betas: (f64, f64),
    /// Adam epsilon.
    pub adam_eps: f64,
    /// Seed of the initialisation and the data order.
    pub seed: u64,
    /// Run folder.
    pub out: PathBuf,
    /// Checkpoint every this many steps (and always at the end).
    pub checkpoint_every: Option<u64>,
    /// Continue from `out/checkpoint`.
    pub resume: bool,
    /// Stop after this many steps (the schedule still spans every epoch).
    pub max_steps: Option<u64>,
    /// Use the first N training samples.
    pub limit_train: Option<usize>,
    /// Use the first N test samples.
    pub limit_test: Option<usize>,
    /// Evaluate every this many steps (and always at each epoch's end).
    pub eval_every: Option<u64>,
    /// Batch size of evaluations (per rank).
    pub eval_batch_size: usize,
    /// Log line every this many steps when stderr is not a terminal.
    pub log_every: u64,
    /// Corrupt image policy.
    pub on_corrupt: OnCorrupt,
    /// Threads that decode and assemble batches (default: the cores per
    /// rank, [`loader::default_workers`]).
    #[serde(default)]
    pub data_workers: Option<usize>,
    /// Batches prepared ahead of the step that uses them.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Device.
    pub device: DeviceKind,
    /// bfloat16 autocast of forward passes (CUDA only).
    pub bf16: bool,
    /// Channels-last layout of images and convolution weights.
    pub channels_last: bool,
    /// Intra-op threads of libtorch (default: OMP_NUM_THREADS, else libtorch's).
    pub threads: Option<usize>,
    /// Show a progress bar (rank 0, terminal only).
    pub progress: bool,
    /// Every rank writes its final weights to `OUT/weights.rank<R>.ot` (to
    /// check that the ranks agree).
    pub write_rank_weights: bool,
    /// Shampoo computes every block on every rank instead of sharding them.
    #[serde(default)]
    pub replicated: bool,
    /// How GPU ranks communicate device memory.
    #[serde(default)]
    pub collective: CollectiveChoice,
    /// The CUDA device of this rank (default: SHAMPOO_RUN_CUDA_DEVICE,
    /// else LOCAL_RANK); several ranks may share one.
    #[serde(default)]
    pub cuda_device: Option<usize>,
    /// Replace a previous run in `out` (without it, a folder that holds a
    /// run is refused unless resuming).
    #[serde(default)]
    pub overwrite: bool,
    /// Steps with a non-finite loss or gradient that are skipped (without
    /// an update) before the run stops with an error.
    #[serde(default)]
    pub skip_nonfinite: u64,
}

impl TrainConfig {
    /// The protocol's settings (Fashion-MNIST CNN, global batch 128, 2 epochs,
    /// lr 1e-3 with 100 warmup steps then cosine, weight decay 1e-4).
    pub fn protocol(optimizer: OptimizerKind, out: PathBuf) -> Self {
        TrainConfig {
            dataset: DatasetKind::FashionMnist,
            data: None,
            model: None,
            resolution: 224,
            optimizer,
            shampoo_config: None,
            epochs: 2,
            batch_size: 128,
            lr: Some(1e-3),
            warmup_steps: 100,
            schedule: ScheduleKind::Cosine,
            decay_steps: None,
            decay_gamma: 0.1,
            weight_decay: Some(1e-4),
            momentum: 0.9,
            betas: (0.9, 0.999),
            adam_eps: 1e-8,
            seed: 0,
            out,
            checkpoint_every: None,
            resume: false,
            max_steps: None,
            limit_train: None,
            limit_test: None,
            eval_every: None,
            eval_batch_size: 1000,
            log_every: 50,
            on_corrupt: OnCorrupt::Skip,
            data_workers: None,
            prefetch: default_prefetch(),
            device: DeviceKind::Cpu,
            bf16: false,
            channels_last: false,
            threads: None,
            progress: true,
            write_rank_weights: false,
            replicated: false,
            collective: CollectiveChoice::Nccl,
            cuda_device: None,
            overwrite: false,
            skip_nonfinite: 0,
        }
    }

    /// Data worker threads: `--data-workers`, else the cores per rank.
    pub fn data_workers(&self) -> usize {
        self.data_workers.unwrap_or_else(loader::default_workers)
    }

    /// How the input pipeline runs for this configuration on `device`.
    pub fn loader_options(&self, device: Device) -> LoaderOptions {
        LoaderOptions {
            workers: self.data_workers(),
            prefetch: self.prefetch,
            device,
            channels_last: self.channels_last,
            seed: self.seed,
        }
    }

    /// The model this configuration trains.
    pub fn model_kind(&self) -> ModelKind {
        self.model.unwrap_or(match self.dataset {
            DatasetKind::FashionMnist => ModelKind::Cnn,
            DatasetKind::Imagenet => ModelKind::Resnet50,
        })
    }
}

fn default_prefetch() -> usize {
    2
}

/// What a finished run reports (also written to `RUN_DIR/summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Optimizer name.
    pub optimizer: String,
    /// Model name.
    pub model: String,
    /// Ranks.
    pub world_size: usize,
    /// Steps done in total.
    pub steps: u64,
    /// Test accuracy at the end, in `[0, 1]`.
    #[serde(deserialize_with = "nan_if_null")]
    pub test_acc: f64,
    /// Test loss at the end (NaN when it was not finite; JSON `null`).
    #[serde(deserialize_with = "nan_if_null")]
    pub test_loss: f64,
    /// Training time (seconds, without evaluations and checkpoints), over
    /// every session of a resumed run.
    #[serde(deserialize_with = "nan_if_null")]
    pub train_s: f64,
    /// Images skipped as corrupt (this session).
    pub corrupt_images: usize,
    /// Steps skipped for a non-finite loss or gradient (`--skip-nonfinite`).
    #[serde(default)]
    pub skipped_steps: Vec<u64>,
    /// Shampoo's root-inverse failures, float64 retries and kept previous
    /// roots over the whole run (every session, every rank).
    #[serde(default)]
    pub root_inverse: shampoo_core::RootInverseCounters,
    /// The same per block and factor (those with any), this session.
    #[serde(default)]
    pub root_inverse_blocks: Vec<shampoo_tch::VariableRootInverseStats>,
}

/// A number that JSON holds as `null` when it was not finite.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The parts of a training step, seconds.
#[derive(Debug, Clone, Copy, Default)]
struct StepTimes {
    /// Time the step waited for its batch (decoding runs ahead on the data
    /// workers), with the batch's conversion on the device.
    data_wait: f64,
    fwd_bwd: f64,
    opt: OptTimes,
    total: f64,
}

pub(crate) fn device_for(cfg: &TrainConfig) -> Result<Device> {
    match cfg.device {
        DeviceKind::Cpu => {
            if cfg.bf16 {
                return Err(Error::Invalid(
                    "--bf16 needs --device cuda (autocast runs on GPUs here)".into(),
                ));
            }
            Ok(Device::Cpu)
        }
        DeviceKind::Cuda => {
            if !tch::Cuda::is_available() {
                return Err(Error::NoCuda);
            }
            // --cuda-device decides; else shampoo-run says which device this
            // rank sees as its own (0 with --bind-gpus); torchrun gives
            // LOCAL_RANK.
            let (var, index) = match cfg.cuda_device {
                Some(i) => ("--cuda-device", i),
                None => {
                    let (var, index) = ["SHAMPOO_RUN_CUDA_DEVICE", "LOCAL_RANK"]
                        .iter()
                        .find_map(|v| std::env::var(v).ok().map(|x| (*v, x)))
                        .map_or(("(default)", Ok(0)), |(v, x)| (v, x.parse::<usize>()));
                    (
                        var,
                        index
                            .map_err(|_| Error::Invalid(format!("{var} is not a device index")))?,
                    )
                }
            };
            let count = tch::Cuda::device_count().max(0) as usize;
            if index >= count {
                return Err(Error::Invalid(format!(
                    "--device cuda: {var} asks for cuda:{index} but libtorch sees {count} device(s)"
                )));
            }
            Ok(Device::Cuda(index))
        }
    }
}

fn open_data(cfg: &TrainConfig, split: Split) -> Result<Arc<dyn Dataset>> {
    let limit = match split {
        Split::Train => cfg.limit_train,
        Split::Test => cfg.limit_test,
    };
    match cfg.dataset {
        DatasetKind::FashionMnist => {
            let dir = cfg
                .data
                .clone()
                .unwrap_or_else(|| PathBuf::from(fashion_mnist::DEFAULT_DIR));
            Ok(Arc::new(FashionMnist::load(
                &dir,
                split == Split::Train,
                limit,
            )?))
        }
        DatasetKind::Imagenet => {
            let dir = cfg.data.clone().ok_or_else(|| {
                Error::Invalid(
                    "--dataset imagenet needs --data DIR (with DIR/train and DIR/val)".into(),
                )
            })?;
            let mut folder = ImageFolder::open(&dir, split, cfg.resolution, cfg.on_corrupt)?;
            if let Some(l) = limit {
                folder.limit(l);
            }
            Ok(Arc::new(folder))
        }
    }
}

fn validate(cfg: &TrainConfig, world: usize) -> Result<()> {
    crate::options::check(cfg)?;
    if cfg.batch_size == 0 || !cfg.batch_size.is_multiple_of(world) {
        return Err(Error::Invalid(format!(
            "--batch-size {} (global) must be a positive multiple of the number of ranks ({world})",
            cfg.batch_size
        )));
    }
    if cfg.epochs == 0 {
        return Err(Error::Invalid("--epochs must be at least 1".into()));
    }
    if let Some(lr) = cfg.lr.filter(|lr| !(lr.is_finite() && *lr >= 0.0)) {
        return Err(Error::Invalid(format!(
            "--lr must be finite and >= 0, got {lr}"
        )));
    }
    if cfg.eval_batch_size == 0 {
        return Err(Error::Invalid(
            "--eval-batch-size must be at least 1".into(),
        ));
    }
    if cfg.data_workers == Some(0) {
        return Err(Error::Invalid("--data-workers must be at least 1".into()));
    }
    if cfg.prefetch == 0 {
        return Err(Error::Invalid("--prefetch must be at least 1".into()));
    }
    if cfg.shampoo_config.is_some() && cfg.optimizer != OptimizerKind::Shampoo {
        return Err(Error::Invalid(
            "--shampoo-config needs --optimizer shampoo".into(),
        ));
    }
    Ok(())
}

/// The optimizer of `cfg` over `vs`'s variables, communicating over
/// `collectives` (Shampoo shards its blocks over the ranks, on GPU ranks
/// too, unless `--replicated`).
pub(crate) fn build_optimizer(
    cfg: &TrainConfig,
    vs: &VarStore,
    collectives: &Collectives,
) -> Result<Optimizer> {
    Ok(match cfg.optimizer {
        OptimizerKind::Adamw => Optimizer::adamw(
            AdamW::new(
                vs,
                cfg.lr.unwrap_or(1e-3),
                cfg.betas,
                cfg.adam_eps,
                cfg.weight_decay.unwrap_or(1e-4),
            ),
            collectives,
        ),
        OptimizerKind::Sgd => Optimizer::sgd(
            Sgd::new(
                vs,
                cfg.lr.unwrap_or(1e-3),
                cfg.momentum,
                cfg.weight_decay.unwrap_or(1e-4),
                false,
            ),
            collectives,
        ),
        OptimizerKind::Shampoo => {
            let (text, origin) = match &cfg.shampoo_config {
                Some(p) => (
                    std::fs::read_to_string(p)
                        .map_err(io_err(format!("reading --shampoo-config {}", p.display())))?,
                    p.display().to_string(),
                ),
                None => (
                    PROTOCOL_SHAMPOO.to_string(),
                    "(built-in protocol config)".to_string(),
                ),
            };
            let mut sc = shampoo_core::ShampooConfig::from_json(&text)
                .map_err(|e| Error::Invalid(format!("--shampoo-config {origin}: {e}")))?;
            if let Some(lr) = cfg.lr {
                sc.lr = lr;
            }
            if let Some(wd) = cfg.weight_decay {
                sc.weight_decay = wd;
            }
            crate::optim::check_shampoo_memory(vs, &sc)
                .map_err(|e| Error::Invalid(format!("--shampoo-config {origin}: {e}")))?;
            let lr = sc.lr;
            let mut b = shampoo_tch::Shampoo::builder(vs, sc).replicated(cfg.replicated);
            if collectives.world_size() > 1 {
                b = b.collectives(collectives.clone());
            }
            if let Some(t) = threads(cfg) {
                b = b.threads(t);
            }
            Optimizer::Shampoo {
                opt: Box::new(b.build()?),
                lr,
            }
        }
    })
}

/// Converts 4-d tensors to channels-last strides (same shape, NHWC memory).
pub(crate) fn to_channels_last(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])?)
}

/// Sets libtorch's intra-op threads: `--threads`, else `OMP_NUM_THREADS`.
pub(crate) fn apply_threads(cfg: &TrainConfig) {
    if let Some(t) = threads(cfg) {
        tch::set_num_threads(t as i32);
    }
}

/// `--threads`, else `OMP_NUM_THREADS` (which `shampoo-run` sets per rank).
fn threads(cfg: &TrainConfig) -> Option<usize> {
    cfg.threads.or_else(|| {
        std::env::var("OMP_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// With `--channels-last`, gives every 4-d variable channels-last strides.
pub(crate) fn maybe_channels_last(cfg: &TrainConfig, vs: &VarStore) -> Result<()> {
    if cfg.channels_last {
        tch::no_grad(|| -> Result<()> {
            for mut v in vs.trainable_variables() {
                if v.dim() == 4 {
                    v.set_data(&to_channels_last(&v)?);
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// [`evaluate`] on the optimizer's evaluation view (iterate averaging's
/// averaged parameters; the parameters themselves otherwise), then back to
/// the training parameters, restored bit for bit (the published `train()`
/// recomputes them, with float32 rounding: evaluations would perturb the
/// training run and its resumption).
fn evaluate_view(
    opt: &mut Optimizer,
    vs: &VarStore,
    net: &dyn ModuleT,
    test: &Arc<dyn Dataset>,
    comm: &dyn Communicator,
    cfg: &TrainConfig,
    device: Device,
) -> Result<(f64, f64)> {
    if !opt.has_eval_view() {
        return evaluate(net, test, comm, cfg, device);
    }
    let saved: Vec<(Tensor, Tensor)> = tch::no_grad(|| {
        vs.trainable_variables()
            .into_iter()
            .map(|v| {
                let copy = v.copy();
                (v, copy)
            })
            .collect()
    });
    opt.eval_view()?;
    let result = evaluate(net, test, comm, cfg, device);
    opt.train_view()?;
    tch::no_grad(|| {
        for (mut v, copy) in saved {
            v.copy_(&copy);
        }
    });
    result
}

/// Evaluates on `test` (each rank a strided share, sums reduced over ranks):
/// returns (mean loss, accuracy).
fn evaluate(
    net: &dyn ModuleT,
    test: &Arc<dyn Dataset>,
    comm: &dyn Communicator,
    cfg: &TrainConfig,
    device: Device,
) -> Result<(f64, f64)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mine: Vec<usize> = (rank..test.len()).step_by(world).collect();
    let plan = ChunkPlan::new(mine, cfg.eval_batch_size, 0);
    let mut batches = Loader::new(test.clone(), Box::new(plan), cfg.loader_options(device))?;
    let mut sums = [0f64; 3];
    tch::no_grad(|| -> Result<()> {
        while let Some(b) = batches.next_batch()? {
            let n = b.labels.size()[0];
            if n == 0 {
                continue;
            }
            let (x, y) = (b.images, b.labels);
            let logits =
                tch::autocast(cfg.bf16, || net.forward_t(&x, false)).f_to_kind(Kind::Float)?;
            let loss = logits
                .f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100, 0.0)?
                .f_double_value(&[])?;
            let correct = logits
                .f_argmax(-1, false)?
                .f_eq_tensor(&y)?
                .f_sum(Kind::Float)?
                .f_double_value(&[])?;
            sums[0] += loss * n as f64;
            sums[1] += correct;
            sums[2] += n as f64;
        }
        Ok(())
    })?;
    comm.all_reduce_mean_f64(&mut sums)?;
    if sums[2] == 0.0 {
        return Err(Error::Invalid("the test set is empty".into()));
    }
    Ok((sums[0] / sums[2], sums[1] / sums[2]))
}

/// Runs (or resumes) training as `cfg` says, on the ranks of `comm`.
pub fn run(cfg: &TrainConfig, comm: Arc<dyn Communicator>) -> Result<Summary> {
    run_with(cfg, comm, &Interrupt::none())
}

/// [`run`], stopping cleanly after the step during which `interrupt` is
/// raised on any rank (a checkpoint when `--checkpoint-every` is on, then
/// [`Error::Interrupted`]).
pub fn run_with(
    cfg: &TrainConfig,
    comm: Arc<dyn Communicator>,
    interrupt: &Interrupt,
) -> Result<Summary> {
    let (rank, world) = (comm.rank(), comm.world_size());
    validate(cfg, world)?;
    let device = device_for(cfg)?;
    apply_threads(cfg);
    let _lock = crate::run_dir::prepare(&cfg.out, cfg.resume, cfg.overwrite, &*comm)?;
    let train = open_data(cfg, Split::Train)?;
    let test = open_data(cfg, Split::Test)?;
    crate::replicas::agree_on_config(
        &crate::replicas::run_fingerprint(cfg, train.len(), test.len(), train.num_classes()),
        &*comm,
    )?;
    // Collective set-up (NCCL) only once the ranks agree on the run.
    let collectives = crate::comm::collectives(device, &comm, cfg.collective)?;
    let model_kind = cfg.model_kind();
    if model_kind == ModelKind::Cnn && train.channels() != 1 {
        return Err(Error::Invalid(
            "--model cnn is for the 28x28 grey Fashion-MNIST images".into(),
        ));
    }
    let steps_per_epoch = data::steps_per_epoch(train.len(), cfg.batch_size) as u64;
    if steps_per_epoch == 0 {
        return Err(Error::Invalid(format!(
            "the training set has {} samples, fewer than one global batch ({})",
            train.len(),
            cfg.batch_size
        )));
    }
    let total = steps_per_epoch * cfg.epochs;
    let stop = cfg.max_steps.map_or(total, |m| m.min(total));

    tch::manual_seed(cfg.seed as i64);
    let mut vs = VarStore::new(device);
    let net = model::build(&vs, model_kind, train.num_classes() as i64);
    maybe_channels_last(cfg, &vs)?;
    let mut opt = build_optimizer(cfg, &vs, &collectives)?;
    let schedule = Schedule {
        lr: opt.lr(),
        warmup: cfg.warmup_steps,
        total,
        kind: cfg.schedule,
        decay_steps: cfg.decay_steps.unwrap_or((total / 3).max(1)),
        gamma: cfg.decay_gamma,
    };

    let fresh = State {
        format: checkpoint::FORMAT,
        model: model_kind.name().into(),
        num_classes: train.num_classes(),
        optimizer: cfg.optimizer.name().into(),
        dataset: cfg.dataset.name().into(),
        global_batch: cfg.batch_size,
        seed: cfg.seed,
        world_size: world,
        step: 0,
        train_s: 0.0,
        epoch_sums: [0.0; 3],
        train_len: Some(train.len()),
        epochs: Some(cfg.epochs),
        schedule: Some(schedule_fingerprint(&schedule, cfg.epochs)),
        skipped_steps: Vec::new(),
        root_inverse: Default::default(),
    };
    let mut state = fresh.clone();
    if cfg.resume {
        state = resume(cfg, &fresh, &mut vs, &mut opt)?;
        tracing::info!(
            "resumed from {} at step {}",
            checkpoint::dir(&cfg.out).display(),
            state.step
        );
    }
    state.format = checkpoint::FORMAT;
    state.world_size = world;
    state.train_len = fresh.train_len;
    state.epochs = fresh.epochs;
    state.schedule = fresh.schedule.clone();
    // Every rank starts from rank 0's weights (initial or resumed).
    crate::replicas::broadcast_variables(&vs, &*comm)?;

    let lead = rank == 0;
    if lead {
        let run = json!({ "config": cfg, "world_size": world, "model": model_kind.name(),
                          "steps_per_epoch": steps_per_epoch, "total_steps": total });
        let path = cfg.out.join("run.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&run).expect("serialises"),
        )
        .map_err(io_err(format!("writing {}", path.display())))?;
    }
    if lead && cfg.resume {
        // Lines an interrupted session wrote after its last checkpoint are
        // written again by this one; a line torn by a kill is dropped.
        if let Some(note) =
            crate::metrics::truncate_after(&cfg.out.join("metrics.jsonl"), state.step)?
        {
            tracing::warn!("{note}");
        }
    }
    let mut metrics = MetricsWriter::open(&cfg.out.join("metrics.jsonl"), lead)?;
    let interactive = lead && cfg.progress && std::io::stderr().is_terminal();

    let plan = TrainPlan::new(
        train.len(),
        cfg.seed,
        cfg.batch_size,
        (rank, world),
        (state.step, stop),
    );
    let mut batches = Loader::new(train.clone(), Box::new(plan), cfg.loader_options(device))?;
    let mut bar_epoch = u64::MAX;
    let mut bar: Option<ProgressBar> = None;
    let mut last_eval: Option<(f64, f64, u64)> = None;
    let mut step = state.step;
    let mut last_ckpt = cfg.resume.then_some(state.step);
    let mut nonfinite = NonFiniteSteps {
        allowed: cfg.skip_nonfinite,
        skipped: std::mem::take(&mut state.skipped_steps),
    };
    let mut root_inverse = opt.root_inverse_totals();
    while step < stop {
        let epoch = step / steps_per_epoch;
        let pos = (step % steps_per_epoch) as usize;
        if bar_epoch != epoch {
            bar_epoch = epoch;
            if interactive {
                let b = ProgressBar::new(steps_per_epoch);
                b.set_style(
                    ProgressStyle::with_template(
                        "epoch {prefix} [{bar:25}] {pos}/{len} {msg} ({elapsed}<{eta})",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
                b.set_position(pos as u64);
                bar = Some(b);
            }
        }
        let t0 = Instant::now();
        let batch = batches.next_batch()?.ok_or_else(|| {
            Error::Invalid(format!("the data loader ended before step {}", step + 1))
        })?;
        let n = batch.labels.size()[0];
        if n == 0 {
            return Err(Error::EmptyBatch { step: step + 1 });
        }
        let (x, y) = (batch.images, batch.labels);
        let t1 = Instant::now();
        let lr = schedule.lr_at(step);
        opt.set_lr(lr)?;
        opt.zero_grad(&vs);
        let logits = tch::autocast(cfg.bf16, || net.forward_t(&x, true)).f_to_kind(Kind::Float)?;
        let loss =
            logits.f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100, 0.0)?;
        loss.f_backward()?;
        let t2 = Instant::now();
        let correct = tch::no_grad(|| -> Result<f64> {
            Ok(logits
                .f_argmax(-1, false)?
                .f_eq_tensor(&y)?
                .f_sum(Kind::Float)?
                .f_double_value(&[])?)
        })?;
        // The ranks agree, before any update, on the batch's loss and
        // accuracy, on whether any loss or gradient is not finite, and on
        // whether any rank was asked to stop.
        let local_loss = loss.f_double_value(&[])?;
        let finite = local_loss.is_finite() && divergence::gradients_finite(&vs)?;
        let mut sums = [
            local_loss * n as f64,
            correct,
            n as f64,
            f64::from(u8::from(!finite)),
            f64::from(u8::from(interrupt.signal().is_some())),
        ];
        comm.all_reduce_mean_f64(&mut sums)?;
        let skipped = sums[3] > 0.0;
        let opt_times = if skipped {
            let what = if sums[0].is_finite() {
                "a gradient holds NaN or Inf".to_string()
            } else {
                divergence::describe_loss(sums[0] / sums[2])
            };
            nonfinite.on_nonfinite(step + 1, &what, last_ckpt)?;
            OptTimes::default()
        } else {
            opt.step(&vs)?
        };
        // Every rank's optimizer time (its share of the blocks), for the
        // progress line and the metrics.
        let optimizer_per_rank = gather_per_rank(&*comm, opt_times.optimizer)?;
        let times = StepTimes {
            data_wait: (t1 - t0).as_secs_f64(),
            fwd_bwd: (t2 - t1).as_secs_f64(),
            opt: opt_times,
            total: t0.elapsed().as_secs_f64(),
        };
        state.train_s += times.total;
        step += 1;

        if !skipped {
            for (acc, s) in state.epoch_sums.iter_mut().zip(&sums[..3]) {
                *acc += s;
            }
        }
        let (bl, ba) = (sums[0] / sums[2], sums[1] / sums[2]);
        let ips = cfg.batch_size as f64 / times.total;
        let mut line = json!({
            "kind": "step", "step": step, "epoch": epoch + 1, "lr": lr, "loss": bl, "acc": ba,
            "images_per_s": ips, "data_wait": times.data_wait, "fwd_bwd": times.fwd_bwd,
            "all_reduce": times.opt.all_reduce, "optimizer": times.opt.optimizer,
            "optimizer_per_rank": optimizer_per_rank,
            "all_gather": times.opt.all_gather, "gathered_bytes": times.opt.gathered_bytes,
            "step_time": times.total,
        });
        if skipped {
            line["skipped"] = json!(true);
        }
        if cfg.optimizer == OptimizerKind::Shampoo {
            let now = opt.root_inverse_totals();
            let mut delta = [
                (now.failures - root_inverse.failures) as f64,
                (now.f64_retries - root_inverse.f64_retries) as f64,
                (now.kept_previous - root_inverse.kept_previous) as f64,
            ];
            root_inverse = now;
            if world > 1 {
                comm.all_reduce_mean_f64(&mut delta)?;
                delta
                    .iter_mut()
                    .for_each(|d| *d = (*d * world as f64).round());
            }
            let d = shampoo_core::RootInverseCounters {
                failures: delta[0] as u64,
                f64_retries: delta[1] as u64,
                kept_previous: delta[2] as u64,
            };
            state.root_inverse.add(&d);
            line["root_inverse"] = serde_json::to_value(d).expect("serialises");
        }
        metrics.write(&line)?;
        let split = format!(
            "loss {bl:.4} acc {:.1}% {ips:.0} img/s | data wait {:.1} ms, fwd+bwd {:.1} ms, all-reduce {:.1} ms, optimizer {}, all-gather {:.1} ms ({})",
            100.0 * ba,
            1e3 * times.data_wait,
            1e3 * times.fwd_bwd,
            1e3 * times.opt.all_reduce,
            per_rank_ms(&optimizer_per_rank),
            1e3 * times.opt.all_gather,
            mib(times.opt.gathered_bytes)
        );
        if let Some(b) = &bar {
            b.set_position(pos as u64 + 1);
            b.set_message(split);
        } else if lead && cfg.log_every > 0 && step.is_multiple_of(cfg.log_every) {
            tracing::info!("step {step}/{total} (epoch {}) {split}", epoch + 1);
        }

        let epoch_end = step.is_multiple_of(steps_per_epoch);
        let periodic = cfg
            .eval_every
            .is_some_and(|e| e > 0 && step.is_multiple_of(e));
        if epoch_end || periodic || step == stop {
            let (tl, ta) = evaluate_view(&mut opt, &vs, &*net, &test, &*comm, cfg, device)?;
            last_eval = Some((tl, ta, step));
            metrics.write(&json!({
                "kind": "eval", "step": step, "epoch": epoch + 1, "test_loss": tl, "test_acc": ta,
                "train_s": state.train_s,
            }))?;
            if epoch_end {
                let s = state.epoch_sums;
                metrics.write(&json!({
                    "kind": "epoch", "step": step, "epoch": epoch + 1, "train_loss": s[0] / s[2],
                    "train_acc": s[1] / s[2], "test_loss": tl, "test_acc": ta, "train_s": state.train_s,
                }))?;
                state.epoch_sums = [0.0; 3];
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                if lead {
                    tracing::info!(
                        "epoch {}/{}: train loss {:.4} acc {:.2}% | test loss {tl:.4} acc {:.2}% | {:.1} s training",
                        epoch + 1,
                        cfg.epochs,
                        s[0] / s[2],
                        100.0 * s[1] / s[2],
                        100.0 * ta,
                        state.train_s
                    );
                }
            }
        }
        let interrupted = sums[4] > 0.0;
        let scheduled = cfg
            .checkpoint_every
            .is_some_and(|c| c > 0 && step.is_multiple_of(c));
        if (scheduled || interrupted && cfg.checkpoint_every.is_some()) && step < stop {
            state.step = step;
            state.skipped_steps.clone_from(&nonfinite.skipped);
            save_checkpoint(cfg, &state, &vs, &mut opt, &*comm, &mut metrics, last_ckpt)?;
            last_ckpt = Some(step);
        }
        if interrupted && step < stop {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            let signal = interrupt.signal().unwrap_or(signal_hook::consts::SIGTERM);
            return Err(Error::Interrupted {
                signal,
                step,
                checkpoint: (last_ckpt == Some(step)).then(|| checkpoint::dir(&cfg.out)),
            });
        }
    }
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    state.step = step;
    state.skipped_steps.clone_from(&nonfinite.skipped);
    if last_ckpt != Some(step) || !checkpoint::dir(&cfg.out).exists() {
        save_checkpoint(cfg, &state, &vs, &mut opt, &*comm, &mut metrics, last_ckpt)?;
    }
    opt.finish()?;
    if cfg.write_rank_weights {
        vs.save(cfg.out.join(format!("weights.rank{rank}.ot")))?;
    }
    let (test_loss, test_acc) = match last_eval {
        Some((l, a, s)) if s == step => (l, a),
        _ => evaluate_view(&mut opt, &vs, &*net, &test, &*comm, cfg, device)?,
    };
    let mut corrupt = [(train.corrupt_count() + test.corrupt_count()) as f64];
    comm.all_reduce_mean_f64(&mut corrupt)?;
    let corrupt_images = (corrupt[0] * world as f64).round() as usize;
    if corrupt_images > 0 && lead {
        tracing::warn!("{corrupt_images} corrupt images were skipped");
    }
    let root_inverse_blocks = gather_root_inverse_blocks(&opt, &*comm)?;
    if !state.root_inverse.is_zero() && lead {
        let c = state.root_inverse;
        tracing::warn!(
            "root inverses: {} failures ({} kept the previous root), {} needed the float64 retry; per block in summary.json",
            c.failures,
            c.kept_previous,
            c.f64_retries
        );
    }
    let summary = Summary {
        optimizer: cfg.optimizer.name().into(),
        model: model_kind.name().into(),
        world_size: world,
        steps: step,
        test_acc,
        test_loss,
        train_s: state.train_s,
        corrupt_images,
        skipped_steps: state.skipped_steps.clone(),
        root_inverse: state.root_inverse,
        root_inverse_blocks,
    };
    if lead {
        let path = cfg.out.join("summary.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&summary).expect("serialises"),
        )
        .map_err(io_err(format!("writing {}", path.display())))?;
    }
    Ok(summary)
}

/// Every rank's `value` (collective: one all-gather of a float per rank).
fn gather_per_rank(comm: &dyn Communicator, value: f64) -> Result<Vec<f64>> {
    let mut all = vec![0u8; 8 * comm.world_size()];
    comm.all_gather_bytes(&value.to_le_bytes(), &mut all)?;
    Ok(all
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Every rank's time in milliseconds: `12.3 ms` for one rank, `12.1 | 12.5
/// ms` for up to eight, `12.1..12.9 ms` (fastest..slowest) beyond.
fn per_rank_ms(secs: &[f64]) -> String {
    match secs {
        [one] => format!("{:.1} ms", 1e3 * one),
        s if s.len() <= 8 => format!(
            "{} ms",
            s.iter()
                .map(|x| format!("{:.1}", 1e3 * x))
                .collect::<Vec<_>>()
                .join(" | ")
        ),
        s => {
            let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = s.iter().copied().fold(0.0, f64::max);
            format!("{:.1}..{:.1} ms", 1e3 * lo, 1e3 * hi)
        }
    }
}

/// Bytes as `12.3 MiB gathered`.
fn mib(bytes: usize) -> String {
    format!("{:.1} MiB gathered", bytes as f64 / (1u64 << 20) as f64)
}

/// Every rank's per-block root-inverse counters, in one list (collective;
/// each block is reported by one rank).
fn gather_root_inverse_blocks(
    opt: &Optimizer,
    comm: &dyn Communicator,
) -> Result<Vec<shampoo_tch::VariableRootInverseStats>> {
    let mine = opt.root_inverse_stats();
    if comm.world_size() == 1 || !matches!(opt, Optimizer::Shampoo { .. }) {
        return Ok(mine);
    }
    let mut all: Vec<_> = shampoo_dist::agreement::all_gather_json(comm, &mine)?
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    all.sort_by(|a, b| {
        (a.group, &a.variable, a.stats.block, a.stats.dim).cmp(&(
            b.group,
            &b.variable,
            b.stats.block,
            b.stats.dim,
        ))
    });
    Ok(all)
}

/// Writes a checkpoint of `state` (collective). The metrics are made
/// durable first, so that they cover the checkpoint's step; weights (and
/// the baselines' moments) that are not finite are an error instead, and
/// the previous checkpoint stays.
fn save_checkpoint(
    cfg: &TrainConfig,
    state: &State,
    vs: &VarStore,
    opt: &mut Optimizer,
    comm: &dyn Communicator,
    metrics: &mut MetricsWriter,
    last_ckpt: Option<u64>,
) -> Result<()> {
    let finite = divergence::all_finite(vs.variables().values())? && opt.state_is_finite()?;
    let mut flag = [f64::from(u8::from(!finite))];
    comm.all_reduce_mean_f64(&mut flag)?;
    if flag[0] > 0.0 {
        let kept = match last_ckpt {
            Some(s) => format!("the last checkpoint (step {s}) is kept"),
            None => "there is no earlier checkpoint".into(),
        };
        return Err(Error::Diverged {
            step: state.step,
            what: "the weights or the optimizer state hold NaN or Inf".into(),
            then: format!("no checkpoint was written from them and {kept}; lower --lr"),
        });
    }
    metrics.sync()?;
    let tmp = checkpoint::tmp_dir(&cfg.out);
    if comm.rank() == 0 {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(format!("removing {}", tmp.display())))?;
        }
        std::fs::create_dir_all(tmp.join("optim"))
            .map_err(io_err(format!("creating {}", tmp.display())))?;
        vs.save(tmp.join("model.ot"))?;
        checkpoint::write_state(&tmp, state)?;
    }
    comm.barrier()?;
    opt.save(&tmp.join("optim"), comm)?;
    comm.barrier()?;
    if comm.rank() == 0 {
        checkpoint::commit(&cfg.out)?;
    }
    Ok(comm.barrier()?)
}

fn resume(
    cfg: &TrainConfig,
    fresh: &State,
    vs: &mut VarStore,
    opt: &mut Optimizer,
) -> Result<State> {
    let ckpt = checkpoint::dir(&cfg.out);
    if !ckpt.is_dir() {
        return Err(Error::Checkpoint {
            path: ckpt,
            reason: "no checkpoint to resume from (run without --resume first, with --checkpoint-every N)".into(),
        });
    }
    let saved = checkpoint::read_state(&ckpt)?;
    if saved.model != fresh.model || saved.num_classes != fresh.num_classes {
        return Err(Error::CheckpointModel {
            path: ckpt,
            expected: format!("{} ({} classes)", fresh.model, fresh.num_classes),
            found: format!("{} ({} classes)", saved.model, saved.num_classes),
        });
    }
    let mismatch =
        |what: &str, a: &dyn std::fmt::Display, b: &dyn std::fmt::Display| Error::Checkpoint {
            path: checkpoint::dir(&cfg.out),
            reason: format!("it was written with {what} {a}, this run has {b}"),
        };
    if saved.optimizer != fresh.optimizer {
        return Err(mismatch("optimizer", &saved.optimizer, &fresh.optimizer));
    }
    if saved.dataset != fresh.dataset {
        return Err(mismatch("dataset", &saved.dataset, &fresh.dataset));
    }
    if saved.global_batch != fresh.global_batch {
        return Err(mismatch(
            "global batch",
            &saved.global_batch,
            &fresh.global_batch,
        ));
    }
    if saved.seed != fresh.seed {
        return Err(mismatch("seed", &saved.seed, &fresh.seed));
    }
    if let (Some(a), Some(b)) = (saved.train_len, fresh.train_len)
        && a != b
    {
        return Err(Error::Checkpoint {
            path: ckpt,
            reason: format!(
                "it was written with {a} training images, this run has {b} (--limit-train or --data changed): the order of the data, and so where the run stands in it, would change; resume with the same training set"
            ),
        });
    }
    if let (Some(a), Some(b)) = (&saved.schedule, &fresh.schedule)
        && a != b
    {
        tracing::warn!(
            "resuming with another learning-rate schedule than the checkpoint's run: {}",
            schedule_changes(a, b)
        );
    }
    vs.load(ckpt.join("model.ot"))
        .map_err(|e| Error::Checkpoint {
            path: ckpt.clone(),
            reason: format!("model.ot: {}", crate::error::torch_message(&e)),
        })?;
    opt.load(&ckpt.join("optim"), vs)?;
    Ok(saved)
}

/// What the learning rate of every step depends on (the decay only for the
/// step schedule), as recorded in checkpoints.
fn schedule_fingerprint(schedule: &Schedule, epochs: u64) -> serde_json::Value {
    let mut v = json!({
        "lr": schedule.lr, "warmup_steps": schedule.warmup, "total_steps": schedule.total,
        "epochs": epochs, "kind": schedule.kind,
    });
    if schedule.kind == ScheduleKind::Step {
        v["decay_steps"] = json!(schedule.decay_steps);
        v["decay_gamma"] = json!(schedule.gamma);
    }
    v
}

/// `--epochs 2 -> 3, the number of steps 16 -> 24`: every field that differs.
fn schedule_changes(was: &serde_json::Value, now: &serde_json::Value) -> String {
    let option = |k: &str| match k {
        "lr" => "--lr",
        "warmup_steps" => "--warmup-steps",
        "total_steps" => "the number of steps",
        "epochs" => "--epochs",
        "kind" => "--schedule",
        "decay_steps" => "--decay-steps",
        "decay_gamma" => "--decay-gamma",
        _ => "",
    };
    let (Some(a), Some(b)) = (was.as_object(), now.as_object()) else {
        return format!("{was} -> {now}");
    };
    let null = serde_json::Value::Null;
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{} {} -> {}",
                option(k),
                a.get(k).unwrap_or(&null),
                b.get(k).unwrap_or(&null)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a run's `summary.json`.
pub fn read_summary(run_dir: &Path) -> Result<Summary> {
    let path = run_dir.join("summary.json");
    let text =
        std::fs::read_to_string(&path).map_err(io_err(format!("reading {}", path.display())))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        context: format!("{}", path.display()),
        source,
    })
}
