"""Replicated shards: recovery time after a SIGKILLed primary, and what replication costs.

    python bench/failover.py [--sizes-mb 10 100 1000] [--steps 8] [--transport grpc] [--lease 1.5]

For each slice size: 2 shard servers, one worker training one flat parameter of
2 x size (one slice per server), plain SGD (no optimizer state, so the slice is the
whole shard). Three runs per size:

* ``replicas=1``: step time and server peak RSS without copies (the peer);
* ``replicas=2``: the same with every update shipped to the backup first;
* ``replicas=2`` with server-0 (shard 0's primary) SIGKILLed after a few steps:
  **recovery** is the time from the SIGKILL to the end of the first step closed
  after it (which the promoted backup closes: the worker's call to the killed
  primary is refused, it names the server when it asks for the plan, the
  coordinator finds the port refusing too, promotes the backup in a new placement
  epoch and answers with the moved plan).
  Without that report the coordinator waits out the lease's silence. Also checked: no step rolled back and
  the run's final parameters equal the fault-free replicas=2 run's.

Reported as ratios replicas=2 / replicas=1 (step time, server peak RSS above the
idle process) and seconds (recovery), from one run each. On one host the worker's
pushes and pulls go through shared memory by default, so the copy to the backup (a
gRPC call, as between hosts) is compared with a nearly free push; ``--transport grpc``
sends the worker's bytes over gRPC too, as a worker on another host would.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402
from memory import rss  # noqa: E402


def primary(cluster, shard_id: int) -> str:
    from shardps.coordinator.client import CoordinatorClient

    with CoordinatorClient(cluster.address) as coord:
        return {s.range.shard_id: s.address for s in coord.job()[2]}[shard_id]


def run(numel_per_shard: int, steps: int, replicas: int, kill_at: int | None, transport: str,
        lease: float) -> dict:
    from shardps import LocalCluster, ShardedOptimizer
    from shardps.client.sdk import shard_status

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as logs, LocalCluster(servers=2, durable=False, log_dir=logs,
                                                                     replica_lease_seconds=lease) as cluster:
        idle = {name: rss(cluster.pid(name), "VmRSS") for name in ("server-0", "server-1")}
        param = torch.nn.Parameter(torch.zeros(2 * numel_per_shard))
        param.grad = torch.zeros_like(param)  # bound into the optimizer's buffers, filled in place each step
        opt = ShardedOptimizer([param], cluster=cluster.address, optimizer="sgd", lr=1e-3, replicas=replicas,
                               transport=transport, connect_timeout=600, step_timeout=600)
        times, killed, recovery = [], {}, None

        def kill():
            killed["at"] = time.monotonic()
            cluster.kill("server-0")

        for step in range(steps):
            if kill_at is not None and step == kill_at:
                killer = threading.Timer(0.05, kill)  # mid-step, as a crash would be (or just after a short one)
                killer.start()
            start = time.monotonic()
            param.grad.fill_(0.5 + step)
            opt.step()
            end = time.monotonic()
            times.append(end - start)
            if kill_at is not None and step >= kill_at and recovery is None:
                killer.join()
                # The first step closed by the promoted backup: it ended after the SIGKILL, and the plan had
                # moved shard 0 by then (an answer the old primary sent just before dying does not count).
                if end > killed["at"] and primary(cluster, 0) != cluster.server_address(0):
                    recovery = end - killed["at"]
        final = hashlib.sha256(param.detach().numpy().data).hexdigest()  # not a copy: 2 GB at 1 GB slices
        peak = {name: rss(cluster.pid(name)) - idle[name] for name in idle if cluster.alive(name)}
        address = cluster.server_address(1)
        rollbacks = sum(shard_status(address, shard_id=k).rollbacks for k in (0, 1) if replicas > 1)
        opt.close()
    del opt, param  # the worker's shared segment (the model lives in it) goes before the next run maps one
    gc.collect()
    return {"step_s": statistics.median(times[1:]), "peak_bytes": peak, "recovery_s": recovery,
            "rollbacks": rollbacks, "final": final}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100, 1000], help="slice size per shard, MB")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--transport", choices=("auto", "tcp", "grpc"), default="auto",
                    help="the worker's pushes and pulls: auto (shared memory on one host) or grpc (as across hosts)")
    ap.add_argument("--lease", type=float, default=1.5,
                    help="primary lease, s (--replica-lease-seconds): how long a silent primary takes to be replaced")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for mb in a.sizes_mb:
        numel = int(mb * 1e6 / 4)
        kill_at = a.steps // 2
        plain = run(numel, a.steps, 1, None, a.transport, a.lease)
        copied = run(numel, a.steps, 2, None, a.transport, a.lease)
        failed = run(numel, a.steps, 2, kill_at, a.transport, a.lease)
        row = {
            "slice_mb": mb,
            "step_s_replicas_1": round(plain["step_s"], 4),
            "step_s_replicas_2": round(copied["step_s"], 4),
            "step_time_ratio": round(copied["step_s"] / plain["step_s"], 3),
            "server_peak_mb_replicas_1": {k: round(v / 1e6) for k, v in plain["peak_bytes"].items()},
            "server_peak_mb_replicas_2": {k: round(v / 1e6) for k, v in copied["peak_bytes"].items()},
            "server_memory_ratio": round(sum(copied["peak_bytes"].values()) / sum(plain["peak_bytes"].values()), 3),
            "recovery_s": None if failed["recovery_s"] is None else round(failed["recovery_s"], 3),  # None: never moved
            "rollbacks_after_kill": failed["rollbacks"],
            "final_equals_fault_free": failed["final"] == copied["final"],
        }
        rows.append(row)
        print(row, flush=True)
    emit("failover", {"workers": 1, "servers": 2, "optimizer": "sgd", "steps": a.steps, "transport": a.transport, "lease_s": a.lease, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
