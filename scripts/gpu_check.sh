#!/bin/bash
# The five-minute device check (steering kernels compiled on a real GPU, the
# CUDA-graph capture of the steering launch, launch-cost benchmarks). Needs
# only torch and Triton; skips every check cleanly without a GPU.
#   bash scripts/gpu_check.sh [OUT_DIR]      # default: $OUT, else ./gpu_check_out
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
exec python3 scripts/gpu_check.py "$@"
