#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian/Ubuntu machine:
#   - Debian packages: the Fashion-MNIST dataset, a font for plots;
#   - a Python virtual environment (.venv) with PyTorch 2.11.0 from PyPI,
#     which brings libtorch (for the `tch` crates) and the CUDA 13 runtime
#     libraries (NVRTC, cuBLAS, cuSOLVER, NCCL) that the CUDA backend loads
#     at run time. No GPU is needed to install or to build.
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
# The torchvision release built against that torch (benches only: the
# torchvision.io yardstick and folder generator of benches/python; no test
# needs it).
TORCHVISION_VERSION=0.26.0

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# --- Debian packages --------------------------------------------------------
APT_PACKAGES=(dataset-fashion-mnist fonts-dejavu-core)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    log "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- Python environment with PyTorch ----------------------------------------
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    log "installing torch==$TORCH_VERSION from PyPI (several GB with its CUDA libraries; cached by pip)"
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
# numpy: torch warns without it; the Python yardsticks in benches/python use it.
if ! .venv/bin/python -c "import numpy" 2>/dev/null; then
    log "installing numpy"
    .venv/bin/python -m pip install -q --disable-pip-version-check numpy
fi
if ! .venv/bin/python -c "import torchvision, sys; sys.exit(torchvision.__version__.split('+')[0] != '$TORCHVISION_VERSION')" 2>/dev/null; then
    log "installing torchvision==$TORCHVISION_VERSION (benches/python: input-pipeline yardstick)"
    .venv/bin/python -m pip install -q --disable-pip-version-check "torchvision==$TORCHVISION_VERSION"
fi
log "ok: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
