//! Library side of `shampoo-bench`: reference parity, step timing and the
//! data-parallel scaling benchmark.
//!
//! The binary is a thin command-line front end over [`parity`], [`step`],
//! [`selfcheck`], [`scale`] and (with the `cuda` feature) `plan`; shape
//! sets for timings come from [`shapes`].

pub mod parity;
#[cfg(feature = "cuda")]
pub mod plan;
pub mod scale;
pub mod selfcheck;
pub mod shapes;
pub mod step;
