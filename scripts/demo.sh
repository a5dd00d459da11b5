#!/usr/bin/env bash
# The README's main command. On a fresh Debian/Ubuntu machine with a Rust
# toolchain: installs what is needed (scripts/setup.sh), builds, trains the
# protocol's CNN on Fashion-MNIST with Shampoo and with AdamW, each on 2 CPU
# ranks through shampoo-run, prints their test accuracies side by side with
# the wall-clock ratio, and writes the plot runs/fashion_mnist.png.
#
# Environment: RUNS (default runs), EPOCHS (2), EVAL_EVERY (test-set
# evaluation period in steps, 24), NPROC (ranks, 2). Extra arguments go to
# both `shampoo-train train` commands.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

RUNS=${RUNS:-runs}
EPOCHS=${EPOCHS:-2}
EVAL_EVERY=${EVAL_EVERY:-24}
NPROC=${NPROC:-2}

echo "[demo] building (release)" >&2
cargo build --release --quiet -p shampoo-train -p shampoo-launcher
BIN=target/release

declare -A WALL
for opt in shampoo adamw; do
    out="$RUNS/fashion_mnist_$opt"
    rm -rf "$out"
    extra=()
    [ "$opt" = shampoo ] && extra=(--shampoo-config shampoo-train/configs/fashion_mnist_shampoo.json)
    echo "[demo] $opt on $NPROC CPU ranks, $EPOCHS epochs" >&2
    start=$(date +%s.%N)
    "$BIN/shampoo-run" --nproc-per-node "$NPROC" -- "$BIN/shampoo-train" train \
        --dataset fashion-mnist --optimizer "$opt" "${extra[@]}" \
        --epochs "$EPOCHS" --batch-size 128 --lr 1e-3 --warmup-steps 100 --schedule cosine \
        --weight-decay 1e-4 --eval-every "$EVAL_EVERY" --out "$out" "$@"
    end=$(date +%s.%N)
    WALL[$opt]=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
done

echo
"$BIN/shampoo-train" plot "$RUNS/fashion_mnist_shampoo" "$RUNS/fashion_mnist_adamw" -o "$RUNS/fashion_mnist.png"
awk -v s="${WALL[shampoo]}" -v a="${WALL[adamw]}" 'BEGIN {
    printf "wall clock (whole launcher run, start-up and evaluations included): shampoo %.1f s, adamw %.1f s, ratio %.2fx\n", s, a, s / a }'
