#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (CI has none; these skip there):
#   the CUDA worker's tests (device buckets, async copies, registered shared memory), then the
#   GPU worker against the one-process offload peer on a GPT-2-shaped model.
#
#   scripts/gpu-check.sh [OUT_DIR]        # needs torch with CUDA and shardps installed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-bench/results}
mkdir -p "$OUT"
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')"
$PY -m pytest -p no:cacheprovider -q tests/worker/test_device_bucket.py tests/worker/test_flat.py
$PY bench/offload.py --servers 4 8 --pair --out "$OUT/offload.json"
