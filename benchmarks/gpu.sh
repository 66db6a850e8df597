#!/usr/bin/env bash
# The GPU benchmark with its documented arguments (benchmarks/README.md, "GPU"): the paper's
# training step (experiments/oai.py: 1024 x 1024, global batch 8, ResNet-101-FPN, iMask head)
# on one device and on all of them, and the prediction of a 384 x 384 x 160 volume.
#
#   make install JAX_ACCELERATOR=cuda13     # once: the CUDA build of jax in .venv
#   benchmarks/gpu.sh [OUT_DIR] [more benchmarks/gpu.py flags, e.g. --smoke]
#
# Writes the printed tables and a JSON of every figure into OUT_DIR (default
# /tmp/imask_gpu_bench) and says where.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=/tmp/imask_gpu_bench
if [[ $# -gt 0 && $1 != -* ]]; then
  out_dir=$1
  shift
fi
mkdir -p "$out_dir"
name="$out_dir/gpu_$(date -u +%Y%m%dT%H%M%SZ)"
# gpu.py's defaults are the documented run (10 timed steps after 2, 3 timed volumes after 1).
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/gpu.py --devices both --json "$name.json" "$@" \
  | tee "$name.txt"
echo "results: $name.txt (tables), $name.json (every figure)"
