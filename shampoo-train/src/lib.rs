//! `shampoo-train`: data-parallel image-classification training on libtorch
//! (`tch`) with Shampoo, AdamW or SGD, from a 2-rank CPU run on Fashion-MNIST
//! to ImageNet ResNet-50 on GPUs.
//!
//! The binary is a thin layer over [`train::run`] (training), [`plot::plot`]
//! (curves of several runs) and [`bench`] (GPU step-time comparison); see
//! `docs/training.md`.

pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod divergence;
pub mod error;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod options;
pub mod plot;
pub mod replicas;
pub mod rng;
pub mod run_dir;
pub mod schedule;
pub mod signals;
pub mod train;

pub use error::{Error, Result};
