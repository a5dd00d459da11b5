#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs the whole test suite:
# formatting, lints, unit and integration tests of every crate (including
# NVRTC compilation of every CUDA kernel, which needs no GPU), and the
# float64 parity run against the published implementation's trajectories.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\033[1m[test]\033[0m %s\n' "$*" >&2; }

scripts/setup.sh
# shellcheck source=env.sh
source scripts/env.sh

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all crates, all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
if grep -q '^cuda = ' shampoo-core/Cargo.toml 2>/dev/null; then
    cargo clippy -p shampoo-core -p shampoo-bench --features cuda --all-targets --locked -- -D warnings
fi
# The NCCL transport (loaded at run time; its one-GPU test skips without a GPU).
cargo clippy -p shampoo-dist --features nccl --all-targets --locked -- -D warnings
# The workspace build turns on shampoo-tch's `cuda` feature (shampoo-train's
# default); the adapter without it is what a CPU-only user builds.
cargo clippy -p shampoo-tch --all-targets --locked -- -D warnings

log "cargo test"
cargo test --workspace --locked
if grep -q '^cuda = ' shampoo-core/Cargo.toml 2>/dev/null; then
    cargo test -p shampoo-core --features cuda --locked
    # The CUDA launch budget, counted on the backend's planner (no GPU).
    cargo test -p shampoo-bench --features cuda --locked --test launch_budget
fi
cargo test -p shampoo-dist --features nccl --locked
cargo test -p shampoo-tch --locked

log "reference parity (float64, tolerance 1e-5)"
cargo run -q -p shampoo-bench --locked -- parity testdata/reference/*.safetensors

log "all tests passed"
