//! The project's documentation, compiled: every Rust example in these pages
//! runs as a test (`cargo test -p shampoo-docs`), so the docs cannot drift
//! from the code.

#[doc = include_str!("../usage.md")]
pub mod usage {}

#[doc = include_str!("../config.md")]
pub mod config {}

#[doc = include_str!("../architecture.md")]
pub mod architecture {}
