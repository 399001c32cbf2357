"""``shardps run``: a whole job on this machine, from cluster start to report.

Starts a ``LocalCluster`` (coordinator + S servers) and W worker processes
(``shardps worker``), reports progress while they train, then exports the model
from the shards, evaluates it on held-out data, and writes the run directory:

    metrics.jsonl       one line per step per worker (+ start and eval lines)
    summary.json        final numbers
    training.png        loss and held-out metric over steps
    model.safetensors   the exported model (loads with model.load_state_dict)
    logs/               every process's log

It stops everything it started, also on error or Ctrl-C.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from ..proto.errors import ShardpsError
from .local import GLIBC_TUNABLES, LocalCluster
from .sdk import cluster_status, export_model, load_model_file


@dataclass(frozen=True)
class RunConfig:
    servers: int = 2  # shard servers
    workers: int = 2  # worker processes
    workload: str = "digits"  # digits | charlm
    mode: str = "sync"  # sync | ssp | async
    optimizer: str = ""  # sgd | adam | adamw ("" = workload default)
    lr: float = 0.0  # 0 = workload default
    batch_size: int = 0  # per worker; 0 = workload default
    steps: int = 0  # 0 = derive from epochs
    epochs: float = 0.0  # 0 = workload default
    device: str = "cpu"  # worker device: cpu, cuda, mps, auto
    seed: int = 0
    wire_dtype: str = "float32"  # float32 | bfloat16 | float16
    backup_workers: int = 0  # sync/ssp: close each step after the first (workers - b) pushes
    staleness: int = 0  # ssp: how many steps a worker may run ahead of the last closed step
    staleness_lr: bool = False  # async/ssp: apply lr / max(1, staleness)
    slow_workers: dict = field(default_factory=dict)  # worker index -> slowdown factor (simulation)
    topk_ratio: float = 0.0  # send only this fraction of each shard's gradient (top-k, error feedback)
    balance_every: int = 0  # sync/ssp: re-split global batches by measured throughput every N steps (0: equal)
    amp: str = ""  # mixed precision on the workers: "", "bfloat16" or "float16"
    eval_every: int = 50  # rank 0 evaluates every N steps
    out: str = ""  # run directory; default runs/<workload>-<time>
    worker_threads: int = 1  # torch threads per worker

    def __post_init__(self):
        if self.servers < 1 or self.workers < 1:
            raise ValueError("--servers and --workers must be at least 1")
        if not 0 <= self.backup_workers < self.workers:
            raise ValueError(f"--backup-workers must be in 0..{self.workers - 1} (fewer than --workers)")
        for index, factor in self.slow_workers.items():
            if not 0 <= index < self.workers or factor < 1:
                raise ValueError(f"--slow-worker {index}:{factor}: index must be < --workers and factor >= 1")
        self.worker_config(0, "127.0.0.1:0", "")  # TrainConfig checks every training option

    def worker_config(self, index: int, cluster: str, metrics: str):
        """worker-<index>'s TrainConfig: this run's training options plus its own."""
        from ..worker.train import TrainConfig

        shared = {f.name: getattr(self, f.name) for f in fields(TrainConfig) if f.name in _TRAINING_FIELDS}
        return TrainConfig(cluster=cluster, min_workers=self.workers, threads=self.worker_threads, metrics=metrics,
                           name=f"worker-{index}", slowdown=self.slow_workers.get(index, 1.0), **shared)


# The RunConfig fields that every worker takes over unchanged.
_TRAINING_FIELDS = ("workload", "mode", "optimizer", "lr", "batch_size", "steps", "epochs", "device", "seed",
                    "wire_dtype", "backup_workers", "staleness", "staleness_lr", "topk_ratio", "balance_every", "amp",
                    "eval_every")


class RunError(RuntimeError):
    """A process of the run failed; the message names it and quotes its log."""


@dataclass
class Progress:
    """What the live display shows; refreshed about twice a second."""

    steps: int = 0  # planned steps per worker
    step: int = -1  # newest step any worker finished
    loss: float | None = None  # mean loss of the newest step's lines
    samples_per_s: float = 0.0  # all workers, over the last few seconds
    evaluation: dict = field(default_factory=dict)
    versions: list[int] = field(default_factory=list)  # per shard


class MetricsTail:
    """Reads the lines workers append to metrics.jsonl, incrementally."""

    def __init__(self, path: Path):
        self.path, self._pos, self._partial = path, 0, b""
        self.records: list[dict] = []

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            data = self._partial + f.read()
            self._pos = f.tell()
        *lines, self._partial = data.split(b"\n")
        new = [json.loads(line) for line in lines if line.strip()]
        self.records.extend(new)
        return new


def run(config: RunConfig, on_progress: Callable[[Progress], None] | None = None) -> dict:
    out = Path(config.out or f"runs/{config.workload}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    logs = out / "logs"
    started = time.time()
    with LocalCluster(servers=config.servers, log_dir=logs) as cluster:
        procs = _start_workers(config, cluster.address, out, logs)
        try:
            tail = _watch(config, cluster, procs, logs, MetricsTail(out / "metrics.jsonl"), on_progress)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        status = cluster_status(cluster.address)
        exported = export_model(cluster.address, out / "model.safetensors")
    wall = time.time() - started
    summary = _summarize(config, tail.records, status, exported, wall)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(tail.records, summary, out / "training.png")
    summary["out"] = str(out)
    return summary


def _start_workers(config: RunConfig, address: str, out: Path, logs: Path) -> list[subprocess.Popen]:
    procs = []
    # Flags carry the whole config; SHARDPS_* variables would only fight them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPS_")}
    env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    for i in range(config.workers):
        args = config.worker_config(i, address, str(out / "metrics.jsonl")).to_args()
        log = open(logs / f"worker-{i}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "shardps", "worker", *args], stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
        log.close()
    return procs


def _watch(config, cluster: LocalCluster, procs, logs: Path, tail: MetricsTail, on_progress) -> MetricsTail:
    progress, rates = Progress(), []
    while True:
        for rec in tail.poll():
            _fold(progress, rec, rates)
        codes = [p.poll() for p in procs]
        for i, code in enumerate(codes):
            if code not in (None, 0):
                log = (logs / f"worker-{i}.log").read_text(errors="replace").strip().splitlines()
                raise RunError(f"worker-{i} exited with code {code}: {log[-1] if log else ''} (see {logs}/worker-{i}.log)")
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RunError(f"{name} died with code {proc.returncode} (see {logs}/{name}.log)")
        if on_progress:
            progress.versions = _shard_versions(cluster, progress.versions)
            on_progress(progress)
        if all(c == 0 for c in codes):
            for rec in tail.poll():
                _fold(progress, rec, rates)
            return tail
        time.sleep(0.5)


def _shard_versions(cluster: LocalCluster, last: list[int]) -> list[int]:
    """Each shard's version; a shard too busy to answer in time keeps its last value."""
    from .sdk import shard_status

    out = []
    for shard_id in range(cluster.num_servers):
        try:
            out.append(shard_status(cluster.server_address(shard_id), timeout=2).version)
        except ShardpsError:
            out.append(last[shard_id] if shard_id < len(last) else 0)
    return out


def _fold(p: Progress, rec: dict, rates: list) -> None:
    kind = rec.get("kind")
    if kind == "start":
        p.steps = rec["steps"]
    elif kind == "eval":
        p.evaluation = {k: v for k, v in rec.items() if k not in ("kind", "step", "rank", "time")}
    elif kind == "step":
        if rec["step"] >= p.step:
            p.step, p.loss = rec["step"], rec["loss"]
        rates.append((rec["time"], rec["samples"]))
        window = [(t, n) for t, n in rates if t > rec["time"] - 5]
        rates[:] = window
        span = max(1e-6, window[-1][0] - window[0][0])
        p.samples_per_s = sum(n for _, n in window[1:]) / span if len(window) > 1 else 0.0


def _summarize(config: RunConfig, records: list[dict], status: dict, exported: dict, wall: float) -> dict:
    from ..worker.workloads import get_workload

    steps = [r for r in records if r.get("kind") == "step"]
    last = max(r["step"] for r in steps)
    final_losses = [r["loss"] for r in steps if r["step"] == last]
    wl = get_workload(config.workload, config.seed)
    model = wl.model()
    model.load_state_dict(load_model_file(exported["model"]))
    model.eval()
    held_out = wl.evaluate(model)
    total_samples = sum(r["samples"] for r in steps)
    span = max(r["time"] for r in steps) - min(r["time"] - r["compute_s"] - r["push_pull_s"] for r in steps)
    return {
        "config": asdict(config),
        "workload": config.workload,
        "steps": last + 1,
        "final_train_loss": sum(final_losses) / len(final_losses),
        "held_out": held_out,
        "metric": wl.metric,
        "wall_s": wall,
        "samples_per_s": total_samples / max(1e-9, span),  # while training, all workers
        "numel": exported["numel"],
        "updates_per_shard": [s.get("version") for s in status["shards"]],
        "dropped_pushes": sum(s.get("dropped", 0) for s in status["shards"]),
        "shards": [{k: s.get(k) for k in ("shard_id", "version", "pushes", "dropped", "duplicates", "rejected")}
                   for s in status["shards"]],
        "bytes_in": sum(s.get("bytes_in", 0) for s in status["shards"]),
        "bytes_out": sum(s.get("bytes_out", 0) for s in status["shards"]),
        "staleness": [s.get("staleness") for s in status["shards"]],
        "model_file": exported["model"],
    }


def _plot(records: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps: dict[int, list[float]] = {}
    for r in records:
        if r.get("kind") == "step":
            steps.setdefault(r["step"], []).append(r["loss"])
    evals = [r for r in records if r.get("kind") == "eval"]
    metric = summary["metric"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = sorted(steps)
    ax.plot(xs, [sum(steps[s]) / len(steps[s]) for s in xs], color="tab:blue", label="train loss (mean of workers)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", color="tab:orange",
                 label=f"held-out {metric}")
        ax2.set_ylabel(f"held-out {metric}", color="tab:orange")
    c = summary["config"]
    ax.set_title(f"shardps {summary['workload']}: {c['mode']}, {c['servers']} servers x {c['workers']} workers; "
                 f"held-out {metric} {summary['held_out'][metric]:.4g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
