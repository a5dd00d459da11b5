//! # shampoo-tch
//!
//! Shampoo for [`tch`] training loops: [`Shampoo`] takes a
//! [`tch::nn::VarStore`] and is used like tch's `nn::Optimizer`
//! (`zero_grad`, `step`, `backward_step`, `set_lr`, ...), with one
//! [`shampoo_core::ShampooConfig`] per `VarStore` group.
//!
//! Parameters and gradients are updated in place through their data
//! pointers: dense tensors of `f32` or `f64` (row-major, channels-last or
//! any other permutation of their dimensions), on the CPU or, with the
//! crate's `cuda` feature, on a CUDA device (`shampoo_core`'s CUDA backend
//! queues its work on libtorch's stream; nothing is copied between host and
//! device). Without the feature, CUDA variables are refused with an
//! [`Error::Variable`] that says so.
//!
//! ```no_run
//! use shampoo_core::ShampooConfig;
//! use shampoo_tch::Shampoo;
//! use tch::nn::{self, Module};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vs = nn::VarStore::new(tch::Device::Cpu);
//! let net = nn::linear(vs.root() / "fc", 8, 2, Default::default());
//! let config = ShampooConfig::from_json(r#"{"lr": 0.01, "grafting": {"type": "adam"}}"#)?;
//! let mut opt = Shampoo::new(&vs, config)?;
//! let x = tch::Tensor::randn([16, 8], (tch::Kind::Float, tch::Device::Cpu));
//! let loss = net.forward(&x).square().mean(None);
//! opt.backward_step(&loss)?;
//! # Ok(())
//! # }
//! ```
//!
//! Data-parallel: give the builder a `shampoo_dist` communicator
//! ([`ShampooBuilder::communicator`], or [`ShampooBuilder::collectives`]
//! with NCCL for GPU ranks); the loop stays the same. Each rank computes
//! the directions of its own share of the blocks, on the CPU and on GPUs,
//! and one all-gather per step shares them; replicated mode
//! ([`ShampooBuilder::replicated`]) is an explicit choice.
//!
//! The guide with groups, data-parallel training and checkpoints is
//! `docs/tch.md`.
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod checkpoint;
mod dist;
mod engine;
mod error;
mod optimizer;
mod telemetry;
mod vars;

pub use dist::{GradientAveraging, all_reduce_gradients};
pub use error::{Error, Result};
pub use optimizer::{Shampoo, ShampooBuilder, StepTimings};
pub use telemetry::VariableRootInverseStats;
pub use vars::CUDA_UNSUPPORTED;

/// The guide, `docs/tch.md`; its examples compile as doc tests.
#[doc = include_str!("../../docs/tch.md")]
pub mod guide {}
