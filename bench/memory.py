"""Peak memory of shard servers, phase by phase, and of workers, vs the formulas in docs/architecture/memory.md.

    python bench/memory.py --params 50000000 --servers 2 --workers 1 --transport grpc

Per server the formula is (4 + 4k) * numel / S bytes (fp32 param and k optimizer-state
tensors, k = 2 for Adam; issue 23's), and with the gradient accumulator (4 + 4 + 4k).
Per worker: the model and its gradients, 8 * numel bytes.

Each phase resets the servers' peak RSS (``5 > /proc/PID/clear_refs``) before it starts,
so its peak (VmHWM) is that phase's own, less the server's RSS before the job existed
(the interpreter, torch and grpc):

- training: ``--steps`` Adam steps (after a first step, which also checkpoints version 0)
- digest: GetShardStatus with the SHA-256 over the state (``shardps status --digest``)
- checkpoint: one step that reaches a multiple of ``--checkpoint-every`` (a periodic checkpoint), until written
- export: ``export_model(optimizer_state=True)`` (a Pull of the slice and its optimizer state)
- shutdown: SIGTERM after the workers left (the checkpoint at exit), polled until the process is gone

With ``--transport auto`` the workers' shared-memory pages are counted in the servers' RSS
too; ``used_private`` subtracts them (RssShmem at the end of training). Also reported: how
long each phase's call took (the digest and a checkpoint step hold the shard's lock: pushes
wait that long).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
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


def reset_peak(pid: int) -> None:
    """Set ``pid``'s VmHWM back to its current RSS (proc(5), clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def worker(address, width, io, workers, commands, replies, transport):
    """Runs the steps the main process asks for ("steps", n), replying each step's seconds."""
    torch.set_num_threads(1)
    from shardps import ShardedOptimizer

    base = rss(os.getpid(), "VmRSS")
    model = mlp(width, io)
    opt = ShardedOptimizer(model, cluster=address, optimizer="adam", lr=1e-4, min_workers=workers,
                           transport=transport)
    x, y = torch.randn(8, io), torch.randn(8, io)
    while True:
        what, n = commands.get(timeout=900)
        if what == "close":
            break
        times = []
        for _ in range(n):
            start = time.perf_counter()
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step(batch_size=8)
            times.append(time.perf_counter() - start)
        replies.put(times)
    replies.put((base, rss(os.getpid())))
    opt.close()


class Phases:
    """The servers' peak RSS per phase."""

    def __init__(self, pids: list[int]):
        self.pids, self.peaks, self.seconds = pids, {}, {}

    def run(self, name: str, action) -> object:
        for pid in self.pids:
            reset_peak(pid)
        start = time.perf_counter()
        out = action()
        self.seconds[name] = time.perf_counter() - start
        self.peaks[name] = [rss(pid) for pid in self.pids]
        return out

    def shutdown(self, procs) -> None:
        """SIGTERM every server; poll each one's VmHWM until it has exited (the last reading before
        its memory is gone follows its checkpoint at exit)."""
        for pid in self.pids:
            reset_peak(pid)
        peaks = [0] * len(self.pids)
        start = time.perf_counter()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        while any(p.poll() is None for p in procs):
            for i, pid in enumerate(self.pids):
                try:
                    peaks[i] = max(peaks[i], rss(pid))
                except (OSError, KeyError):  # exited, or a zombie without memory
                    pass
            time.sleep(0.005)
        self.seconds["shutdown"] = time.perf_counter() - start
        self.peaks["shutdown"] = peaks


def wait_checkpoint(address: str, version: int, timeout: float = 600.0) -> None:
    from shardps.client.sdk import shard_status

    deadline = time.monotonic() + timeout
    while shard_status(address).last_checkpoint_version < version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint of version {version} at {address} within {timeout:.0f}s")
        time.sleep(0.05)


def lock_holds(numel: int, repeats: int = 3) -> dict:
    """Median seconds a shard of ``numel`` parameters with Adam's state holds its lock to save it, in
    this process: a copy of the state (what a checkpoint, a digest and an export held it for until
    issue 23), a checkpoint's write from the live tensors (then its fsync, without the lock), an
    export's spill to a temporary file, and a digest's hashing. Pushes to the shard wait that long."""
    from shardps.proto.layout import Layout
    from shardps.proto.messages import JobConfig, StepOpts, UpdateMode
    from shardps.proto.plan import ShardRange
    from shardps.server.checkpoint import CheckpointStore
    from shardps.server.modes import Push
    from shardps.server.state import ShardState

    job = JobConfig(Layout.from_shapes([("w", (numel,), "float32")]), "adam", {"lr": 1e-3}, UpdateMode.SYNC, 1)
    state = ShardState(ShardRange(0, 0, numel), job, "bench")
    state.initialize(torch.randn(numel))
    state.push(Push(0, 0, 1, 0, StepOpts(1), torch.randn(numel)), frozenset({0}))
    out: dict[str, list[float]] = {"copy_before": [], "checkpoint_write": [], "checkpoint_fsync_unlocked": [],
                                   "export_spill": [], "digest_hash": []}
    with tempfile.TemporaryDirectory(prefix="shardps-lock-") as tmp:
        store = CheckpointStore(tmp)
        for _ in range(repeats):
            for key, action in (("copy_before", state.checkpoint_snapshot),
                                ("checkpoint_write", lambda: store.begin(state.checkpoint_snapshot(live=True))),
                                ("export_spill", lambda: state.export(tmp)[1].close())):
                start = time.perf_counter()
                if key == "export_spill":
                    action()  # export takes the lock itself
                    out[key].append(time.perf_counter() - start)
                    continue
                with state.cond:
                    made = action()
                out[key].append(time.perf_counter() - start)
                if key == "checkpoint_write":
                    start = time.perf_counter()
                    store.finish(made)
                    out["checkpoint_fsync_unlocked"].append(time.perf_counter() - start)
                del made
            start = time.perf_counter()
            state.digest()
            out["digest_hash"].append(time.perf_counter() - start)
    return {"numel": numel, "state_bytes": 12 * numel,
            "median_seconds": {k: statistics.median(v) for k, v in out.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=25_000_000)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--transport", choices=("auto", "tcp", "grpc"), default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    from shardps import LocalCluster
    from shardps.client.sdk import export_model, shard_status

    width, io = mlp_for_params(args.params)
    numel = sum(p.numel() for p in mlp(width, io).parameters())
    every = args.steps + 2  # version 0, then the checkpoint phase's step: none while training
    ctx = mp.get_context("spawn")
    replies = ctx.Queue()
    commands = [ctx.Queue() for _ in range(args.workers)]
    with tempfile.TemporaryDirectory(prefix="shardps-memory-") as tmp, \
            LocalCluster(servers=args.servers, checkpoint_dir=Path(tmp) / "ckpt", checkpoint_every=every) as cluster:
        time.sleep(1.0)
        names = [f"server-{k}" for k in range(args.servers)]
        pids = [cluster.pid(n) for n in names]
        addresses = [cluster.server_address(k) for k in range(args.servers)]
        server_base = [rss(pid, "VmRSS") for pid in pids]
        procs = [ctx.Process(target=worker, args=(cluster.address, width, io, args.workers, commands[i], replies,
                                                  args.transport))
                 for i in range(args.workers)]
        for p in procs:
            p.start()

        def steps(n):
            for q in commands:
                q.put(("steps", n))
            return [replies.get(timeout=900) for _ in procs]

        steps(1)  # the job starts: the upload and the checkpoint of version 0
        for address in addresses:
            wait_checkpoint(address, 0)
        phases = Phases(pids)
        train_times = phases.run("training", lambda: steps(args.steps))
        shmem = [rss(pid, "RssShmem") for pid in pids]
        digest_seconds = []

        def digests():
            for address in addresses:
                start = time.perf_counter()
                shard_status(address, digest=True, timeout=300)
                digest_seconds.append(time.perf_counter() - start)

        phases.run("digest", digests)

        def checkpoint():
            times = steps(1)
            for address in addresses:
                wait_checkpoint(address, every)
            return times

        ckpt_times = phases.run("checkpoint", checkpoint)
        phases.run("export", lambda: export_model(cluster.address, Path(tmp) / "model.safetensors",
                                                  optimizer_state=True, security=cluster.security))
        for q in commands:
            q.put(("close", 0))
        workers = [replies.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
        phases.shutdown([cluster.procs[n] for n in names])
        written = sorted(os.listdir(Path(tmp) / "ckpt" / "shard-0"))
        # How long each checkpoint held its shard's lock (pushes wait that long), from the servers' logs.
        lock_seconds = [[float(s) for s in re.findall(r"([\d.]+) s writing under the shard's lock",
                                                      (cluster.log_dir / f"{n}.log").read_text())] for n in names]
    formula_server = (4 + 4 + 4 * 2) * numel / args.servers
    formula = (4 + 4 * 2) * numel / args.servers  # fp32 param + Adam's two states, no accumulator
    formula_worker = 8 * numel
    per_phase = {}
    for name, peaks in phases.peaks.items():
        used = [p - b for p, b in zip(peaks, server_base)]
        private = [u - s for u, s in zip(used, shmem)]
        per_phase[name] = {"peak_rss_bytes": peaks, "used_bytes": used, "ratio_used_over_4_4k": [u / formula for u in used],
                           "ratio_private_over_4_4k": [u / formula for u in private],
                           "seconds": phases.seconds[name]}
    per_phase["training"]["step_seconds_median"] = statistics.median(t for ts in train_times for t in ts)
    per_phase["checkpoint"]["step_seconds"] = [t for ts in ckpt_times for t in ts]
    per_phase["digest"]["call_seconds"] = digest_seconds
    worker_used = [peak - base for base, peak in workers]
    holds = lock_holds(numel // args.servers)
    emit("memory", {
        "config": vars(args), "numel": numel, "checkpoint_every": every, "checkpoints_of_shard_0": written,
        "checkpoint_lock_seconds": lock_seconds,
        "server": {"formula_4_4k_bytes": formula, "formula_with_accumulator_bytes": formula_server,
                   "baseline_rss_bytes": server_base, "shared_rss_bytes_after_training": shmem,
                   "phases": per_phase,
                   "worst_ratio_private_over_4_4k": max(r for v in per_phase.values()
                                                        for r in v["ratio_private_over_4_4k"])},
        "lock_holds": holds,
        "worker": {"formula_bytes": formula_worker, "peak_rss_bytes": [p for _, p in workers],
                   "used_bytes": worker_used, "ratio_used_over_formula": [u / formula_worker for u in worker_used]},
    }, args.out)


if __name__ == "__main__":
    main()
