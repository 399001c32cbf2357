"""Plain dataclasses for job specs, plans and membership, and their protobuf forms.

Cores work with these; only adapters and clients convert, through the functions here.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from . import optim
from .gen import shardps_pb2 as pb
from .layout import BUFFER_DTYPES, BufferEntry, Layout, check_name, check_shape
from .plan import ShardRange

MAX_KWARGS_JSON = 1 << 16  # bytes of one optimizer kwargs object
MAX_GROUPS = 1024  # param groups per job
MAX_WORKERS = 1 << 16  # min_workers / backup_workers bound
MAX_BATCH = 1 << 40  # samples behind one push
MAX_REPLICAS = 8  # copies of a shard (each on its own server)
# A loss scale is a normal float32 (torch's GradScaler keeps it in one): its reciprocal, which the server
# multiplies the gradient by, is then finite in float32 too. Outside this range the unscale overflows.
MIN_GRAD_SCALE = 2.0 ** -126  # the smallest normal float32
MAX_GRAD_SCALE = 3.4028234663852886e38  # the largest float32
DEFAULT_JOB = "default"
JOB_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # job names name checkpoint folders too


def added_group_job(job_name: str, index: int) -> str:
    """The job that holds param group ``index`` of job ``job_name``, added during training
    (``ShardedOptimizer.add_param_group``, worker/param_groups.py)."""
    return f"{job_name}.g{index}"


def added_group_parent(job_name: str) -> str:
    """The job that ``job_name`` holds an added param group of ("" for a job of its own)."""
    m = re.fullmatch(r"(.+)\.g\d+", job_name)
    return m.group(1) if m else ""


def _numbered_jobs(job_name: str, names, letter: str) -> list[str]:
    """Of ``names``, the jobs ``<job_name>.<letter><k>``, in order of k."""
    pattern = re.compile(re.escape(job_name) + rf"\.{letter}(\d+)")
    found = sorted((int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n)))
    return [n for _, n in found]


def added_group_jobs(job_name: str, names) -> list[str]:
    """Of the cluster's job ``names``, those holding param groups added to ``job_name``, in group order."""
    return _numbered_jobs(job_name, names, "g")


def fragment_job(job_name: str, index: int) -> str:
    """The job that holds fragment ``index`` of a streaming DiLoCo job ``job_name`` (worker/diloco.py)."""
    return f"{job_name}.f{index}"


def fragment_jobs(job_name: str, names) -> list[str]:
    """Of the cluster's job ``names``, the fragments of streaming DiLoCo job ``job_name``, in fragment
    order ([] when it is no streaming job): together they hold its model, fragment 0 its buffers."""
    return _numbered_jobs(job_name, names, "f")


_DTYPE_NAMES = {
    "float32": pb.DTYPE_FLOAT32,
    "float64": pb.DTYPE_FLOAT64,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "int8": pb.DTYPE_INT8,
    "uint8": pb.DTYPE_UINT8,
    "int16": pb.DTYPE_INT16,
    "int32": pb.DTYPE_INT32,
    "int64": pb.DTYPE_INT64,
    "bool": pb.DTYPE_BOOL,
}
_DTYPE_BY_WIRE = {v: k for k, v in _DTYPE_NAMES.items()}


class UpdateMode(str, Enum):
    SYNC = "sync"
    ASYNC = "async"
    SSP = "ssp"  # stale-synchronous: sync steps, workers may run up to `staleness_bound` steps ahead

    @classmethod
    def parse(cls, value: "str | UpdateMode") -> "UpdateMode":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown mode {value!r}; choose one of {', '.join(m.value for m in cls)}") from None


_MODE_TO_PB = {UpdateMode.SYNC: pb.UPDATE_MODE_SYNC, UpdateMode.ASYNC: pb.UPDATE_MODE_ASYNC,
               UpdateMode.SSP: pb.UPDATE_MODE_SSP}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}


@dataclass(frozen=True)
class JobConfig:
    """What every worker of a job agrees on. Construction checks everything (with torch's own
    optimizer constructor) and puts the optimizer's kwargs in canonical form: the class's
    complete defaults, and one complete kwargs dict per param group."""

    layout: Layout
    optimizer: str  # torch's lower-case name: "sgd", "adam", "adamw", "adagrad", ...
    optimizer_kwargs: dict[str, Any]  # the optimizer's defaults (torch's ``defaults`` with the user's kwargs)
    mode: UpdateMode = UpdateMode.SYNC
    min_workers: int = 1  # training starts once this many workers registered
    backup_workers: int = 0  # sync/ssp: close each step after the first (members - b) pushes
    staleness_lr: bool = False  # async/ssp: apply lr / max(1, staleness)
    staleness_bound: int = 0  # ssp: a worker may run this many steps ahead of the last closed one
    topk_ratio: float = 0.0  # fraction of each shard's gradient a push sends (top-k, error feedback); 0 = all
    balance_every: int = 0  # sync/ssp: re-split global batches by measured throughput every N steps; 0 = equal
    groups: tuple[dict[str, Any], ...] = ()  # each param group's complete kwargs (); () = one group of the defaults
    buffers: tuple[BufferEntry, ...] = ()  # persistent module buffers kept on shard 0 (rank 0's, as DDP's)
    broadcast_buffers: bool = True  # push replies carry rank 0's buffers to every worker (DDP's default)
    name: str = DEFAULT_JOB  # the job's name in its cluster (a GAN's two optimizers are two jobs)
    replicas: int = 1  # copies of each shard on different servers (>= 2: a lost server costs no rollback)
    # The step of the job's first update: 0, or for an added param group's job ("<job>.g<k>") its parent's step
    # when the group was added, so that the two count versions alike (worker/param_groups.py).
    first_step: int = 0

    def __post_init__(self):
        set_ = object.__setattr__  # canonical forms for a frozen dataclass
        defaults = optim.full_defaults(self.optimizer, self.optimizer_kwargs)
        set_(self, "optimizer_kwargs", defaults)
        groups = self.groups or (defaults,)
        if len(groups) > MAX_GROUPS:
            raise ValueError(f"a job has at most {MAX_GROUPS} param groups, got {len(groups)}")
        set_(self, "groups", tuple(optim.group_kwargs(self.optimizer, defaults, g) for g in groups))
        if any(not 0 <= e.group < len(self.groups) for e in self.layout.params):
            raise ValueError(f"a parameter names a param group outside 0..{len(self.groups) - 1}")
        if not JOB_NAME.fullmatch(self.name or ""):
            raise ValueError(f"job name {self.name[:80]!r} must be 1-64 letters, digits, '.', '_' or '-'")
        names = {n for e in self.layout.params for n in (e.name, *e.aliases)}
        for b in self.buffers:
            check_name(b.name, "buffer")
            check_shape(b.shape, f"buffer {b.name!r}")
            if b.dtype not in BUFFER_DTYPES:
                raise ValueError(f"buffer {b.name!r} has dtype {b.dtype}; supported: {', '.join(BUFFER_DTYPES)}")
            if b.name in names:
                raise ValueError(f"buffer name {b.name!r} is also a parameter's or another buffer's")
            names.add(b.name)
        if not 1 <= self.min_workers <= MAX_WORKERS:
            raise ValueError(f"min_workers must be in 1..{MAX_WORKERS}, got {self.min_workers}")
        if not 0 <= self.staleness_bound <= MAX_WORKERS:
            raise ValueError(f"the staleness bound must be in 0..{MAX_WORKERS}, got {self.staleness_bound}")
        if not 0 <= self.balance_every <= MAX_WORKERS:
            raise ValueError(f"balance_every must be in 0..{MAX_WORKERS}, got {self.balance_every}")
        if self.backup_workers and self.mode is UpdateMode.ASYNC:
            raise ValueError("backup_workers applies to sync and ssp modes only")
        if self.staleness_bound < 0:
            raise ValueError(f"the staleness bound must be >= 0 (0 is sync), got {self.staleness_bound}")
        if self.staleness_bound and self.mode is not UpdateMode.SSP:
            raise ValueError("a staleness bound applies to ssp mode only")
        if not 0 <= self.backup_workers < self.min_workers:
            raise ValueError(f"backup_workers must be in 0..min_workers-1 ({self.min_workers - 1}), "
                             f"got {self.backup_workers}")
        if not 0.0 <= self.topk_ratio <= 1.0:  # NaN fails this too
            raise ValueError(f"topk_ratio is a fraction in [0, 1], got {self.topk_ratio}")
        if self.balance_every < 0:
            raise ValueError(f"balance_every must be >= 0 (0: equal batches), got {self.balance_every}")
        if self.balance_every and self.mode is UpdateMode.ASYNC:
            raise ValueError("balancing batches applies to sync and ssp modes only (async workers run at their own pace)")
        if self.staleness_lr and self.mode is UpdateMode.SYNC:
            raise ValueError("staleness-aware lr applies to async and ssp modes only")
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be in 1..{MAX_REPLICAS} (1: no copies), got {self.replicas}")
        if not 0 <= self.first_step < 1 << 62:
            raise ValueError(f"first_step must be in 0..2**62-1, got {self.first_step}")

    @property
    def sparse_push(self) -> bool:
        """Whether pushes send only the top-k elements (a ratio of 0 or 1 sends them all)."""
        return 0.0 < self.topk_ratio < 1.0

    def differences(self, other: "JobConfig") -> list[str]:
        """Human-readable list of what differs from ``other`` (empty when equal)."""
        out = []
        if self.layout.fingerprint != other.layout.fingerprint:
            out.append(
                f"layout fingerprint {other.layout.fingerprint[:12]} differs from the job's "
                f"{self.layout.fingerprint[:12]} (every worker must build the same model)"
            )
        if (self.optimizer, self.optimizer_kwargs) != (other.optimizer, other.optimizer_kwargs):
            out.append(
                f"optimizer {other.optimizer} {other.optimizer_kwargs} differs from the job's "
                f"{self.optimizer} {self.optimizer_kwargs}"
            )
        if self.mode != other.mode:
            out.append(f"mode {other.mode.value} differs from the job's {self.mode.value}")
        if self.groups != other.groups or [e.group for e in self.layout.params] != [
                e.group for e in other.layout.params]:
            out.append("param groups differ from the job's (every worker must build the same groups with the "
                       "same hyper-parameters)")
        if [e.aliases for e in self.layout.params] != [e.aliases for e in other.layout.params]:
            out.append("tied parameter names differ from the job's")
        for name in ("min_workers", "backup_workers", "staleness_lr", "staleness_bound", "topk_ratio",
                     "balance_every", "buffers", "broadcast_buffers", "name", "replicas", "first_step"):
            if getattr(self, name) != getattr(other, name):
                out.append(f"{name} {getattr(other, name)} differs from the job's {getattr(self, name)}")
        return out

    def schedulable(self) -> list[list[str]]:
        """Per param group, the hyper-parameters that travel with every push."""
        return [optim.schedulable_keys(g) for g in self.groups]

    def hyper_json(self, lr: float | None = None) -> str:
        """The groups' starting schedulable hyper-parameters, as a push carries them (every
        group's lr replaced by ``lr`` when given)."""
        values = optim.hyper_of(self.groups, self.schedulable())
        if lr is not None:
            values = [{**v, "lr": lr} for v in values]
        return json.dumps(values, separators=(",", ":"))


@dataclass(frozen=True)
class ShardInfo:
    """A shard's range and the address of the server that owns it."""

    range: ShardRange
    address: str  # the primary's
    backups: tuple[str, ...] = ()  # servers keeping in-sync copies (replicated jobs), in promotion order


@dataclass(frozen=True)
class MemberInfo:
    worker_id: int
    rank: int
    name: str = ""
    device: str = ""


@dataclass(frozen=True)
class View:
    """Membership view: who makes up each step from ``start_step`` on."""

    epoch: int
    start_step: int
    members: tuple[MemberInfo, ...] = field(default_factory=tuple)

    @property
    def worker_ids(self) -> frozenset[int]:
        return frozenset(m.worker_id for m in self.members)


# ------------------------------------------------------------------ conversions


def layout_to_pb(layout: Layout) -> pb.Layout:
    return pb.Layout(
        params=[
            pb.ParamInfo(name=p.name, shape=list(p.shape), dtype=_DTYPE_NAMES[p.dtype], offset=p.offset,
                         group=p.group, aliases=list(p.aliases))
            for p in layout.params
        ],
        numel=layout.numel,
        fingerprint=layout.fingerprint,
    )


def layout_from_pb(msg: pb.Layout, groups: int = 1) -> Layout:
    entries = []
    for p in msg.params:
        if p.dtype not in _DTYPE_BY_WIRE:
            raise ValueError(f"parameter {p.name!r} has unsupported dtype {p.dtype}")
        entries.append((p.name, tuple(p.shape), _DTYPE_BY_WIRE[p.dtype], p.group, tuple(p.aliases)))
    layout = Layout.from_shapes(entries, groups)
    if layout.numel != msg.numel or layout.fingerprint != msg.fingerprint:
        raise ValueError("layout's numel or fingerprint does not match its parameters")
    if any(a.offset != b.offset for a, b in zip(layout.params, msg.params)):
        raise ValueError("layout's offsets do not lay the parameters end to end")
    return layout


def job_to_pb(job: JobConfig) -> pb.JobSpec:
    return pb.JobSpec(
        layout=layout_to_pb(job.layout),
        optimizer=pb.OptimizerSpec(name=job.optimizer, kwargs_json=json.dumps(job.optimizer_kwargs, sort_keys=True),
                                   groups=[pb.ParamGroupSpec(kwargs_json=json.dumps(g, sort_keys=True))
                                           for g in job.groups]),
        mode=_MODE_TO_PB[job.mode],
        min_workers=job.min_workers,
        backup_workers=job.backup_workers,
        staleness_aware_lr=job.staleness_lr,
        staleness_bound=job.staleness_bound,
        topk_ratio=job.topk_ratio,
        balance_every=job.balance_every,
        buffers=[pb.BufferInfo(name=b.name, shape=list(b.shape), dtype=_DTYPE_NAMES[b.dtype]) for b in job.buffers],
        broadcast_buffers=job.broadcast_buffers,
        name=job.name,
        replicas=job.replicas,
        first_step=job.first_step,
    )


def _json_object(text: str, what: str) -> dict:
    if len(text) > MAX_KWARGS_JSON:
        raise ValueError(f"{what} are {len(text)} bytes of JSON; at most {MAX_KWARGS_JSON}")
    try:
        value = json.loads(text or "{}")
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{what} are not JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def job_from_pb(msg: pb.JobSpec) -> JobConfig:
    """Parse and check a JobSpec completely; raises ValueError naming what is wrong."""
    if msg.mode not in _MODE_FROM_PB:
        raise ValueError("job mode is unspecified; set sync, ssp or async")
    kwargs = _json_object(msg.optimizer.kwargs_json, "optimizer kwargs")
    if len(msg.optimizer.groups) > MAX_GROUPS:
        raise ValueError(f"a job has at most {MAX_GROUPS} param groups, got {len(msg.optimizer.groups)}")
    groups = tuple(_json_object(g.kwargs_json, f"param group {i}'s kwargs") for i, g in enumerate(msg.optimizer.groups))
    if not msg.layout.params:
        raise ValueError("job layout has no parameters")
    if not math.isfinite(msg.topk_ratio):
        raise ValueError(f"topk_ratio must be a finite fraction, got {msg.topk_ratio}")
    buffers = []
    for b in msg.buffers:
        if b.dtype not in _DTYPE_BY_WIRE:
            raise ValueError(f"buffer {b.name!r} has unsupported dtype {b.dtype}")
        buffers.append(BufferEntry(b.name, tuple(int(d) for d in b.shape), _DTYPE_BY_WIRE[b.dtype]))
    return JobConfig(
        layout=layout_from_pb(msg.layout, max(1, len(groups))),
        optimizer=msg.optimizer.name,
        optimizer_kwargs=kwargs,
        mode=_MODE_FROM_PB[msg.mode],
        min_workers=msg.min_workers,
        backup_workers=msg.backup_workers,
        staleness_lr=msg.staleness_aware_lr,
        staleness_bound=msg.staleness_bound,
        topk_ratio=msg.topk_ratio,
        balance_every=msg.balance_every,
        groups=groups,
        buffers=tuple(buffers),
        broadcast_buffers=msg.broadcast_buffers,
        name=msg.name or DEFAULT_JOB,
        replicas=msg.replicas or 1,
        first_step=msg.first_step,
    )


def plan_to_pb(shards: list[ShardInfo], numel: int, align: int) -> pb.ShardPlan:
    return pb.ShardPlan(
        shards=[
            pb.ShardAssignment(shard_id=s.range.shard_id, start=s.range.start, stop=s.range.stop, address=s.address,
                               backups=list(s.backups))
            for s in shards
        ],
        numel=numel,
        align=align,
    )


def plan_from_pb(msg: pb.ShardPlan) -> list[ShardInfo]:
    return [ShardInfo(ShardRange(s.shard_id, s.start, s.stop), s.address, tuple(s.backups)) for s in msg.shards]


def view_to_pb(view: View) -> pb.MembershipView:
    return pb.MembershipView(
        epoch=view.epoch,
        start_step=view.start_step,
        members=[pb.Member(worker_id=m.worker_id, rank=m.rank, name=m.name, device=m.device) for m in view.members],
    )


def view_from_pb(msg: pb.MembershipView) -> View:
    return View(
        msg.epoch,
        msg.start_step,
        tuple(MemberInfo(m.worker_id, m.rank, m.name, m.device) for m in msg.members),
    )


def member_to_pb(m: MemberInfo) -> pb.Member:
    return pb.Member(worker_id=m.worker_id, rank=m.rank, name=m.name, device=m.device)


def mode_to_pb(mode: UpdateMode) -> int:
    return _MODE_TO_PB[mode]


def mode_from_pb(value: int) -> UpdateMode:
    return _MODE_FROM_PB[value]


# ------------------------------------------------------------------ step options


@dataclass(frozen=True)
class StepOpts:
    """How a push's step is applied (``StepOptions`` in the .proto, checked)."""

    batch_size: int = 1  # samples behind the gradient: its weight in the sync mean
    hyper_json: str = ""  # the groups' schedulable hyper-parameters ("" keeps the shard's)
    grad_mask: bytes = b""  # bit i: piece i has a gradient; b"" every piece has one
    overflow: bool = False  # fp16 overflow on this worker: no gradient, the step is skipped everywhere
    grad_scale: float = 0.0  # the gradient is multiplied by this loss scale (0: not scaled)
    clip_max_norm: float = 0.0  # > 0: clip the step's aggregated gradient to this total norm
    clip_norm_type: float = 2.0  # p of that norm (inf allowed)

    @classmethod
    def from_pb(cls, msg: pb.StepOptions) -> "StepOpts":
        return cls(msg.batch_size, msg.hyperparams_json, bytes(msg.grad_mask), msg.overflow, msg.grad_scale,
                   msg.clip_max_norm, msg.clip_norm_type or 2.0)

    def to_pb(self) -> pb.StepOptions:
        return pb.StepOptions(batch_size=self.batch_size, hyperparams_json=self.hyper_json, grad_mask=self.grad_mask,
                              overflow=self.overflow, grad_scale=self.grad_scale, clip_max_norm=self.clip_max_norm,
                              clip_norm_type=self.clip_norm_type)

    def check(self, pieces: int) -> None:
        """Raise ValueError naming the field that is out of range for a shard of ``pieces`` pieces."""
        if not 0 < self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be in 1..{MAX_BATCH}, got {self.batch_size}")
        if self.grad_mask and len(self.grad_mask) != (pieces + 7) // 8:
            raise ValueError(f"grad_mask must be {(pieces + 7) // 8} bytes for this shard's {pieces} pieces "
                             f"(or empty), got {len(self.grad_mask)}")
        if not (math.isfinite(self.grad_scale) and self.grad_scale >= 0):
            raise ValueError(f"grad_scale must be a finite number >= 0, got {self.grad_scale}")
        if self.grad_scale and not MIN_GRAD_SCALE <= self.grad_scale <= MAX_GRAD_SCALE:
            raise ValueError(f"grad_scale must be 0 (not scaled) or a normal float32 in [{MIN_GRAD_SCALE:.3g}, "
                             f"{MAX_GRAD_SCALE:.3g}] (its reciprocal unscales the gradient), got {self.grad_scale}")
        if not (math.isfinite(self.clip_max_norm) and self.clip_max_norm >= 0):
            raise ValueError(f"clip_max_norm must be a finite number >= 0, got {self.clip_max_norm}")
        if not self.clip_norm_type > 0:  # NaN fails too; +inf is the max norm
            raise ValueError(f"clip_norm_type must be > 0 (or inf), got {self.clip_norm_type}")

    @property
    def clipped(self) -> bool:
        return self.clip_max_norm > 0

    def present(self, pieces: int) -> list[bool] | None:
        """Which pieces carry a gradient (None: all of them)."""
        if not self.grad_mask:
            return None
        return [bool(self.grad_mask[i >> 3] >> (i & 7) & 1) for i in range(pieces)]


def mask_of(present: list[bool]) -> bytes:
    """``grad_mask`` bytes for ``present`` (b"" when every piece is present)."""
    if all(present):
        return b""
    out = bytearray((len(present) + 7) // 8)
    for i, p in enumerate(present):
        if p:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)
