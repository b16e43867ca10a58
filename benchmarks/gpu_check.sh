#!/usr/bin/env bash
# GPU correctness against the CPU and GPU throughput next to torch.matmul, at box 128 and 256 (issue 13).
# One short script (< 8 minutes on one GPU): run it on a GPU machine (never in CI); on a machine without CUDA it
# says so and exits 0 (the GPU tests skip cleanly there too).
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/gpu/
#   PYTHON=/path/to/python OUT=DIR bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing to check (the GPU tests skip; GPU numbers in the README stay projections)"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# 1. correctness: scoring, refine (insertion, reconstruction, FSC), training, prediction, deep-prior MMSE, CPU vs GPU
timeout 300 "$PY" -m pytest tests/core/test_gpu.py tests/core/imaging/test_reconstruct.py -k "cuda or gpu" \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
# 2. throughput next to torch.matmul (same process), box 128 and 256, and agreement with the CPU
timeout 240 "$PY" benchmarks/gpu_speed.py --out "$OUT" --n 512 2>&1 | tee "$OUT/gpu_speed.txt"
