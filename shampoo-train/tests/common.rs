//! Helpers shared by the integration tests.
#![allow(dead_code)]

use shampoo_train::optim::OptimizerKind;
use shampoo_train::train::TrainConfig;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// libtorch's random generator and thread count are process-global: tests
/// that initialise models take this lock so that they do not interleave.
pub fn torch_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A few-second Fashion-MNIST run: 512 training images, 256 test images,
/// global batch 64 (8 steps an epoch), 2 epochs, 4 warmup steps.
pub fn tiny(optimizer: OptimizerKind, out: &Path) -> TrainConfig {
    let mut cfg = TrainConfig::protocol(optimizer, out.to_path_buf());
    cfg.limit_train = Some(512);
    cfg.limit_test = Some(256);
    cfg.batch_size = 64;
    cfg.warmup_steps = 4;
    cfg.progress = false;
    cfg.threads = Some(1);
    cfg
}

/// Every variable of a saved `VarStore`, by name.
pub fn load_vars(path: &Path) -> Vec<(String, tch::Tensor)> {
    let mut v = tch::Tensor::load_multi(path).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Asserts two saved models are bitwise equal.
pub fn assert_same_weights(a: &Path, b: &Path) {
    let (va, vb) = (load_vars(a), load_vars(b));
    assert_eq!(va.len(), vb.len());
    for ((na, ta), (nb, tb)) in va.iter().zip(&vb) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "variable {na} differs");
    }
}
