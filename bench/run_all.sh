#!/usr/bin/env bash
# Rerun every benchmark and write bench/results/*.json and bench/results/scaling.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
mkdir -p bench/results
$PY bench/step_vs_ddp.py --out bench/results/step_mlp_fp32.json
$PY bench/step_vs_ddp.py --transport grpc --out bench/results/step_mlp_grpc.json
$PY bench/step_vs_ddp.py --wire-dtype bfloat16 --out bench/results/step_mlp_bf16.json
$PY bench/step_vs_ddp.py --overlap --out bench/results/step_mlp_overlap.json
$PY bench/step_vs_ddp.py --model charlm --batch 8 --out bench/results/step_charlm.json
$PY bench/wire_vs_tcp.py --out bench/results/wire.json
$PY bench/wire_vs_tcp.py --transport auto --out bench/results/wire_shm.json
$PY bench/apply_vs_torch.py --out bench/results/apply.json
$PY bench/memory.py --out bench/results/memory.json
$PY bench/memory.py --transport grpc --out bench/results/memory_grpc.json
$PY bench/scaling.py --out bench/results/scaling.json --plot bench/results/scaling.png
$PY bench/raw_grpc.py bench/results/raw_grpc.json
$PY bench/heterogeneous.py --target 3.7 --out bench/results/heterogeneous.json --plot bench/results/heterogeneous.png
$PY bench/chaos.py --out bench/results/chaos.json
$PY bench/chaos.py --replicas 2 --targets servers workers coordinator --out bench/results/chaos_replicas.json
$PY bench/failover.py --sizes-mb 10 100 --out bench/results/failover.json
$PY bench/failover.py --sizes-mb 10 100 --transport grpc --out bench/results/failover_grpc.json
$PY bench/failover.py --sizes-mb 10 --lease 0.5 --out bench/results/failover_lease05.json
$PY bench/failover.py --sizes-mb 1000 --steps 4 --out bench/results/failover_1gb.json  # ~16 GB of memory
# Needs a CUDA GPU (skipped here otherwise): the GPU worker against the one-process offload peer.
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY bench/offload.py --out bench/results/offload.json
fi
