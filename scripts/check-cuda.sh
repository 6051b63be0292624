#!/usr/bin/env bash
# Type-check truesize's CUDA build (`--features cuda`) on a machine with no GPU and no CUDA.
#
# 1. Installs the CUDA 13.0 compiler (nvcc, cicc/libnvvm, crt, cudart headers, CCCL) from
#    NVIDIA's PyPI wheels into a cache folder, once.
# 2. Points CUDA_ROOT/CUDA_PATH/CUDA_HOME/PATH at it, with CUDA_COMPUTE_CAP=90 (Hopper).
# 3. Runs `cargo check --features cuda --all-targets` in its own target dir. candle-kernels' build
#    script really compiles its .cu kernels with nvcc (PTX and a static lib); `check` never links,
#    so no libcuda/cuBLAS is needed. Nothing here runs on a GPU. See docs/cuda.md.
#
# Environment:
#   TRUESIZE_CUDA_CACHE  wheel cache folder   (default: $HOME/.cache/truesize-cuda)
#   CARGO_TARGET_DIR     cargo target dir     (default: target/cuda-check)
#   CUDA_COMPUTE_CAP     kernel architecture  (default: 90)
#   PYTHON               interpreter for pip  (default: python3)
# Extra arguments are passed to `cargo check`.
set -euo pipefail

start=$(date +%s)
say() { printf '[check-cuda] %s\n' "$*"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

cache=${TRUESIZE_CUDA_CACHE:-$HOME/.cache/truesize-cuda}
python=${PYTHON:-python3}
packages=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)
stamp_text="${packages[*]}"
stamp="$cache/.truesize-cuda-stamp"
CU="$cache/nvidia/cu13"

# --- 1. the toolkit -----------------------------------------------------------------------------
toolkit_ok() {
    [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_text" \
        && -x "$CU/bin/nvcc" && -x "$CU/nvvm/bin/cicc" \
        && -f "$CU/include/cuda_runtime.h" && -f "$CU/nvvm/libdevice/libdevice.10.bc" ]]
}

if toolkit_ok; then
    say "CUDA wheels already in $cache (skipping pip install)"
else
    say "installing CUDA 13.0 compiler wheels into $cache"
    # Install into a fresh folder and move it into place, so an interrupted install never
    # leaves a half-filled cache that looks complete (pip --target does not overwrite).
    tmp="$cache.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$cache")"
    trap 'rm -rf "$tmp"' EXIT
    set -x
    "$python" -m pip install --disable-pip-version-check --no-warn-script-location \
        --target "$tmp" "${packages[@]}"
    { set +x; } 2>/dev/null
    printf '%s' "$stamp_text" >"$tmp/.truesize-cuda-stamp"
    rm -rf "$cache"
    mv "$tmp" "$cache"
    trap - EXIT
    toolkit_ok || { say "ERROR: $CU is incomplete after pip install"; ls -R "$CU" | head -50; exit 1; }
fi
say "wheel cache: $(du -sh "$cache" | cut -f1) in $cache"

# The wheels already lay out a normal toolkit under nvidia/cu13: bin/nvcc, bin/nvcc.profile
# (which points nvcc at ../nvvm/bin/cicc and ../nvvm/libdevice), include/ (cuda_runtime.h,
# crt/, cccl/) and lib/ (libcudart, libnvvm). No symlinks are needed.
export PATH="$CU/bin:$PATH"
export CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda-check}

say "CUDA_HOME=CUDA_PATH=CUDA_ROOT=$CU"
say "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP  CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
say "nvcc: $(command -v nvcc) — $(nvcc --version | grep -o 'release [0-9.]*, V[0-9.]*')"

# --- 2. a two-second smoke test of the compiler before the long cargo run ------------------------
smoke=$(mktemp -d)
cat >"$smoke/t.cu" <<'EOF'
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void twice(float *x) { x[threadIdx.x] *= 2.0f; }
EOF
nvcc --gpu-architecture="sm_$CUDA_COMPUTE_CAP" --ptx -std=c++17 "$smoke/t.cu" -o "$smoke/t.ptx"
grep -q "\.target sm_$CUDA_COMPUTE_CAP" "$smoke/t.ptx"
rm -rf "$smoke"
say "nvcc smoke test: compiled a kernel to PTX for sm_$CUDA_COMPUTE_CAP"

# --- 3. cargo check ------------------------------------------------------------------------------
say "running: cargo check --features cuda --all-targets $*"
check_start=$(date +%s)
cargo check --features cuda --all-targets "$@"
end=$(date +%s)
say "OK: cargo check --features cuda --all-targets passed (cargo $((end - check_start)) s, total $((end - start)) s)"
say "compiled with nvcc: candle-kernels (PTX + libmoe.a for sm_$CUDA_COMPUTE_CAP); type-checked: cudarc, candle-core/nn (cuda), truesize (src/measure/cuda.rs). Nothing was linked or run on a GPU."
