//! # shampoo-core
//!
//! Distributed Shampoo's algorithm, step for step equal to the published
//! PyTorch implementation (facebookresearch/optimizers), written once over a
//! small [`Backend`](backend::Backend) trait with a CPU backend (faer +
//! rayon) and, behind the `cuda` feature, a CUDA backend.
//!
//! ```
//! use shampoo_core::{CpuBackend, HostView, HostViewMut, Shampoo, ShampooConfig, DType};
//!
//! let config = ShampooConfig::from_json(r#"{"lr": 0.01, "max_preconditioner_dim": 64,
//!     "grafting": {"type": "adam", "beta2": 0.999, "epsilon": 1e-8}}"#)?;
//! let shapes = vec![vec![32, 16], vec![16]];
//! let mut opt = Shampoo::new(config, &shapes, DType::F32, CpuBackend::new(1)?)?;
//! let mut w0 = vec![0.1f32; 32 * 16];
//! let mut w1 = vec![0.0f32; 16];
//! let g0 = vec![0.01f32; 32 * 16];
//! let g1 = vec![0.02f32; 16];
//! opt.step(
//!     &mut [HostViewMut::F32(&mut w0), HostViewMut::F32(&mut w1)],
//!     &[Some(HostView::F32(&g0)), Some(HostView::F32(&g1))],
//! )?;
//! assert!(w1.iter().all(|&w| w < 0.0));
//! # Ok::<(), shampoo_core::Error>(())
//! ```
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod algorithm;
pub mod backend;
pub mod blocking;
pub mod checkpoint;
pub mod config;
mod dtype;
mod error;
pub mod layout;
mod matrix;
pub mod memory;
pub mod reference;
pub mod schedule;
pub mod strided;

pub use algorithm::{BlockRootInverseStats, PhaseTimes, RootInverseCounters, Shampoo};
pub use backend::cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use backend::cuda::CudaBackend;
pub use config::ShampooConfig;
pub use dtype::{DType, Float, HostView, HostViewMut};
pub use error::{Error, MatrixKind, Result};
