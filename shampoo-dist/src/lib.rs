//! # shampoo-dist
//!
//! Data-parallel Shampoo: the blocks of a parameter group are spread over
//! ranks by a deterministic longest-processing-time assignment, each rank
//! computes only its own blocks' search directions and keeps only their
//! state, and one all-gather per step shares the directions. The optimizer
//! is written once over `shampoo_core`'s backend trait: CPU ranks exchange
//! host memory (in-process or TCP), GPU ranks device memory (NCCL on the
//! backend's stream, or staged through the host), through one
//! [`Collective`] trait. See `docs/distributed.md`.
//!
//! ```
//! use std::sync::Arc;
//! use shampoo_core::{CpuBackend, DType, HostViewMut, ShampooConfig};
//! use shampoo_dist::{CommOptions, DistOptions, DistributedShampoo, in_process};
//!
//! let config = ShampooConfig::from_json(r#"{"lr": 0.01, "max_preconditioner_dim": 8}"#)?;
//! let shapes = vec![vec![8, 8], vec![8]];
//! let comms = in_process(2, &CommOptions::default());
//! let params: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let handles: Vec<_> = comms
//!         .into_iter()
//!         .map(|comm| {
//!             let shapes = shapes.clone();
//!             let config = config.clone();
//!             s.spawn(move || -> shampoo_dist::Result<Vec<f32>> {
//!                 let mut opt = DistributedShampoo::new(
//!                     config, &shapes, DType::F32, CpuBackend::new(1)?, comm,
//!                     DistOptions::default(),
//!                 )?;
//!                 let (mut w, mut b) = (vec![0.5f32; 64], vec![0.0f32; 8]);
//!                 let rank = opt.rank() as f32;
//!                 let (mut gw, mut gb) = (vec![0.1 + rank; 64], vec![rank; 8]);
//!                 opt.step(
//!                     &mut [HostViewMut::F32(&mut w), HostViewMut::F32(&mut b)],
//!                     &mut [Some(HostViewMut::F32(&mut gw)), Some(HostViewMut::F32(&mut gb))],
//!                 )?;
//!                 Ok(w)
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
//! });
//! assert_eq!(params[0], params[1]); // every rank holds the same parameters
//! # Ok::<(), shampoo_dist::Error>(())
//! ```
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod agreement;
pub mod assign;
mod checkpoint;
pub mod collective;
pub mod comm;
mod error;
mod gradients;
mod optimizer;

/// The guide, `docs/distributed.md`; its Rust examples run as doctests.
#[doc = include_str!("../../docs/distributed.md")]
pub mod guide {}

pub use checkpoint::{MANIFEST, MANIFEST_FORMAT, Manifest, checkpoint_files};
pub use collective::{
    Collective, CollectiveKind, Collectives, FlagCounter, HostCollective, HostStaged,
    IntoCollective,
};
pub use comm::{
    CommDType, CommOptions, Communicator, SingleProcess, communicator_from_env, in_process,
    mean_in_rank_order,
};
pub use error::{Error, Result};
pub use gradients::GradientAverager;
pub use optimizer::{DistOptions, DistTimes, DistributedShampoo, average_gradients};
