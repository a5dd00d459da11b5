//! `shampoo-train`: the command line over the `shampoo_train` library.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shampoo_train::data::imagenet::OnCorrupt;
use shampoo_train::model::ModelKind;
use shampoo_train::optim::OptimizerKind;
use shampoo_train::plot;
use shampoo_train::schedule::ScheduleKind;
use shampoo_train::signals::Interrupt;
use shampoo_train::train::{self, DatasetKind, DeviceKind, TrainConfig};
use std::path::PathBuf;
use std::process::ExitCode;

/// Data-parallel image classification with Shampoo, AdamW or SGD on libtorch.
/// Run it under `shampoo-run --nproc-per-node N -- shampoo-train ...` for
/// several ranks.
#[derive(Debug, Parser)]
#[command(name = "shampoo-train", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model (metrics, checkpoints and a summary go to --out).
    Train(TrainArgs),
    /// Time training steps on synthetic ImageNet-shaped batches (random
    /// images, 1000 classes), e.g. ResNet-50 at batch 128 in bf16 on a GPU with
    /// Shampoo against AdamW; prints a JSON line.
    BenchStep {
        /// Steps not measured (first root inverses, allocator warmup).
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Measured steps (use a multiple of Shampoo's precondition_frequency
        /// for an amortised figure).
        #[arg(long, default_value_t = 200)]
        steps: usize,
        #[command(flatten)]
        train: TrainArgs,
    },
    /// Measure the ImageNet input pipeline alone (read, decode, random
    /// resized crop, resize, flip, batch assembly, as training runs it) on
    /// DIR/train; prints a JSON line with `images_per_s`.
    BenchData(BenchDataArgs),
    /// Draw the loss and test-accuracy curves of run folders into one PNG and
    /// print a comparison (final accuracies, the step at which each run passes
    /// the AdamW run's final accuracy, training-time ratios).
    Plot {
        /// Run folders (written by `shampoo-train train --out`).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The PNG to write.
        #[arg(short, long, default_value = "runs/plot.png")]
        output: PathBuf,
    },
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Dataset.
    #[arg(long, value_enum, default_value = "fashion-mnist")]
    dataset: DatasetKind,
    /// Dataset folder: Fashion-MNIST's idx files (default
    /// /usr/share/datasets/fashion-mnist) or ImageNet's DIR with train/ and val/.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model [default: cnn for fashion-mnist, resnet50 for imagenet].
    #[arg(long, value_enum)]
    model: Option<ModelKind>,
    /// Image side of ImageNet crops.
    #[arg(long, default_value_t = 224)]
    resolution: u32,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "shampoo")]
    optimizer: OptimizerKind,
    /// Shampoo configuration (JSON, docs/config.md) [default: the protocol's,
    /// shampoo-train/configs/fashion_mnist_shampoo.json]. --lr and
    /// --weight-decay, when given, override its `lr` and `weight_decay`.
    #[arg(long, value_name = "FILE")]
    shampoo_config: Option<PathBuf>,
    /// Epochs.
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// Global batch size (split evenly over the ranks).
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate [default: 1e-3; Shampoo: the config file's `lr`].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 100)]
    warmup_steps: u64,
    /// Learning-rate schedule after the warmup.
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: ScheduleKind,
    /// Step schedule: decay period in steps [default: a third of the steps].
    #[arg(long)]
    decay_steps: Option<u64>,
    /// Step schedule: decay factor.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    decay_gamma: f64,
    /// Weight decay, decoupled for AdamW and Shampoo, L2 for SGD [default:
    /// 1e-4; Shampoo: the config file's `weight_decay`].
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    momentum: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999, allow_negative_numbers = true)]
    beta2: f64,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8, allow_negative_numbers = true)]
    adam_eps: f64,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run folder (metrics.jsonl, run.json, summary.json, checkpoint/).
    #[arg(long, default_value = "runs/run")]
    out: PathBuf,
    /// Write a checkpoint every N steps (one is always written at the end).
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<u64>,
    /// Continue from OUT/checkpoint (model, optimizer and data position).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace the run OUT holds (its metrics, checkpoints and summary);
    /// without it, a folder that holds a run is refused unless resuming.
    #[arg(long)]
    overwrite: bool,
    /// Skip up to N steps whose loss or gradient is not finite (no update;
    /// they are listed in the metrics and the summary); the next one stops
    /// the run.
    #[arg(long, value_name = "N", default_value_t = 0)]
    skip_nonfinite: u64,
    /// Stop after this many steps in total (the schedule still spans every epoch).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Use only the first N training images.
    #[arg(long, value_name = "N")]
    limit_train: Option<usize>,
    /// Use only the first N test images.
    #[arg(long, value_name = "N")]
    limit_test: Option<usize>,
    /// Evaluate on the test set every N steps (always at the end of each epoch).
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,
    /// Images per evaluation batch and rank.
    #[arg(long, default_value_t = 1000)]
    eval_batch_size: usize,
    /// Without a terminal: log a line every N steps (0: never).
    #[arg(long, default_value_t = 50)]
    log_every: u64,
    /// Corrupt images: skip them with a warning and a count, or fail.
    #[arg(long, value_enum, default_value = "skip")]
    on_corrupt: OnCorrupt,
    /// Threads that decode and assemble batches [default: the cores per
    /// rank: available cores / LOCAL_WORLD_SIZE].
    #[arg(long, value_name = "N")]
    data_workers: Option<usize>,
    /// Batches prepared ahead of the step that uses them.
    #[arg(long, value_name = "N", default_value_t = 2)]
    prefetch: usize,
    /// Device: cpu, or cuda (GPU LOCAL_RANK).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
    /// bfloat16 autocast of the forward pass (CUDA only).
    #[arg(long)]
    bf16: bool,
    /// Channels-last memory layout of images and convolution weights.
    #[arg(long)]
    channels_last: bool,
    /// libtorch intra-op threads [default: OMP_NUM_THREADS, as shampoo-run sets it].
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Every rank writes its final weights to OUT/weights.rank<R>.ot (to check
    /// that the ranks agree).
    #[arg(long)]
    write_rank_weights: bool,
    /// Shampoo computes every block on every rank (no all-gather) instead of
    /// sharding the blocks over the ranks, on CPUs and GPUs alike.
    #[arg(long)]
    replicated: bool,
    /// How GPU ranks communicate device memory: NCCL on the GPUs, or through
    /// the host (no NCCL, or several ranks sharing one GPU).
    #[arg(long, value_enum, default_value = "nccl")]
    collective: shampoo_train::comm::CollectiveChoice,
    /// The CUDA device of this rank [default: SHAMPOO_RUN_CUDA_DEVICE, else
    /// LOCAL_RANK]; several ranks may share one (with --collective
    /// host-staged).
    #[arg(long, value_name = "INDEX")]
    cuda_device: Option<usize>,
}

#[derive(Debug, Args)]
struct BenchDataArgs {
    /// ImageNet-layout folder (DIR/train/<class>/*.jpg).
    #[arg(long)]
    data: PathBuf,
    /// Worker threads [default: the cores per rank, as `train`].
    #[arg(long, value_name = "N")]
    data_workers: Option<usize>,
    /// Batches prepared ahead.
    #[arg(long, value_name = "N", default_value_t = 2)]
    prefetch: usize,
    /// Images a batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Crop side.
    #[arg(long, default_value_t = 224)]
    resolution: u32,
    /// Images measured (whole batches; the order wraps over epochs).
    #[arg(long, default_value_t = 3000)]
    images: usize,
    /// Images run through an untimed pipeline first (page cache).
    #[arg(long, default_value_t = 1000)]
    warmup_images: usize,
    /// Seed of the order and the crops.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Corrupt images: skip them, or fail.
    #[arg(long, value_enum, default_value = "skip")]
    on_corrupt: OnCorrupt,
}

impl TrainArgs {
    fn config(self) -> TrainConfig {
        TrainConfig {
            dataset: self.dataset,
            data: self.data,
            model: self.model,
            resolution: self.resolution,
            optimizer: self.optimizer,
            shampoo_config: self.shampoo_config,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            schedule: self.schedule,
            decay_steps: self.decay_steps,
            decay_gamma: self.decay_gamma,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            betas: (self.beta1, self.beta2),
            adam_eps: self.adam_eps,
            seed: self.seed,
            out: self.out,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            max_steps: self.max_steps,
            limit_train: self.limit_train,
            limit_test: self.limit_test,
            eval_every: self.eval_every,
            eval_batch_size: self.eval_batch_size,
            log_every: self.log_every,
            on_corrupt: self.on_corrupt,
            data_workers: self.data_workers,
            prefetch: self.prefetch,
            device: self.device,
            bf16: self.bf16,
            channels_last: self.channels_last,
            threads: self.threads,
            progress: !self.no_progress,
            write_rank_weights: self.write_rank_weights,
            replicated: self.replicated,
            collective: self.collective,
            cuda_device: self.cuda_device,
            overwrite: self.overwrite,
            skip_nonfinite: self.skip_nonfinite,
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => {
            let cfg = args.config();
            let interrupt =
                Interrupt::install().context("installing the SIGINT/SIGTERM handlers")?;
            let comm = shampoo_train::comm::from_env().context("connecting the ranks")?;
            let rank = comm.rank();
            let s = train::run_with(&cfg, comm, &interrupt)?;
            if rank == 0 {
                println!(
                    "{} on {} rank(s): test accuracy {:.2}% (loss {:.4}) after {} steps, {:.1} s training; run folder {}",
                    s.optimizer,
                    s.world_size,
                    100.0 * s.test_acc,
                    s.test_loss,
                    s.steps,
                    s.train_s,
                    cfg.out.display()
                );
            }
            Ok(())
        }
        Command::BenchStep {
            warmup,
            steps,
            train,
        } => {
            let mut cfg = train.config();
            if cfg.model.is_none() {
                cfg.model = Some(ModelKind::Resnet50);
            }
            let comm = shampoo_train::comm::from_env().context("connecting the ranks")?;
            let rank = comm.rank();
            let r = shampoo_train::bench::bench_step(&cfg, warmup, steps, comm)?;
            if rank == 0 {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        Command::BenchData(a) => {
            let cfg = shampoo_train::data::bench::DataBenchConfig {
                workers: a
                    .data_workers
                    .unwrap_or_else(shampoo_train::data::loader::default_workers),
                prefetch: a.prefetch,
                batch_size: a.batch_size,
                resolution: a.resolution,
                images: a.images,
                warmup_images: a.warmup_images,
                seed: a.seed,
                on_corrupt: a.on_corrupt,
            };
            let r = shampoo_train::data::bench::bench_data(&a.data, &cfg)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Plot { runs, output } => {
            let runs = runs
                .iter()
                .map(|d| plot::Run::read(d))
                .collect::<Result<Vec<_>, _>>()?;
            print!("{}", plot::compare(&runs));
            plot::plot(&runs, &output)?;
            println!("plot written to {}", output.display());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shampoo-train: error: {e:#}");
            // 128 + signal after SIGINT/SIGTERM, else 1.
            let code = e
                .downcast_ref::<shampoo_train::Error>()
                .map_or(1, shampoo_train::Error::exit_code);
            ExitCode::from(code)
        }
    }
}
