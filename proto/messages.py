"""Plain dataclasses for job specs, plans and membership, and their protobuf forms.

Cores work with these; only adapters and clients convert, through the functions here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .gen import shardps_pb2 as pb
from .layout import Layout
from .plan import ShardRange

_DTYPE_NAMES = {
    "float32": pb.DTYPE_FLOAT32,
    "float64": pb.DTYPE_FLOAT64,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
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
    """What every worker of a job agrees on."""

    layout: Layout
    optimizer: str  # torch's lower-case name: "sgd", "adam", "adamw"
    optimizer_kwargs: dict[str, Any]  # that class's keyword arguments, canonical JSON types
    mode: UpdateMode = UpdateMode.SYNC
    min_workers: int = 1  # training starts once this many workers registered
    backup_workers: int = 0  # sync/ssp: close each step after the first (members - b) pushes
    staleness_lr: bool = False  # async/ssp: apply lr / max(1, staleness)
    staleness_bound: int = 0  # ssp: a worker may run this many steps ahead of the last closed one
    topk_ratio: float = 0.0  # fraction of each shard's gradient a push sends (top-k, error feedback); 0 = all
    balance_every: int = 0  # sync/ssp: re-split global batches by measured throughput every N steps; 0 = equal

    def __post_init__(self):
        if self.min_workers < 1:
            raise ValueError(f"min_workers must be >= 1, got {self.min_workers}")
        if self.backup_workers and self.mode is UpdateMode.ASYNC:
            raise ValueError("backup_workers applies to sync and ssp modes only")
        if self.staleness_bound < 0:
            raise ValueError(f"the staleness bound must be >= 0 (0 is sync), got {self.staleness_bound}")
        if self.staleness_bound and self.mode is not UpdateMode.SSP:
            raise ValueError("a staleness bound applies to ssp mode only")
        if not 0 <= self.backup_workers < self.min_workers:
            raise ValueError(f"backup_workers must be in 0..min_workers-1 ({self.min_workers - 1}), "
                             f"got {self.backup_workers}")
        if not 0.0 <= self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio is a fraction in [0, 1], got {self.topk_ratio}")
        if self.balance_every < 0:
            raise ValueError(f"balance_every must be >= 0 (0: equal batches), got {self.balance_every}")
        if self.balance_every and self.mode is UpdateMode.ASYNC:
            raise ValueError("balancing batches applies to sync and ssp modes only (async workers run at their own pace)")
        if self.staleness_lr and self.mode is UpdateMode.SYNC:
            raise ValueError("staleness-aware lr applies to async and ssp modes only")

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
        for name in ("min_workers", "backup_workers", "staleness_lr", "staleness_bound", "topk_ratio",
                     "balance_every"):
            if getattr(self, name) != getattr(other, name):
                out.append(f"{name} {getattr(other, name)} differs from the job's {getattr(self, name)}")
        return out


@dataclass(frozen=True)
class ShardInfo:
    """A shard's range and the address of the server that owns it."""

    range: ShardRange
    address: str


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
            pb.ParamInfo(name=p.name, shape=list(p.shape), dtype=_DTYPE_NAMES[p.dtype], offset=p.offset)
            for p in layout.params
        ],
        numel=layout.numel,
        fingerprint=layout.fingerprint,
    )


def layout_from_pb(msg: pb.Layout) -> Layout:
    entries = []
    for p in msg.params:
        if p.dtype not in _DTYPE_BY_WIRE:
            raise ValueError(f"parameter {p.name!r} has unsupported dtype {p.dtype}")
        entries.append((p.name, tuple(p.shape), _DTYPE_BY_WIRE[p.dtype]))
    layout = Layout.from_shapes(entries)
    if layout.numel != msg.numel or layout.fingerprint != msg.fingerprint:
        raise ValueError("layout's numel or fingerprint does not match its parameters")
    if any(a.offset != b.offset for a, b in zip(layout.params, msg.params)):
        raise ValueError("layout's offsets do not lay the parameters end to end")
    return layout


def job_to_pb(job: JobConfig) -> pb.JobSpec:
    return pb.JobSpec(
        layout=layout_to_pb(job.layout),
        optimizer=pb.OptimizerSpec(name=job.optimizer, kwargs_json=json.dumps(job.optimizer_kwargs, sort_keys=True)),
        mode=_MODE_TO_PB[job.mode],
        min_workers=job.min_workers,
        backup_workers=job.backup_workers,
        staleness_aware_lr=job.staleness_lr,
        staleness_bound=job.staleness_bound,
        topk_ratio=job.topk_ratio,
        balance_every=job.balance_every,
    )


def job_from_pb(msg: pb.JobSpec) -> JobConfig:
    """Parse and check a JobSpec; raises ValueError naming what is wrong."""
    if msg.mode not in _MODE_FROM_PB:
        raise ValueError("job mode is unspecified; set sync or async")
    try:
        kwargs = json.loads(msg.optimizer.kwargs_json or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"optimizer kwargs are not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("optimizer kwargs must be a JSON object")
    if not msg.layout.params:
        raise ValueError("job layout has no parameters")
    return JobConfig(
        layout=layout_from_pb(msg.layout),
        optimizer=msg.optimizer.name,
        optimizer_kwargs=kwargs,
        mode=_MODE_FROM_PB[msg.mode],
        min_workers=msg.min_workers,
        backup_workers=msg.backup_workers,
        staleness_lr=msg.staleness_aware_lr,
        staleness_bound=msg.staleness_bound,
        topk_ratio=msg.topk_ratio,
        balance_every=msg.balance_every,
    )


def plan_to_pb(shards: list[ShardInfo], numel: int, align: int) -> pb.ShardPlan:
    return pb.ShardPlan(
        shards=[
            pb.ShardAssignment(shard_id=s.range.shard_id, start=s.range.start, stop=s.range.stop, address=s.address)
            for s in shards
        ],
        numel=numel,
        align=align,
    )


def plan_from_pb(msg: pb.ShardPlan) -> list[ShardInfo]:
    return [ShardInfo(ShardRange(s.shard_id, s.start, s.stop), s.address) for s in msg.shards]


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
