"""Peak memory of shard servers and workers vs the formula in docs/architecture/design.md.

    python bench/memory.py --params 25000000 --servers 2 --workers 2 [--transport grpc]

Per server the formula is (4 + 4 + 4k) * numel / S bytes (fp32 param, gradient
accumulator, k optimizer-state tensors: k = 2 for Adam). Per worker: the model and
its gradients, 8 * numel bytes. Measured: each process's peak RSS (VmHWM) after a
few Adam steps, minus the same process kind's RSS before the job existed (the
interpreter, torch and grpc), so the ratio compares training state with training state.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, mlp, mlp_for_params  # noqa: E402


def rss(pid: int, field: str = "VmHWM") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(address, width, io, steps, workers, queue, transport):
    torch.set_num_threads(1)
    from shardps import ShardedOptimizer

    base = rss(_self(), "VmRSS")
    model = mlp(width, io)
    opt = ShardedOptimizer(model, cluster=address, optimizer="adam", lr=1e-4, min_workers=workers,
                           transport=transport)
    x, y = torch.randn(8, io), torch.randn(8, io)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(batch_size=8)
    queue.put((base, rss(_self())))
    opt.close()


def _self() -> int:

    return os.getpid()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=25_000_000)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--transport", choices=("auto", "grpc"), default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    from shardps import LocalCluster

    width, io = mlp_for_params(args.params)
    numel = sum(p.numel() for p in mlp(width, io).parameters())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with LocalCluster(servers=args.servers) as cluster:
        time.sleep(1.0)
        server_base = [rss(cluster.pid(f"server-{k}"), "VmRSS") for k in range(args.servers)]
        procs = [ctx.Process(target=worker, args=(cluster.address, width, io, args.steps, args.workers, queue,
                                                       args.transport))
                 for _ in range(args.workers)]
        for p in procs:
            p.start()
        workers = [queue.get(timeout=600) for _ in procs]
        server_peak = [rss(cluster.pid(f"server-{k}")) for k in range(args.servers)]
        # After training: the server's own memory (anonymous) and the workers' shared segments it maps.
        server_anon = [rss(cluster.pid(f"server-{k}"), "RssAnon") for k in range(args.servers)]
        server_shmem = [rss(cluster.pid(f"server-{k}"), "RssShmem") for k in range(args.servers)]
        for p in procs:
            p.join(60)
    formula_server = (4 + 4 + 4 * 2) * numel / args.servers
    formula_issue = (4 + 4 * 2) * numel / args.servers  # fp32 param + Adam's two states, no accumulator
    formula_worker = 8 * numel
    server_used = [peak - base for peak, base in zip(server_peak, server_base)]
    worker_used = [peak - base for base, peak in workers]
    emit("memory", {
        "config": vars(args), "numel": numel,
        "server": {"formula_bytes": formula_server, "peak_rss_bytes": server_peak, "baseline_rss_bytes": server_base,
                   "used_bytes": server_used, "ratio_used_over_formula": [u / formula_server for u in server_used],
                   "target_bytes": 1.15 * formula_server + 200e6,
                   "ratio_peak_over_target": [p / (1.15 * formula_server + 200e6) for p in server_peak],
                   "formula_4_4k_bytes": formula_issue,
                   "ratio_peak_over_4_4k": [p / formula_issue for p in server_peak],
                   "anon_rss_bytes": server_anon, "shared_rss_bytes": server_shmem,
                   "ratio_anon_over_4_4k": [(a - b) / formula_issue for a, b in zip(server_anon, server_base)],  # private, less the runtime
                   "transport": args.transport},
        "worker": {"formula_bytes": formula_worker, "peak_rss_bytes": [p for _, p in workers],
                   "used_bytes": worker_used, "ratio_used_over_formula": [u / formula_worker for u in worker_used]},
    }, args.out)


if __name__ == "__main__":
    main()
