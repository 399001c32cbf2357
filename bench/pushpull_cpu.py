"""CPU per push-pull: the worker's and the server's CPU seconds per sync step, inside gRPC vs on
the byte link (or shared memory), 1 worker -> 1 shard server of a LocalCluster on this host.

    python bench/pushpull_cpu.py --mb 100 --steps 15

Each step pushes an --mb MB fp32 gradient (SGD, so the apply is a few ms) and takes the slice
back. CPU is read from /proc/<pid>/stat (server) and time.process_time() (worker) around the
timed steps, after 3 warmup steps. Wall time per step is printed beside it; on a shared machine
the CPU figures are the steadier ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(transport: str, numel: int, steps: int) -> dict:
    from shardps import LocalCluster, ShardedOptimizer

    param = torch.nn.Parameter(torch.zeros(numel))
    with LocalCluster(servers=1, durable=False) as cluster:
        opt = ShardedOptimizer([param], cluster=cluster.address, optimizer="sgd", lr=1e-9, transport=transport)
        param.grad = torch.ones(numel)
        for _ in range(3):
            opt.step()
        server = cluster.procs["server-0"].pid
        s0, w0, t0 = _cpu_s(server), time.process_time(), time.perf_counter()
        for _ in range(steps):
            opt.step()
        s1, w1, t1 = _cpu_s(server), time.process_time(), time.perf_counter()
        opt.close()
    return {"transport": transport, "wall_ms": 1000 * (t1 - t0) / steps, "worker_cpu_ms": 1000 * (w1 - w0) / steps,
            "server_cpu_ms": 1000 * (s1 - s0) / steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--transports", default="grpc,tcp", help="comma list of grpc, tcp, auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = [measure(t, args.mb * 1_000_000 // 4, args.steps) for t in args.transports.split(",")]
    for r in rows:
        print(f"{r['transport']:5s} wall {r['wall_ms']:.0f} ms/step, worker CPU {r['worker_cpu_ms']:.0f} ms, "
              f"server CPU {r['server_cpu_ms']:.0f} ms", file=sys.stderr)
    emit("pushpull_cpu", {"config": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
