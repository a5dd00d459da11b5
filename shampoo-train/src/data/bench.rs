//! `shampoo-train bench-data`: the throughput of the training input
//! pipeline alone (read, decode, random resized crop, resize, flip, batch
//! assembly into uint8 slots), exactly as training runs it, without a model.
//! The conversion to float, which training does on the model's device, is
//! left out.

use super::Dataset;
use super::imagenet::{ImageFolder, OnCorrupt};
use super::loader::{Loader, LoaderOptions, TrainPlan};
use super::{Split, steps_per_epoch};
use crate::error::{Error, Result};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tch::Device;

/// What to measure.
#[derive(Debug, Clone)]
pub struct DataBenchConfig {
    /// Worker threads.
    pub workers: usize,
    /// Batches prepared ahead.
    pub prefetch: usize,
    /// Images a batch.
    pub batch_size: usize,
    /// Crop side.
    pub resolution: u32,
    /// Images measured (rounded up to whole batches; the plan wraps over
    /// epochs when the folder holds fewer).
    pub images: usize,
    /// Images run through an untimed pipeline first (fills the page cache).
    pub warmup_images: usize,
    /// Seed of the order and the crops.
    pub seed: u64,
    /// Corrupt images.
    pub on_corrupt: OnCorrupt,
}

/// One measurement, printed as a JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct DataBenchResult {
    /// The folder.
    pub data: String,
    /// Training images in the folder.
    pub folder_images: usize,
    /// Worker threads.
    pub workers: usize,
    /// Batches prepared ahead.
    pub prefetch: usize,
    /// Images a batch.
    pub batch_size: usize,
    /// Crop side.
    pub resolution: u32,
    /// Images measured.
    pub images: usize,
    /// Wall-clock seconds from the pipeline's start to its last batch.
    pub seconds: f64,
    /// `images / seconds`.
    pub images_per_s: f64,
    /// CPU seconds of the process (every thread) over the same span.
    pub cpu_s: f64,
    /// `images / cpu_s`: images per CPU-second, i.e. per busy worker thread
    /// and second.
    pub images_per_cpu_s: f64,
    /// Images skipped as corrupt (warmup included).
    pub corrupt_images: usize,
}

/// User plus system CPU time of this process, every thread, in seconds.
pub fn process_cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a valid, writable `rusage`; getrusage fills it and
    // cannot fail for RUSAGE_SELF.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Runs `images` (rounded up to whole batches) through a fresh training
/// pipeline over `dir/train` and takes the time.
pub fn bench_data(dir: &Path, cfg: &DataBenchConfig) -> Result<DataBenchResult> {
    if cfg.batch_size == 0 || cfg.images == 0 {
        return Err(Error::Invalid(
            "--batch-size and --images must be at least 1".into(),
        ));
    }
    let folder: Arc<dyn Dataset> = Arc::new(ImageFolder::open(
        dir,
        Split::Train,
        cfg.resolution,
        cfg.on_corrupt,
    )?);
    if steps_per_epoch(folder.len(), cfg.batch_size) == 0 {
        return Err(Error::Invalid(format!(
            "{} holds {} training images, fewer than one batch of {}",
            dir.display(),
            folder.len(),
            cfg.batch_size
        )));
    }
    let opts = LoaderOptions {
        workers: cfg.workers,
        prefetch: cfg.prefetch,
        device: Device::Cpu,
        channels_last: false,
        seed: cfg.seed,
    };
    let batches = |images: usize| images.div_ceil(cfg.batch_size) as u64;
    let run = |from: u64, count: u64| -> Result<usize> {
        let plan = TrainPlan::new(
            folder.len(),
            cfg.seed,
            cfg.batch_size,
            (0, 1),
            (from, from + count),
        );
        let mut loader = Loader::new(folder.clone(), Box::new(plan), opts)?;
        let mut n = 0;
        while let Some(k) = loader.next_with(|_, labels, _| labels.len())? {
            n += k;
        }
        Ok(n)
    };
    let warm = batches(cfg.warmup_images);
    if warm > 0 {
        run(0, warm)?;
    }
    let cpu0 = process_cpu_seconds();
    let t0 = Instant::now();
    let images = run(warm, batches(cfg.images))?;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_s = process_cpu_seconds() - cpu0;
    Ok(DataBenchResult {
        data: dir.display().to_string(),
        folder_images: folder.len(),
        workers: cfg.workers,
        prefetch: cfg.prefetch,
        batch_size: cfg.batch_size,
        resolution: cfg.resolution,
        images,
        seconds,
        images_per_s: images as f64 / seconds,
        cpu_s,
        images_per_cpu_s: images as f64 / cpu_s,
        corrupt_images: folder.corrupt_count(),
    })
}
