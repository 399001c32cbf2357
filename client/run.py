"""``shardps run``: a whole job on this machine, from cluster start to report.

Starts a ``LocalCluster`` (coordinator + S servers) and W worker processes
(``shardps worker``), reports progress while they train, then exports the model
from the shards, evaluates it on held-out data, and writes the run directory:

    metrics.jsonl       one line per step per worker (+ start and eval lines)
    summary.json        final numbers
    training.png        loss and held-out metric over steps
    model.safetensors   the exported model (loads with model.load_state_dict)
    logs/               every process's log
    report.json/.md     with --scenario: the fault timeline, counters and faults.png

With ``hosts=True`` every process runs in its own network namespace (root only);
with ``scenario`` a TOML file schedules faults (``chaos/scenario.py``).

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

from ..proto import defaults as D
from ..proto.errors import ShardpsError
from ..runtime.history import ENV as HISTORY_ENV
from ..runtime.history import History
from .local import GLIBC_TUNABLES, LocalCluster
from .extras import available, install_hint
from .plots import faults_plot, maybe, training_plot
from .sdk import cluster_status, export_model, load_model_file


@dataclass(frozen=True)
class RunConfig:
    servers: int = 2  # shard servers
    workers: int = 2  # worker processes
    workload: str = "digits"  # digits | charlm
    mode: str = "sync"  # sync | ssp | async | diloco | diloco-async
    optimizer: str = ""  # an elementwise torch.optim by name ("" = workload default)
    lr: float = 0.0  # 0 = workload default
    batch_size: int = 0  # per worker; 0 = workload default
    steps: int = 0  # 0 = derive from epochs
    epochs: float = 0.0  # 0 = workload default
    device: str = "cpu"  # worker device: cpu, cuda, mps, auto
    seed: int = 0
    wire_dtype: str = "float32"  # float32 | bfloat16 | float16 | int8
    pull_dtype: str = "float32"  # float32 | bfloat16 | float16: each step's reply over the network
    transport: str = ""  # auto (shared memory with same-host shards, else byte links) | tcp | grpc ("" = SHARDPS_TRANSPORT or auto)
    backup_workers: int = 0  # sync/ssp: close each step after the first (workers - b) pushes
    staleness: int = 0  # ssp: how many steps a worker may run ahead of the last closed step
    staleness_lr: bool = False  # async/ssp: apply lr / max(1, staleness)
    slow_workers: dict = field(default_factory=dict)  # worker index -> slowdown factor (simulation)
    topk_ratio: float = 0.0  # send only this fraction of each shard's gradient (top-k, error feedback)
    balance_every: int = 0  # sync/ssp: re-split global batches by measured throughput every N steps (0: equal)
    replicas: int = 1  # copies of each shard on different servers (>= 2: a killed server fails over, no rollback)
    amp: str = ""  # mixed precision on the workers: "", "bfloat16" or "float16"
    eval_every: int = D.EVAL_EVERY  # rank 0 evaluates every N steps
    out: str = ""  # run directory; default runs/<workload>-<time>
    worker_threads: int = 1  # torch threads per worker
    hosts: bool = False  # every role in its own network namespace (root only)
    scenario: str = ""  # TOML file of faults to inject (see chaos/scenario.py)
    checkpoint_every: int = D.RUN_CHECKPOINT_EVERY  # servers also checkpoint every N steps (always: at the start and at the end)
    durable: bool = True  # coordinator state and shard checkpoints on disk, so a killed process is survived
    resume: str = ""  # a run directory (or checkpoint folder) to go on from; --steps counts from step 0
    lease_seconds: float = D.LEASE_S  # a worker silent this long leaves the membership
    sync_every: int = 0  # diloco modes: inner steps between two outer steps
    fragments: int = 1  # diloco modes: streaming DiLoCo, F fragments (jobs default.f<k>) synced H/F steps apart
    outer_lr: float = D.OUTER_LR  # diloco modes: the shards' Nesterov SGD learning rate (TrainConfig checks both)
    outer_momentum: float = D.OUTER_MOMENTUM  # diloco modes: its momentum (0: plain SGD)

    def __post_init__(self):
        if self.servers < 1 or self.workers < 1:
            raise ValueError("--servers and --workers must be at least 1")
        if not 0 <= self.backup_workers < self.workers:
            raise ValueError(f"--backup-workers must be in 0..{self.workers - 1} (fewer than --workers)")
        if not 1 <= self.replicas <= self.servers:
            raise ValueError(f"--replicas must be in 1..{self.servers} (each copy of a shard needs its own server)")
        for index, factor in self.slow_workers.items():
            if not 0 <= index < self.workers or factor < 1:
                raise ValueError(f"--slow-worker {index}:{factor}: index must be < --workers and factor >= 1")
        self.worker_config(0, "127.0.0.1:0", "")  # TrainConfig checks every training option
        if self.scenario:
            plan = self.load_scenario()
            if plan.needs_hosts and not self.hosts:
                raise ValueError(f"scenario {self.scenario} has network faults (partition/link): add --hosts")
        if self.hosts:
            from ..chaos.netns import available

            ok, reason = available()
            if not ok:
                raise ValueError(f"--hosts: {reason}")

    def load_scenario(self):
        from ..chaos.scenario import load

        return load(self.scenario, self.workers, self.servers)

    def worker_config(self, index: int, cluster: str, metrics: str, tensorboard: str = ""):
        """worker-<index>'s TrainConfig: this run's training options plus its own."""
        from ..worker.train import TrainConfig

        shared = {f.name: getattr(self, f.name) for f in fields(TrainConfig) if f.name in _TRAINING_FIELDS}
        return TrainConfig(cluster=cluster, min_workers=self.workers, threads=self.worker_threads, metrics=metrics,
                           tensorboard=tensorboard,
                           name=f"worker-{index}", slowdown=self.slow_workers.get(index, 1.0), **shared)


# The RunConfig fields that every worker takes over unchanged.
_TRAINING_FIELDS = ("workload", "mode", "optimizer", "lr", "batch_size", "steps", "epochs", "device", "seed",
                    "wire_dtype", "pull_dtype", "transport", "backup_workers", "staleness", "staleness_lr", "topk_ratio", "balance_every",
                    "replicas", "amp",
                    "eval_every", "sync_every", "fragments", "outer_lr", "outer_momentum")


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
    scenario = config.load_scenario() if config.scenario else None
    # A fault scenario's rollbacks replay fewer steps with denser checkpoints.
    checkpoint_every = 10 if scenario is not None and config.checkpoint_every == RunConfig.checkpoint_every \
        else config.checkpoint_every
    checkpoints = out / "checkpoints"
    resume_job = _prepare_resume(config, checkpoints) if config.resume else None
    with LocalCluster(servers=config.servers, log_dir=logs, hosts=config.hosts, worker_hosts=config.workers,
                      checkpoint_every=checkpoint_every, checkpoint_dir=checkpoints, resume_job=resume_job,
                      lease_seconds=config.lease_seconds, durable=config.durable or bool(resume_job)) as cluster:
        workers = WorkerSet(config, cluster, out, logs)
        from ..chaos.scenario import Scenario, ScenarioRunner

        # Scheduled faults, and ad-hoc ones that `shardps chaos ACTION TARGET --run DIR` asks for.
        runner = ScenarioRunner(scenario or Scenario("ad hoc", []), _actions(cluster, workers),
                                History.open(cluster.history_dir, "lab"))
        control = Control(out / "control", runner)
        try:
            workers.start_all()
            tail = _watch(config, cluster, workers, logs, MetricsTail(out / "metrics.jsonl"), on_progress, runner,
                          control)
        finally:
            runner.finish(step=-1)
            control.close()
            workers.stop_all()
        status = cluster_status(cluster.address)
        exported = export_model(cluster.address, out / "model.safetensors")
        faults = _fault_counts(cluster, workers) if runner.timeline or scenario else None
    wall = time.time() - started
    summary = _summarize(config, tail.records, status, exported, wall)
    notes = summary["notes"] = []  # optional pieces left out, each with the command that adds it
    if cluster.history_dir:  # the promises, proved over what every role recorded (shardps check)
        from ..chaos.checker import check_run

        summary["history"] = check_run(cluster.history_dir).as_dict()
    if faults is not None:
        from ..chaos.report import write_report

        summary["report"] = write_report(out, runner.scenario, runner.timeline, tail.records, status, faults, summary,
                                         draw=lambda *args: maybe(faults_plot, *args, notes=notes))
    maybe(training_plot, tail.records, summary, out / "training.png", notes=notes)
    _tensorboard_run(out / "tensorboard" / "run", runner.timeline, summary, notes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["out"] = str(out)
    return summary


def _tensorboard_run(path: Path, timeline, summary: dict, notes: list[str]) -> None:
    """Beside the workers' event files: the faults of the timeline as text events, the final held-out numbers."""
    if not available("tensorboard"):
        notes.append(f"no TensorBoard event files: {install_hint('tensorboard')}")
        return
    from ..worker.tb_log import TensorBoardLog

    log = TensorBoardLog(str(path))
    for e in timeline:
        log.text("faults", f"{e.action} {e.target} at {e.time_s:.1f}s: "
                           f"{'ok' if e.ok else 'FAILED ' + e.error} {e.detail}".strip(), max(0, e.step))
    log.scalars("final_held_out", summary["held_out"], summary["steps"])
    log.close()


def _prepare_resume(config: RunConfig, checkpoints: Path) -> Path:
    """Cut the checkpoint of ``config.resume`` (a streaming run's: every fragment's) for this run's
    servers; returns the coordinator's job file."""
    import shutil

    from ..proto.layout import fingerprint_of
    from ..worker.convert import DILOCO_MODES
    from ..worker.fragments import split
    from ..worker.workloads import get_workload
    from .resume import load_model_checkpoints, prepare_resume

    ckpts = load_model_checkpoints(config.resume)
    if len(ckpts) != config.fragments:
        raise RunError(f"the checkpoint in {ckpts[0].source} holds the model in {len(ckpts)} "
                       f"fragment{'s' if len(ckpts) > 1 else ''}: resume with "
                       + (f"--mode diloco --fragments {len(ckpts)}" if len(ckpts) > 1 else "no --fragments"))
    model = get_workload(config.workload, config.seed).model()
    names = {id(p): n for n, p in model.named_parameters()}
    parts = split(list(model.parameters()), len(ckpts))  # (one fragment: one part, the whole model)
    if [fingerprint_of((names[id(p)], tuple(p.shape)) for p in part) for part in parts] != \
            [c.job.layout.fingerprint for c in ckpts]:
        raise RunError(f"the checkpoint in {ckpts[0].source} is of another model than --workload {config.workload}; "
                       "resume with the workload it was trained with")
    # Shard versions count outer steps in the diloco modes (fragment 0's: one every --sync-every steps).
    done = ckpts[0].version * (config.sync_every if config.mode in DILOCO_MODES else 1)
    if done >= (config.steps or 0) > 0:
        raise RunError(f"the checkpoint is at step {done}: ask for more --steps than that to go on")
    shutil.rmtree(checkpoints, ignore_errors=True)
    return prepare_resume(ckpts, config.servers, checkpoints)


class WorkerSet:
    """The run's worker processes, by name ("worker-0", ...); process faults act on them."""

    def __init__(self, config: RunConfig, cluster: LocalCluster, out: Path, logs: Path):
        self.config, self.cluster, self.out, self.logs = config, cluster, out, logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.down: set[str] = set()  # killed on purpose: their exit is not a failure
        self.faults: dict[str, int] = {}
        # Flags carry the whole config; SHARDPS_* variables would only fight them.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPS_")}
        self.env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
        if cluster.history_dir:  # each worker appends its replies to the run's history (shardps check)
            self.env[HISTORY_ENV] = cluster.history_dir

    def start(self, i: int) -> None:
        name = f"worker-{i}"
        tensorboard = str(self.out / "tensorboard" / name) if available("tensorboard") else ""
        args = self.config.worker_config(i, self.cluster.address, str(self.out / "metrics.jsonl"),
                                         tensorboard).to_args()
        log = open(self.logs / f"{name}.log", "ab")
        self.procs[name] = self.cluster.worker_popen(i, [sys.executable, "-m", "shardps", "worker", *args], stdout=log,
                                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        log.close()
        self.down.discard(name)

    def start_all(self) -> None:
        for i in range(self.config.workers):
            self.start(i)

    def signal(self, name: str, action: str) -> None:
        import signal as sig

        proc = self.procs[name]
        if action == "kill":
            self.down.add(name)
            proc.send_signal(sig.SIGCONT)
            proc.kill()
            proc.wait(timeout=30)
        elif action in ("pause", "resume"):
            proc.send_signal(sig.SIGSTOP if action == "pause" else sig.SIGCONT)
        else:  # restart: a fresh process, which joins the job as a new worker
            if proc.poll() is None:
                self.signal(name, "kill")
            self.start(int(name.split("-")[1]))
        self.faults[f"{action}/{name}"] = self.faults.get(f"{action}/{name}", 0) + 1

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


class Control:
    """Requests from ``shardps chaos ACTION TARGET --run DIR``: a JSON file per request in
    ``DIR/control``, answered with ``<id>.done`` once the fault is done (or failed)."""

    def __init__(self, path: Path, runner):
        self.path, self.runner = path, runner
        path.mkdir(parents=True, exist_ok=True)
        (path / "pid").write_text(str(os.getpid()))

    def serve(self, step: int) -> None:
        for request in sorted(self.path.glob("*.json")):
            try:
                ask = json.loads(request.read_text())
                event = self.runner.do_now(ask["action"], ask["target"], ask.get("params", {}), step)
                answer = {"ok": event.ok, "error": event.error, "step": event.step, "detail": event.detail}
            except (ValueError, KeyError) as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            request.with_suffix(".done").write_text(json.dumps(answer))
            request.unlink(missing_ok=True)

    def close(self) -> None:
        (self.path / "pid").unlink(missing_ok=True)


def _watch(config, cluster: LocalCluster, workers: WorkerSet, logs: Path, tail: MetricsTail, on_progress,
           runner, control: Control) -> MetricsTail:
    progress, rates = Progress(), []
    job_ids: list[str] = []  # streaming DiLoCo: the fragments' jobs, once the workers defined them
    while True:
        for rec in tail.poll():
            _fold(progress, rec, rates)
        running = {name: p.poll() for name, p in workers.procs.items() if name not in workers.down}
        for name, code in running.items():
            if code not in (None, 0):
                log = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
                raise RunError(f"{name} exited with code {code}: {log[-1] if log else ''} (see {logs}/{name}.log)")
        down = runner_down(cluster)
        for name, proc in cluster.procs.items():
            if proc.poll() is not None and name not in down:
                raise RunError(f"{name} died with code {proc.returncode} (see {logs}/{name}.log)")
        job_ids = job_ids or _fragment_job_ids(cluster, config.fragments)
        progress.versions = _shard_versions(cluster, progress.versions, job_ids)
        step = min(progress.versions) if progress.versions else 0
        runner.tick(step)
        control.serve(step)
        if on_progress:
            on_progress(progress)
        if running and all(c == 0 for c in running.values()):
            for rec in tail.poll():
                _fold(progress, rec, rates)
            return tail
        time.sleep(runner.poll_s())


def runner_down(cluster: LocalCluster) -> set[str]:
    """Cluster processes that a fault took down on purpose (killed and not restarted yet)."""
    return {name for name, proc in cluster.procs.items()
            if proc.poll() is not None and cluster.faults[f"kill/{name}"] > cluster.faults[f"restart/{name}"]}


def _actions(cluster: LocalCluster, workers: WorkerSet) -> dict:
    """What each scenario action does in this run."""
    from .. import chaos
    from ..runtime.faults import FaultRule

    def process(action):
        def do(target, params):
            if target.startswith("worker-"):
                workers.signal(target, action)
            else:
                getattr(cluster, action)(target)
            return ""
        return do

    def network(method):
        def do(target, params):
            net = cluster.network
            if method == "partition":
                net.partition(target)
            elif method == "heal":
                net.heal(target)
            elif method in ("cut", "mend"):
                getattr(net, method)(target, params["peer"])
            elif method == "unlink":
                net.loss(target, 0)
                net.delay(target, 0)
                net.rate(target, 0)
            else:
                if "loss" in params:
                    net.loss(target, float(params["loss"]))
                if "delay_ms" in params:
                    net.delay(target, float(params["delay_ms"]))
                if "rate_kbit" in params:
                    net.rate(target, int(params["rate_kbit"]))
            return ""
        return do

    def rpc(target, params):
        p = dict(params)
        worker = p.pop("worker", None)
        rule = FaultRule(worker_id=worker, **p)
        active = chaos.set_rpc_faults(cluster, target, [rule])
        return f"rule on {', '.join(active)}"

    def unrpc(target, params):
        chaos.clear_rpc_faults(cluster, target)
        return ""

    def checkpoint(target, params):
        from .sdk import checkpoint_cluster

        written = checkpoint_cluster(cluster.address, timeout=60, security=cluster.admin_security)
        return f"version {written[0]['version']}"

    return {**{a: process(a) for a in ("kill", "pause", "resume", "restart")},
            **{a: network(a) for a in ("partition", "heal", "link", "unlink", "cut", "mend")},
            "rpc": rpc, "unrpc": unrpc, "checkpoint": checkpoint}


def _fault_counts(cluster: LocalCluster, workers: WorkerSet) -> dict:
    from .. import chaos

    injected = {}
    try:
        for role, faults in chaos.get_rpc_faults(cluster, "all").items():
            injected[role] = faults["injected"]
    except ShardpsError as exc:
        injected["error"] = str(exc)
    return {"process": {**dict(cluster.faults), **workers.faults}, "rpc_injected": injected,
            "network": cluster.network.faults() if cluster.network is not None else {}}


def _fragment_job_ids(cluster: LocalCluster, fragments: int) -> list[str]:
    """A streaming run's fragment jobs (``default.f<k>``), all or none: [] until every one is defined
    (and for a run without fragments, whose one job the servers answer for by default)."""
    if fragments < 2:
        return []
    from ..coordinator.client import CoordinatorClient
    from ..proto.messages import DEFAULT_JOB, fragment_job

    try:
        with CoordinatorClient(cluster.address) as coord:
            ids = [coord.job(fragment_job(DEFAULT_JOB, k))[0] for k in range(fragments)]
    except ShardpsError:
        return []
    return ids if all(ids) else []


def _shard_versions(cluster: LocalCluster, last: list[int], job_ids: list[str] = ()) -> list[int]:
    """Each shard's version, as its home server's copy has it (``job_ids``: of each of these jobs, the
    shards of the first, then the next's: a streaming run's fragments); a shard whose server is too
    busy to answer in time, or holds no copy yet (it just restarted: it answers version 0), keeps its
    last value."""
    from .sdk import shard_status

    out = []
    for job_id in job_ids or [""]:
        for shard_id in range(cluster.num_servers):
            before = last[len(out)] if len(out) < len(last) else 0
            try:
                s = shard_status(cluster.server_address(shard_id), timeout=2, job_id=job_id)
            except ShardpsError:
                out.append(before)
            else:
                out.append(s.version if s.initialized else before)
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
        "train_s": span,  # from the first step's start to the last step's end (no start-up, no teardown)
        "samples_per_s": total_samples / max(1e-9, span),  # while training, all workers
        "numel": exported["numel"],
        # streaming DiLoCo: fragment 0's shards, then fragment 1's, ... (each fragment a job of its own)
        "updates_per_shard": [s.get("version") for s in status["shards"]],
        **({"fragments": status["fragments"]} if status.get("fragments") else {}),
        "dropped_pushes": sum(s.get("dropped", 0) for s in status["shards"]),
        "shards": [{k: s.get(k) for k in ("job", "shard_id", "version", "pushes", "dropped", "duplicates",
                                          "rejected") if k in s or k != "job"} for s in status["shards"]],
        "bytes_in": sum(s.get("bytes_in", 0) for s in status["shards"]),
        "bytes_out": sum(s.get("bytes_out", 0) for s in status["shards"]),
        "shm_bytes_in": sum(s.get("shm_bytes_in", 0) for s in status["shards"]),
        "shm_bytes_out": sum(s.get("shm_bytes_out", 0) for s in status["shards"]),
        # how each worker's last push reached each shard: shm, tcp (the byte link) or grpc
        "transports": sorted({t for s in status["shards"] for t in (s.get("transport") or {}).values()}),
        "staleness": [s.get("staleness") for s in status["shards"]],
        "model_file": exported["model"],
    }
