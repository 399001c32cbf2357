#!/usr/bin/env bash
# Create .venv and install shardps with its dev tools. torch is pinned to the CPU
# build for dev/CI; GPU users install their CUDA build of torch first (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# SHARDPS_TORCH=keep skips the pin (a GPU user's own CUDA torch, installed into .venv first).
if [ "${SHARDPS_TORCH:-pin}" != keep ]; then
  .venv/bin/python -m pip install --quiet "torch==${SHARDPS_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[dev,demo]"
echo "shardps installed in $(pwd)/.venv"
