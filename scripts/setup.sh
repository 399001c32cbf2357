#!/usr/bin/env bash
# Create .venv and install shardps with its dev tools. torch is pinned to the CPU
# build for dev/CI; GPU users install their CUDA build of torch first (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${SHARDPS_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev,demo]"
echo "shardps installed in $(pwd)/.venv"
