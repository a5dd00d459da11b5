//! Training runs that survive interruption, divergence and user mistakes,
//! as a user meets them: the `shampoo-train` binary on small Fashion-MNIST
//! subsets. One test binary (each links libtorch) with a module per theme.

#[path = "../common.rs"]
mod common;

mod checkpoint_integrity;
mod divergence;
mod interruption;
mod mistakes;
mod run_folder;
