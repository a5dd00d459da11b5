//! Library side of `shampoo-bench`: reference parity and step timing.
//!
//! The binary is a thin command-line front end over [`parity`], [`step`]
//! and [`selfcheck`]; shape sets for timings come from [`shapes`].

pub mod parity;
pub mod selfcheck;
pub mod shapes;
pub mod step;
