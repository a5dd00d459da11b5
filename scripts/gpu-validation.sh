#!/usr/bin/env bash
# GPU validation of the CUDA backend, in one go (docs/gpu-validation.md).
#
# Run on a machine with an NVIDIA GPU (H100/H200), a driver, and a Python
# with PyTorch 2.11 (CUDA 13 wheels), from a checkout of this repository:
#
#   scripts/gpu-validation.sh [--bin PATH] [--tests PATH] [--nccl-tests PATH]
#                             [--tch-tests PATH] [--data-tests PATH]
#                             [--train PATH] [--launcher PATH] [--only GROUPS]
#                             [--python PATH] [--out DIR]
#
#   --bin     shampoo-bench built with `cargo build --release -p shampoo-bench
#             --features cuda` (default: target/release/shampoo-bench)
#   --tests   the CUDA-versus-CPU test executable (shampoo-core's
#             tests/cuda_backend.rs), built with `cargo test --release -p
#             shampoo-core --features cuda --test cuda_backend --no-run`
#             (optional; skipped when not given)
#   --nccl-tests  the one-GPU NCCL test executable (shampoo-dist's
#             tests/nccl_gpu.rs), built with `cargo test --release -p
#             shampoo-dist --features nccl --test nccl_gpu --no-run`
#             (optional; skipped when not given)
#   --tch-tests  the CUDA test executable of the tch adapter (shampoo-tch's
#             tests/cuda.rs), built with `cargo test --release -p shampoo-tch
#             --features nccl --test cuda --no-run` (optional)
#   --data-tests  the input-pipeline test executable (shampoo-train's
#             tests/data_pipeline.rs), built with `cargo test --release -p
#             shampoo-train --test data_pipeline --no-run`: batches through
#             pinned slots and asynchronous copies equal the CPU ones
#             (optional)
#   --train   shampoo-train built with `cargo build --release -p
#             shampoo-train`: times a ResNet-50 training step (batch 128,
#             bf16) with AdamW and with Shampoo, the training loop on the
#             GPU (resume, divergence stop), the ImageNet input pipeline on
#             a generated folder (bench-data with one worker per core, 40
#             ResNet-50 steps fed by it), and check (c) of the distributed
#             group (optional)
#   --launcher  shampoo-run built with `cargo build --release -p
#             shampoo-launcher` (default: target/release/shampoo-run; the
#             distributed group's check (c) needs it)
#   --only    comma-separated groups to run (default: all): parity,
#             cuda-tests, nccl-tests, tch-tests, data-tests, selfcheck, step,
#             train, distributed. `--only distributed` is issue 11's run (under 8
#             minutes): (a) NCCL in a world of one, sharded == local bit for
#             bit; (b) two processes on the GPU through the host-staged
#             collective; (c) shampoo-train, ResNet-18, 2 ranks on the GPU,
#             20 steps, identical weights; the CUDA memory benchmark
#   --python  the Python whose site-packages hold torch and nvidia/*
#             (default: .venv/bin/python if present, else python3)
#   --out     where the logs go (default: gpu-validation-<UTC time>)
#
# Every check runs even if an earlier one fails; the summary at the end
# (also in OUT/summary.txt) lists each check's exit status. Exit status:
# 0 if every check passed, 1 otherwise, 2 on a setup problem.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/shampoo-bench
TESTS=""
NCCL_TESTS=""
TCH_TESTS=""
DATA_TESTS=""
TRAIN=""
LAUNCHER=target/release/shampoo-run
ONLY=all
PY=""
OUT="gpu-validation-$(date -u +%Y%m%dT%H%M%SZ)"
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN="$2"; shift 2 ;;
        --tests) TESTS="$2"; shift 2 ;;
        --nccl-tests) NCCL_TESTS="$2"; shift 2 ;;
        --tch-tests) TCH_TESTS="$2"; shift 2 ;;
        --data-tests) DATA_TESTS="$2"; shift 2 ;;
        --train) TRAIN="$2"; shift 2 ;;
        --launcher) LAUNCHER="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,53p' "$0"; exit 0 ;;
        *) echo "gpu-validation: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

log() { printf '\033[1m[gpu-validation]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }
# want GROUP: whether --only selects GROUP.
want() { [ "$ONLY" = all ] || [[ ",$ONLY," == *",$1,"* ]]; }
for g in ${ONLY//,/ }; do
    case "$g" in
        all|parity|cuda-tests|nccl-tests|tch-tests|data-tests|selfcheck|step|train|distributed) ;;
        *) die "unknown group $g in --only (see --help)" ;;
    esac
done

[ -z "$TESTS" ] || [ -x "$TESTS" ] || die "no executable $TESTS (see --tests)"
[ -z "$NCCL_TESTS" ] || [ -x "$NCCL_TESTS" ] || die "no executable $NCCL_TESTS (see --nccl-tests)"
[ -z "$TCH_TESTS" ] || [ -x "$TCH_TESTS" ] || die "no executable $TCH_TESTS (see --tch-tests)"
[ -z "$DATA_TESTS" ] || [ -x "$DATA_TESTS" ] || die "no executable $DATA_TESTS (see --data-tests)"
[ -z "$TRAIN" ] || [ -x "$TRAIN" ] || die "no executable $TRAIN (see --train)"
if want distributed && [ -n "$TRAIN" ] && [ ! -x "$LAUNCHER" ]; then
    die "no executable $LAUNCHER; build it with: cargo build --release -p shampoo-launcher (or pass --launcher)"
fi
[ -x "$BIN" ] || die "no executable $BIN; build it with: cargo build --release -p shampoo-bench --features cuda"
command -v "$PY" >/dev/null 2>&1 || die "no Python at $PY (pass --python)"
SITE="$("$PY" -c 'import site; print(site.getsitepackages()[0])')" || die "$PY cannot name its site-packages"
[ -d "$SITE/torch/lib" ] || die "no PyTorch in $SITE (expected $SITE/torch/lib)"
[ -d "$SITE/nvidia/cu13/lib" ] || die "no CUDA 13 libraries in $SITE (expected $SITE/nvidia/cu13/lib)"

export LD_LIBRARY_PATH="$SITE/torch/lib:$SITE/nvidia/cu13/lib:$SITE/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SHAMPOO_CUDA_LIB_DIRS="$SITE/nvidia/cu13/lib:$SITE/nvidia/nccl/lib"
mkdir -p "$OUT" || die "cannot create $OUT"
log "logs in $OUT"

# The machine, for the record.
{
    date -u
    uname -a
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no device")'
    "$BIN" --version
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" >&2

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0
# check NAME TIMEOUT_S COMMAND...: runs the command, output to OUT/NAME.txt.
check() {
    local name="$1" limit="$2"
    shift 2
    log "$name: $*"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.txt" >&2
    if [ "$rc" -eq 0 ]; then
        echo "ok      $name" >>"$SUMMARY"
    else
        echo "FAILED  $name (exit $rc; $OUT/$name.txt)" >>"$SUMMARY"
        FAILED=1
    fi
}

if want parity; then
    # The reference cases of the modes the CUDA backend runs (it refuses the
    # others when the optimizer is built: docs/cuda-backend.md), then the refused
    # ones, which must fail with "cannot run ... yet" and nothing else.
    REFUSED='eigendecomposed_adaptive|soap_qr|soap_qr3_tol_ignored_dims|spectral_svd'
    shopt -s nullglob
    CASES=()
    REFUSED_CASES=()
    for f in testdata/reference/*.safetensors; do
        if [[ "$(basename "$f" .safetensors)" =~ ^($REFUSED)$ ]]; then
            REFUSED_CASES+=("$f")
        else
            CASES+=("$f")
        fi
    done
    shopt -u nullglob
    if [ ${#CASES[@]} -eq 0 ]; then
        echo "FAILED  parity (no testdata/reference/*.safetensors)" >>"$SUMMARY"
        FAILED=1
    else
        check parity 1200 "$BIN" parity --backend cuda "${CASES[@]}"
        log "parity_refused: the other cases are refused, not wrong"
        timeout 600 "$BIN" parity --backend cuda "${REFUSED_CASES[@]}" >"$OUT/parity_refused.txt" 2>&1
        if grep -E ' (ok|FAIL) +step' "$OUT/parity_refused.txt" >/dev/null \
            || [ "$(grep -c 'cannot run' "$OUT/parity_refused.txt")" -ne ${#REFUSED_CASES[@]} ]; then
            echo "FAILED  parity_refused ($OUT/parity_refused.txt)" >>"$SUMMARY"
            FAILED=1
        else
            echo "ok      parity_refused" >>"$SUMMARY"
        fi
    fi
fi
if want cuda-tests; then
    if [ -n "$TESTS" ]; then
        # Primitive by primitive and whole runs against the CPU backend; a test
        # that finds no GPU prints "skipping", which counts as a failure here.
        check cuda_tests 1800 "$TESTS" --test-threads 1 --nocapture
        if grep -q 'skipping: no usable CUDA device' "$OUT/cuda_tests.txt"; then
            echo "FAILED  cuda_tests skipped a test: no usable GPU ($OUT/cuda_tests.txt)" >>"$SUMMARY"
            FAILED=1
        fi
    else
        echo "skipped cuda_tests (no --tests)" >>"$SUMMARY"
    fi
fi
# no_skips NAME: a GPU test that printed "skipped: <why>" (other than the
# one that needs no GPU) did not run, which is a failure here.
no_skips() {
    if grep 'skipped:' "$OUT/$1.txt" | grep -qv 'a GPU is present'; then
        echo "FAILED  $1 skipped a test ($OUT/$1.txt)" >>"$SUMMARY"
        FAILED=1
    fi
}
if want nccl-tests; then
    if [ -n "$NCCL_TESTS" ]; then
        # Every GPU test of shampoo-dist, among them (a) and (b) below.
        check nccl_tests 600 "$NCCL_TESTS" --test-threads 1 --nocapture
        no_skips nccl_tests
    else
        echo "skipped nccl_tests (no --nccl-tests)" >>"$SUMMARY"
    fi
fi
if want tch-tests; then
    if [ -n "$TCH_TESTS" ]; then
        # CUDA variables through the tch adapter against the CPU adapter,
        # sharded and replicated data-parallel CUDA ranks sharing the GPU, and
        # NCCL in a world of one; "skipped:" means no GPU here.
        check tch_cuda_tests 900 "$TCH_TESTS" --test-threads 1 --nocapture
        no_skips tch_cuda_tests
    else
        echo "skipped tch_cuda_tests (no --tch-tests)" >>"$SUMMARY"
    fi
fi
if want selfcheck; then
    check selfcheck_f32 1200 "$BIN" selfcheck --dtype f32
    check selfcheck_f64 1200 "$BIN" selfcheck --dtype f64
fi
if want step; then
    for set in resnet50 gpt2_small; do
        # What the step issues (counted, no GPU needed), then three configs
        # side by side: eigh, batched Newton, batched Newton with TF32
        # statistics and bf16 products (ratios to the first).
        check "plan_$set" 60 "$BIN" plan --shapes "$set"
        check "step_cuda_$set" 1800 "$BIN" step --backend cuda --shapes "$set" \
            --config benches/configs/gpu.json --config benches/configs/gpu_batched_newton.json \
            --config benches/configs/gpu_batched_newton_bf16.json
        check "yardstick_$set" 1800 "$PY" benches/python/published_step.py \
            --device cuda --shapes "$set" --max-dim 1024 --json
    done
fi
if want train; then
    if [ -n "$TRAIN" ]; then
        # ResNet-50 training step, batch 128, bf16: AdamW against
        # Shampoo (precondition_frequency 100, max_preconditioner_dim 1024, Adam
        # grafting), 200 timed steps after 110, so two root-inverse steps are
        # amortised. The config is benches/configs/resnet50_train.json.
        common=(--device cuda --bf16 --model resnet50 --batch-size 128
                --resolution 224 --warmup 110 --steps 200)
        check train_step_adamw 1800 "$TRAIN" bench-step "${common[@]}" --optimizer adamw
        check train_step_shampoo 1800 "$TRAIN" bench-step "${common[@]}" --optimizer shampoo \
            --shampoo-config benches/configs/resnet50_train.json
        # The same pair with channels-last weights and images (Shampoo reads
        # and writes the weights in place through their strides).
        check train_step_adamw_channels_last 1800 "$TRAIN" bench-step "${common[@]}" \
            --channels-last --optimizer adamw
        check train_step_shampoo_channels_last 1800 "$TRAIN" bench-step "${common[@]}" \
            --channels-last --optimizer shampoo --shampoo-config benches/configs/resnet50_train.json
        # The training loop on a GPU (Fashion-MNIST CNN, Shampoo on CUDA
        # variables): the per-step finiteness check of the loss and gradients,
        # checkpoint checksums, resume, and the divergence stop (lr 1e6: exit 1
        # at step 3, the last checkpoint finite).
        tiny=(train --device cuda --optimizer shampoo --limit-train 2560 --limit-test 500
              --epochs 1 --no-progress)
        check train_cuda_resume 300 bash -c '"$0" "${@:2}" --max-steps 10 --checkpoint-every 10 --out "$1" &&
            "$0" "${@:2}" --resume --out "$1"' "$TRAIN" "$OUT/train_cuda" "${tiny[@]}"
        check train_cuda_divergence_stops 300 bash -c '"$0" "${@:2}" --lr 1e6 --warmup-steps 0 \
            --checkpoint-every 1 --out "$1"; test $? -eq 1 && grep -q "\"step\": 2," "$1/checkpoint/state.json"' \
            "$TRAIN" "$OUT/train_cuda_nan" "${tiny[@]}"
        # The input pipeline feeding one GPU: a generated folder (1,000 JPEGs of
        # 500x375 / 375x500, quality 90), bench-data with one worker per core,
        # then 40 ResNet-50 steps (batch 128, bf16, channels-last) fed by it;
        # OUT/pipeline/run/metrics.jsonl has each step's data_wait.
        cores="$(nproc)"
        check pipeline_folder 900 "$PY" benches/python/make_imagenet_folder.py --out "$OUT/pipeline/data"
        check pipeline_bench_data 600 "$TRAIN" bench-data --data "$OUT/pipeline/data" --data-workers "$cores"
        check pipeline_train_resnet50 900 "$TRAIN" train --dataset imagenet --data "$OUT/pipeline/data" \
            --device cuda --bf16 --channels-last --model resnet50 --optimizer adamw --batch-size 128 \
            --max-steps 40 --warmup-steps 5 --limit-test 128 --eval-batch-size 128 --log-every 10 \
            --data-workers "$cores" --no-progress --out "$OUT/pipeline/run"
        "$PY" - "$OUT/pipeline/run/metrics.jsonl" >"$OUT/pipeline_data_wait.txt" 2>&1 <<'PYEOF'
import json, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if r.get("kind") == "step"][1:]
wait = sum(r["data_wait"] for r in steps)
total = sum(r["step_time"] for r in steps)
print(f"steps 2-{len(steps) + 1}: data wait {1e3 * wait / len(steps):.2f} ms a step, "
      f"{100 * wait / total:.2f}% of the step, {sum(r['images_per_s'] for r in steps) / len(steps):.0f} img/s")
PYEOF
        cat "$OUT/pipeline_data_wait.txt" >&2
    else
        echo "skipped train_step_* (no --train)" >>"$SUMMARY"
    fi
fi
if want distributed; then
    # Issue 11: sharded data-parallel Shampoo on the GPU.
    if [ -n "$NCCL_TESTS" ]; then
        # (a) NCCL in a world of one: sharded DistributedShampoo on the CUDA
        # backend equals the local CUDA optimizer bit for bit (and bf16
        # through NCCL equals the host path; the GPU checkpoint loads on CPU).
        check dist_a_nccl_world_of_one 300 "$NCCL_TESTS" --exact \
            nccl_world_of_one_sharded_equals_local_bitwise --test-threads 1 --nocapture
        no_skips dist_a_nccl_world_of_one
        # (b) Two processes sharing the GPU through the host-staged
        # collective: bitwise equal to each other, within 5e-3 (the f32
        # self-check bound) of one CUDA process, about half the state each.
        check dist_b_two_processes_one_gpu 400 "$NCCL_TESTS" --exact \
            two_processes_share_one_gpu_through_the_host_staged_collective \
            --test-threads 1 --nocapture
        no_skips dist_b_two_processes_one_gpu
    else
        echo "FAILED  dist_a, dist_b (no --nccl-tests)" >>"$SUMMARY"
        FAILED=1
    fi
    if [ -n "$TRAIN" ] && [ -x "$LAUNCHER" ]; then
        # (c) shampoo-train on two ranks sharing GPU 0 (NCCL refuses two ranks
        # on one GPU, so the host-staged collective), ResNet-18, 20 steps
        # with root inverses every 5: the ranks end with identical weights.
        check dist_c_train_two_ranks_one_gpu 400 "$LAUNCHER" --nproc-per-node 2 -- \
            "$TRAIN" bench-step --device cuda --cuda-device 0 --collective host-staged \
            --model resnet18 --batch-size 32 --resolution 112 --warmup 0 --steps 20 \
            --optimizer shampoo --shampoo-config benches/configs/resnet18_dist_check.json
        if ! grep -q '"weights_identical":true' "$OUT/dist_c_train_two_ranks_one_gpu.txt"; then
            echo "FAILED  dist_c: the ranks' weights differ or no result ($OUT/dist_c_train_two_ranks_one_gpu.txt)" >>"$SUMMARY"
            FAILED=1
        fi
    else
        echo "FAILED  dist_c (needs --train and an executable --launcher $LAUNCHER)" >>"$SUMMARY"
        FAILED=1
    fi
    # Memory: per-rank optimizer state on the GPU within 10% of 1/W (the
    # command exits 1 otherwise), with each rank's device memory.
    check dist_scale_cuda 400 "$BIN" scale --backend cuda --shapes resnet50 \
        --ranks 1,2,4,8 --max-dim 1024 --steps 2
fi
if want data-tests; then
    if [ -n "$DATA_TESTS" ]; then
        check data_pipeline_tests 300 "$DATA_TESTS" --test-threads 1 --nocapture
        if grep -q 'skipped:' "$OUT/data_pipeline_tests.txt"; then
            echo "FAILED  data_pipeline_tests skipped a test: libtorch sees no GPU ($OUT/data_pipeline_tests.txt)" >>"$SUMMARY"
            FAILED=1
        fi
    else
        echo "skipped data_pipeline_tests (no --data-tests)" >>"$SUMMARY"
    fi
fi

log "summary:"
cat "$SUMMARY" >&2
log "record the figures of $OUT/step_cuda_*.txt, $OUT/yardstick_*.txt and $OUT/dist_*.txt in docs/benchmarks.md (see docs/gpu-validation.md)"
exit "$FAILED"
