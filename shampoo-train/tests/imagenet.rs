//! A tiny ImageNet-layout folder of generated JPEGs (and CMYK, YCCK,
//! greyscale and PNG-as-JPEG files): training end to end with ResNet-18,
//! exact mid-epoch resume through the prefetching loader, and the layout and
//! corrupt-image errors.

mod common;
mod image_folder;

use common::{assert_same_weights, torch_lock};
use image_folder::{add_odd_files, make_folder};
use shampoo_train::comm::Communicator;
use shampoo_train::data::imagenet::OnCorrupt;
use shampoo_train::model::ModelKind;
use shampoo_train::optim::OptimizerKind;
use shampoo_train::train::{DatasetKind, TrainConfig, run};
use std::path::Path;
use std::sync::Arc;

fn config(data: &Path, out: &Path) -> TrainConfig {
    let mut cfg = TrainConfig::protocol(OptimizerKind::Adamw, out.to_path_buf());
    cfg.dataset = DatasetKind::Imagenet;
    cfg.data = Some(data.to_path_buf());
    cfg.model = Some(ModelKind::Resnet18);
    cfg.resolution = 32;
    cfg.batch_size = 6;
    cfg.epochs = 2;
    cfg.warmup_steps = 1;
    cfg.eval_batch_size = 4;
    cfg.progress = false;
    cfg.threads = Some(1);
    cfg
}

fn single() -> Arc<dyn Communicator> {
    shampoo_train::comm::single()
}

#[test]
fn tiny_imagenet_folder_trains_end_to_end_with_resnet18() {
    let _g = torch_lock();
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    make_folder(data.path(), 4);
    add_odd_files(data.path());
    let s = run(&config(data.path(), out.path()), single()).unwrap();
    // 16 training images (4 of them the CMYK, YCCK, grey and PNG files),
    // global batch 6: 2 steps an epoch.
    assert_eq!(s.steps, 4);
    assert_eq!(s.model, "resnet18");
    assert_eq!(s.corrupt_images, 0);
    // The step lines carry the data wait.
    let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(step["kind"], "step");
    assert!(step["data_wait"].as_f64().unwrap() >= 0.0);
    assert!(s.test_loss.is_finite());
    // 6 validation images: the accuracy is a multiple of 1/6.
    assert_eq!((s.test_acc * 6.0).round() / 6.0, s.test_acc);
}

#[test]
fn imagenet_resume_mid_epoch_is_exact() {
    let _g = torch_lock();
    let data = tempfile::tempdir().unwrap();
    make_folder(data.path(), 4);
    add_odd_files(data.path());
    let full = tempfile::tempdir().unwrap();
    let split = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), full.path());
    cfg.batch_size = 4; // 4 steps an epoch, 8 in all
    cfg.data_workers = Some(2);
    let a = run(&cfg, single()).unwrap();
    assert_eq!(a.steps, 8);

    // Stop at step 3 of 8 (mid-epoch), then continue with another worker
    // count and prefetch depth.
    let mut first = config(data.path(), split.path());
    first.batch_size = 4;
    first.data_workers = Some(2);
    first.max_steps = Some(3);
    first.checkpoint_every = Some(3);
    assert_eq!(run(&first, single()).unwrap().steps, 3);
    let mut rest = first.clone();
    rest.max_steps = None;
    rest.resume = true;
    rest.data_workers = Some(1);
    rest.prefetch = 1;
    let b = run(&rest, single()).unwrap();
    assert_eq!(b.steps, 8);
    assert_same_weights(
        &full.path().join("checkpoint/model.ot"),
        &split.path().join("checkpoint/model.ot"),
    );
    assert_eq!((a.test_acc, a.test_loss), (b.test_acc, b.test_loss));
}

#[test]
fn corrupt_image_is_skipped_and_counted_or_fails() {
    let _g = torch_lock();
    let data = tempfile::tempdir().unwrap();
    make_folder(data.path(), 4);
    let bad = data.path().join("train/n02_green/broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not a JPEG").unwrap();

    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), out.path());
    cfg.epochs = 1;
    cfg.batch_size = 13; // every training image, the broken one included, in the one step
    let s = run(&cfg, single()).unwrap();
    assert_eq!(s.steps, 1);
    assert_eq!(s.corrupt_images, 1);

    cfg.on_corrupt = OnCorrupt::Fail;
    cfg.overwrite = true;
    let err = run(&cfg, single()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("corrupt image {}: ", bad.display())),
        "unexpected message: {err}"
    );
    assert!(
        err.ends_with("(use --on-corrupt skip to skip such images with a warning)"),
        "{err}"
    );
}

#[test]
fn empty_class_folder_is_an_error() {
    let data = tempfile::tempdir().unwrap();
    make_folder(data.path(), 1);
    let empty = data.path().join("train/n04_empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = run(&config(data.path(), out.path()), single())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "bad dataset folder {}: class folder holds no images",
            empty.display()
        )
    );
}

#[test]
fn file_among_class_folders_is_an_error() {
    let data = tempfile::tempdir().unwrap();
    make_folder(data.path(), 1);
    let stray = data.path().join("train/labels.txt");
    std::fs::write(&stray, "x").unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = run(&config(data.path(), out.path()), single())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "bad dataset folder {}: is a file, but {} must hold only class folders",
            stray.display(),
            data.path().join("train").display()
        )
    );
}

#[test]
fn missing_train_folder_is_an_error() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = run(&config(data.path(), out.path()), single())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "bad dataset folder {}: no such folder; expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg",
            data.path().join("train").display()
        )
    );
}

#[test]
fn checkpoint_of_another_model_is_refused() {
    let _g = torch_lock();
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    make_folder(data.path(), 2);
    let mut cfg = config(data.path(), out.path());
    cfg.epochs = 1;
    run(&cfg, single()).unwrap();
    cfg.model = Some(ModelKind::Resnet50);
    cfg.resume = true;
    let err = run(&cfg, single()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "checkpoint {} was written for model `resnet18 (3 classes)`, but this run uses `resnet50 (3 classes)`",
            out.path().join("checkpoint").display()
        )
    );
}
