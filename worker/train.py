"""The worker's training loop, top to bottom: ``shardps worker --workload digits --cluster ADDR``.

Builds the workload's model, joins the job through ``ShardedOptimizer`` (which
hands out the rank), trains its share of every global batch, and appends one JSON
line per step to the metrics file; rank 0 also evaluates on held-out data every
``eval_every`` steps and at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields

import torch

from ..proto import defaults as D
from ..proto import optim
from .balance import BatchSplit
from .diloco import DILOCO_OUTER, DiLoCo
from .convert import DILOCO_MODES
from .optimizer import PULL_DTYPES, WIRE_DTYPES, ShardedOptimizer
from .workloads import get_workload


MODES = ("sync", "ssp", "async", "diloco", "diloco-async")


@dataclass(frozen=True)
class TrainConfig:
    cluster: str  # coordinator address, host:port
    workload: str = "digits"  # built-in workload: digits | charlm
    mode: str = "sync"  # sync | ssp | async | diloco | diloco-async (local SGD: outer steps sync or async)
    optimizer: str = ""  # an elementwise torch.optim by name (proto/defaults.OPTIMIZER_NAMES); "": the workload's
    lr: float = 0.0  # learning rate; 0 takes the workload's default
    batch_size: int = 0  # samples per worker per step; 0 takes the workload's default
    steps: int = 0  # steps to train; 0 derives them from epochs
    epochs: float = 0.0  # passes over the training set; 0 takes the workload's default
    device: str = "cpu"  # torch device: cpu, cuda, cuda:1, mps, or auto
    seed: int = 0  # model init and data order
    min_workers: int = 1  # training starts once this many workers joined
    wire_dtype: str = "float32"  # gradient dtype on the wire: float32 | bfloat16 | float16 | int8
    pull_dtype: str = "float32"  # each step's reply over the network: float32 | bfloat16 | float16
    transport: str = ""  # byte path: "auto" (shared memory with same-host shards, else gRPC) | "grpc" ("" = env/auto)
    backup_workers: int = 0  # sync/ssp: each step closes after the first (workers - b) pushes
    staleness: int = 0  # ssp: how many steps a worker may run ahead of the last closed step
    staleness_lr: bool = False  # async/ssp: apply lr / max(1, staleness)
    slowdown: float = 1.0  # simulate a slower machine: sleep (slowdown - 1) x compute time per step
    topk_ratio: float = 0.0  # send only this fraction of each shard's gradient (top-k, error feedback)
    balance_every: int = 0  # sync/ssp: re-split global batches by measured throughput every N steps (0: equal)
    replicas: int = 1  # copies of each shard on different servers (>= 2: a killed server costs no rollback)
    amp: str = ""  # mixed precision on this worker: "" (off), "bfloat16" or "float16" (with loss scaling)
    metrics: str = ""  # append one JSON line per step here ("" = none)
    tensorboard: str = ""  # also write these lines as TensorBoard events into this directory ("" = none; [tb] extra)
    eval_every: int = D.EVAL_EVERY  # rank 0 evaluates every N steps (0: only at the end)
    threads: int = D.WORKER_THREADS  # torch intra-op threads (keep low when processes share cores)
    name: str = ""  # worker name in status; default host:pid
    connect_timeout: float = D.CONNECT_TIMEOUT_S  # seconds to wait for the cluster and min_workers
    metrics_port: int = -1  # serve Prometheus metrics on this port while training (0: any free, -1: off)
    sync_every: int = 0  # diloco modes: inner steps (of --optimizer) between two outer steps on the shards
    fragments: int = 1  # diloco modes: streaming, F fragments (jobs <job>.f<k>) synced at staggered inner steps
    outer_lr: float = DILOCO_OUTER["lr"]  # diloco modes: the shards' (outer) Nesterov SGD learning rate
    outer_momentum: float = DILOCO_OUTER["momentum"]  # diloco modes: its momentum (0: plain SGD)

    def __post_init__(self):
        from .workloads import WORKLOADS

        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose one of: {', '.join(sorted(WORKLOADS))}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose sync, ssp or async (or diloco / diloco-async: "
                             "local SGD with --sync-every H inner steps per outer step)")
        self._check_diloco()
        if self.steps and self.epochs:
            raise ValueError("give --steps or --epochs, not both")
        for field in ("lr", "batch_size", "steps", "epochs", "eval_every", "min_workers", "threads", "balance_every"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must not be negative, got {getattr(self, field)}")
        if self.min_workers < 1 or self.threads < 1:
            raise ValueError("min_workers and threads must be >= 1")
        if self.backup_workers and self.outer_mode == "async":
            raise ValueError("--backup-workers needs --mode sync or ssp")
        if self.staleness and self.mode != "ssp":
            raise ValueError("--staleness needs --mode ssp")
        if self.staleness < 0:
            raise ValueError("--staleness must be >= 0")
        if self.staleness_lr and self.outer_mode == "sync":
            raise ValueError("--staleness-lr needs --mode async or ssp")
        if self.transport not in ("", "auto", "tcp", "grpc"):
            raise ValueError(f"--transport must be auto, tcp or grpc, got {self.transport!r}")
        if not 0 <= self.topk_ratio < 1:
            raise ValueError(f"--topk-ratio is a fraction in [0, 1), got {self.topk_ratio}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"--wire-dtype takes {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.pull_dtype not in PULL_DTYPES:
            raise ValueError(f"--pull-dtype takes {', '.join(PULL_DTYPES)}, got {self.pull_dtype!r}")
        if self.wire_dtype == "int8" and self.topk_ratio:
            raise ValueError("--wire-dtype int8 sends every element; with --topk-ratio use float32, bfloat16 or "
                             "float16")
        if self.balance_every and self.mode not in ("sync", "ssp"):
            raise ValueError("--balance-every needs --mode sync or ssp (async and diloco workers run their own "
                             "steps)")
        if self.amp not in ("", "bfloat16", "float16"):
            raise ValueError(f"--amp takes bfloat16 or float16, got {self.amp!r}")
        if self.slowdown < 1:
            raise ValueError(f"slowdown is a factor >= 1, got {self.slowdown}")
        if not 1 <= self.replicas <= 8:
            raise ValueError(f"--replicas must be in 1..8 (and at most the number of servers), got {self.replicas}")

    @property
    def diloco(self) -> bool:
        return self.mode in DILOCO_MODES

    @property
    def outer_mode(self) -> str:
        """The mode the shards run: a diloco mode's outer steps are sync or async steps."""
        return DILOCO_MODES.get(self.mode, self.mode)

    def _check_diloco(self) -> None:
        if not self.diloco:
            if self.sync_every or self.fragments != 1 or \
                    (self.outer_lr, self.outer_momentum) != (DILOCO_OUTER["lr"], DILOCO_OUTER["momentum"]):
                raise ValueError("--sync-every, --fragments, --outer-lr and --outer-momentum need --mode diloco or "
                                 "diloco-async")
            return
        if self.sync_every < 1:
            raise ValueError(f"--mode {self.mode} needs --sync-every H >= 1 (inner steps between two outer steps, "
                             "e.g. 10)")
        if not self.outer_lr > 0 or not 0 <= self.outer_momentum < 1:
            raise ValueError(f"--outer-lr must be > 0 and --outer-momentum in [0, 1), got {self.outer_lr}, "
                             f"{self.outer_momentum}")
        if self.fragments < 1:
            raise ValueError(f"--fragments is a number >= 1 (1: the whole model every --sync-every steps), got "
                             f"{self.fragments}")
        if self.fragments > self.sync_every:
            raise ValueError(f"--fragments {self.fragments} staggers the fragments' syncs over the --sync-every H "
                             f"inner steps: give --sync-every >= {self.fragments} or fewer --fragments")
        if self.fragments > 1:
            workload = get_workload(self.workload, self.seed)
            with torch.device("meta"):  # the parameters' count only: no memory, no init
                count = len(list(workload.model().parameters()))
            if self.fragments > count:
                raise ValueError(f"--fragments {self.fragments}: the {self.workload} model has {count} parameters "
                                 f"and every fragment holds at least one; give --fragments <= {count}")

    def to_args(self) -> list[str]:
        """The ``shardps worker`` flags that recreate exactly this config: every field, so
        nothing is left to the child's environment (a False switch is its absence)."""
        args = []
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args += [flag] if value else []
            else:
                args += [flag, str(value)]
        return args


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class MixedPrecision:
    """Autocast on the worker (the shards keep fp32 masters); fp16 adds dynamic loss scaling.

    DDP ranks skip an overflowing fp16 step together; a parameter-server worker must
    still push (sync steps wait for it), so on overflow it zeroes its gradients and
    pushes those, and the scaler lowers its scale as usual.
    """

    def __init__(self, amp: str, device: torch.device, opt):
        self.dtype = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[amp]
        self.device, self.opt = device, opt
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype is torch.float16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> bool:
        """Backward (scaled for fp16); returns True when the fp16 gradients overflowed."""
        if self.scaler is None:
            loss.backward()
            return False
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        if all(bool(torch.isfinite(gr).all()) for gr in grads):
            return False
        for gr in grads:
            gr.zero_()
        return True

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()


class MetricsLog:
    """Appends JSON lines; each line is one write() on an O_APPEND file, so workers can share it.
    With ``tensorboard``, the same records also go to TensorBoard (``worker/tb_log.py``)."""

    def __init__(self, path: str, tensorboard: str = ""):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else None
        self._tb = None
        if tensorboard:
            from .tb_log import TensorBoardLog

            self._tb = TensorBoardLog(tensorboard)

    def write(self, record: dict) -> None:
        if self._fd is not None:
            os.write(self._fd, (json.dumps(record) + "\n").encode())
        if self._tb is not None:
            self._tb.write(record)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _optimizer(config: TrainConfig, model: torch.nn.Module, d, batch_size: int) -> ShardedOptimizer | DiLoCo:
    """The workload's optimizer as the job's (sync/ssp/async), or as DiLoCo's inner one (diloco modes;
    the shards' optimizer is then Nesterov SGD with --outer-lr and --outer-momentum)."""
    name, lr = config.optimizer or d.optimizer, config.lr or d.lr
    common = dict(cluster=config.cluster, min_workers=config.min_workers, wire_dtype=config.wire_dtype,
                  pull_dtype=config.pull_dtype,
                  transport=config.transport, name=config.name, connect_timeout=config.connect_timeout,
                  backup_workers=config.backup_workers, staleness_lr=config.staleness_lr, replicas=config.replicas,
                  topk_ratio=config.topk_ratio)
    if config.diloco:
        inner = optim.check_name(optim.name_of(name))(model.parameters(), lr=lr)
        return DiLoCo(model, inner, sync_every=config.sync_every, fragments=config.fragments, outer_lr=config.outer_lr,
                      outer_momentum=config.outer_momentum, nesterov=config.outer_momentum > 0,
                      mode=config.outer_mode, batch_size=batch_size, **common)
    return ShardedOptimizer(model, optimizer=name, lr=lr, mode=config.mode, staleness=config.staleness,
                            balance_every=config.balance_every, **common)


def train(config: TrainConfig) -> dict:
    torch.set_num_threads(config.threads)
    workload = get_workload(config.workload, config.seed)
    d = workload.defaults
    batch_size = config.batch_size or d.batch_size
    device = resolve_device(config.device)
    model = workload.model().to(device)
    opt = _optimizer(config, model, d, batch_size)
    sharded = opt.outer if config.diloco else opt  # the job's side: rank, versions, replies, counters
    split = BatchSplit(sharded, batch_size)
    steps = config.steps or workload.steps_for(config.epochs or d.epochs, split.global_batch)
    precision = MixedPrecision(config.amp, device, opt.inner if config.diloco else opt)
    log = MetricsLog(config.metrics, config.tensorboard)
    prometheus = None
    if config.metrics_port >= 0:
        from ..runtime.metrics import WorkerMetrics

        prometheus = WorkerMetrics(config.metrics_port)
    if sharded.rank == 0:
        log.write({"kind": "start", "config": asdict(config), "world_size": opt.world_size, "steps": steps,
                   "start_step": opt.steps_taken,
                   "batch_size": batch_size, "numel": sharded.job.layout.numel, "time": time.time()})
    evaluation = {}
    next_eval = config.eval_every or steps  # evaluate whenever the step count crosses a multiple
    try:
        # The shards number the steps: a sync worker whose late push was dropped (backup
        # workers) jumps to the open step, skipping the batches it missed, like the others.
        while opt.steps_taken < steps:
            step = opt.steps_taken
            t0 = time.perf_counter()
            x, y = workload.rows(step, split.global_batch, *split.rows(step))
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            with precision.autocast():
                loss = workload.loss(model, x, y)
            overflow = precision.backward(loss)
            if config.slowdown > 1:  # documented simulation of a slower machine
                time.sleep((config.slowdown - 1) * (time.perf_counter() - t0))
            t1 = time.perf_counter()
            split.measured(len(x), t1 - t0)
            opt.step(batch_size=len(x))
            precision.update()
            t2 = time.perf_counter()
            if prometheus is not None:
                prometheus.step(len(x), t1 - t0, t2 - t1, sharded.counters())
            last = opt.steps_taken >= steps
            if last and config.diloco:
                opt.sync()  # the last round, shorter than --sync-every when steps is no multiple of it
            rank = sharded.rank  # may change between steps when the membership does
            log.write({"kind": "step", "step": step, "rank": rank, "worker_id": sharded.worker_id, "loss": loss.item(),
                       "samples": len(x), "compute_s": t1 - t0, "push_pull_s": t2 - t1,
                       "samples_per_s": len(x) / (t2 - t0), "versions": opt.versions,
                       "staleness": [r.staleness for r in sharded.last_replies],
                       "dropped": [r.dropped for r in sharded.last_replies],
                       "applied_lr": [r.applied_lr for r in sharded.last_replies], "overflow": overflow,
                       "epoch": sharded.epoch, **sharded.counters(), "time": time.time(),
                       **({"outer_step": opt.since_sync == 0} if config.diloco else {})})
            if rank == 0 and (last or opt.steps_taken >= next_eval):
                while next_eval <= opt.steps_taken:
                    next_eval += config.eval_every or steps
                if last:
                    opt.pull()  # async: evaluate the shards' latest parameters
                model.eval()
                evaluation = workload.evaluate(model)
                model.train()
                log.write({"kind": "eval", "step": step, "rank": rank, **evaluation, "time": time.time()})
    finally:
        log.close()
        opt.close()
    return {"rank": sharded.rank, "steps": steps, "final_loss": loss.item() if steps else None, **evaluation}
