//! A loader dropped mid-epoch, a loader whose batch failed and a training run
//! stopped mid-epoch (or failing on a corrupt image) leave no thread behind.
//!
//! One test in its own binary: it counts the threads of the process
//! (`/proc/self/task`), which other tests running alongside would change.

mod image_folder;

use image_folder::{CLASSES, make_folder, settle_threads, thread_count, write_corrupt};
use shampoo_train::data::Split;
use shampoo_train::data::imagenet::{ImageFolder, OnCorrupt};
use shampoo_train::data::loader::{Loader, LoaderOptions, TrainPlan};
use shampoo_train::model::ModelKind;
use shampoo_train::optim::OptimizerKind;
use shampoo_train::train::{DatasetKind, TrainConfig, run};
use std::sync::Arc;
use tch::Device;

#[test]
fn stopping_mid_epoch_leaves_no_thread_behind() {
    let data = tempfile::tempdir().unwrap();
    make_folder(data.path(), 8); // 24 training images
    let mut cfg = TrainConfig::protocol(OptimizerKind::Adamw, data.path().join("run"));
    cfg.dataset = DatasetKind::Imagenet;
    cfg.data = Some(data.path().to_path_buf());
    cfg.model = Some(ModelKind::Resnet18);
    cfg.resolution = 16;
    cfg.batch_size = 4; // 6 steps an epoch
    cfg.epochs = 2;
    cfg.warmup_steps = 1;
    cfg.eval_batch_size = 4;
    cfg.progress = false;
    cfg.threads = Some(1);
    cfg.data_workers = Some(3);
    cfg.max_steps = Some(2);
    // A first run starts whatever libtorch keeps for the process.
    run(&cfg, shampoo_train::comm::single()).unwrap();
    let base = settle_threads(thread_count());

    // A training run stopped at step 3 of 12.
    cfg.max_steps = Some(3);
    cfg.out = data.path().join("run2");
    assert_eq!(run(&cfg, shampoo_train::comm::single()).unwrap().steps, 3);
    assert_eq!(settle_threads(base), base, "after a run stopped mid-epoch");

    // A loader dropped with batches still in its queue.
    let ds = Arc::new(ImageFolder::open(data.path(), Split::Train, 16, OnCorrupt::Fail).unwrap());
    let opts = LoaderOptions {
        workers: 3,
        prefetch: 2,
        device: Device::Cpu,
        channels_last: false,
        seed: 0,
    };
    let mut loader = Loader::new(
        ds.clone(),
        Box::new(TrainPlan::new(24, 0, 4, (0, 1), (0, 12))),
        opts,
    )
    .unwrap();
    loader.next_batch().unwrap().unwrap();
    assert_eq!(thread_count(), base + 3, "three workers while loading");
    drop(loader);
    assert_eq!(
        settle_threads(base),
        base,
        "after dropping a loader mid-epoch"
    );

    // A run that fails on a corrupt image mid-epoch.
    write_corrupt(
        &data
            .path()
            .join("train")
            .join(CLASSES[2])
            .join("zz_broken.jpg"),
    );
    cfg.on_corrupt = OnCorrupt::Fail;
    cfg.max_steps = None;
    cfg.out = data.path().join("run3");
    let err = run(&cfg, shampoo_train::comm::single())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("corrupt image "), "{err}");
    assert_eq!(
        settle_threads(base),
        base,
        "after a run failed on a corrupt image"
    );
}
