# Source this file: sets the variables the build and the binaries need.
#   LIBTORCH_USE_PYTORCH=1   build tch against the PyTorch in .venv
#   LD_LIBRARY_PATH          libtorch, and the CUDA 13 libraries (NVRTC,
#                            cuBLAS, cuSOLVER, NCCL) from PyTorch's wheels
_shampoo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$_shampoo_root/.venv/bin/python" ]; then
    export PATH="$_shampoo_root/.venv/bin:$PATH"
    export LIBTORCH_USE_PYTORCH=1
    _site="$("$_shampoo_root/.venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
    _libs="$_site/torch/lib:$_site/nvidia/cu13/lib:$_site/nvidia/nccl/lib"
    export LD_LIBRARY_PATH="$_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SHAMPOO_CUDA_LIB_DIRS="$_site/nvidia/cu13/lib:$_site/nvidia/nccl/lib"
    unset _site _libs
fi
unset _shampoo_root
