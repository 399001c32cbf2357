"""What the coordinator keeps of one named job: its spec and plan, its membership over time, and what happened to it.

Plain records, no locks: ``coordinator.state.Coordinator`` holds them under its own lock
and is the only writer; the journal (``coordinator.journal``) writes and reads them whole.
A worker's registration answer (``Registration``) and a rollback (``RollbackRecord``) are
records of the same job.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..proto.messages import JobConfig, MemberInfo, ShardInfo, View
from .collectives import Rounds
from .placement import Placement
from .splitter import BatchSplitter


@dataclass(frozen=True)
class Registration:
    job_id: str
    worker_id: int
    job: JobConfig
    plan: list[ShardInfo]
    initializer: bool


@dataclass(frozen=True)
class RollbackRecord:
    shard_id: int  # the restarted shard that caused it
    from_version: int  # the highest version any shard had
    to_version: int  # the version every shard has now
    epoch: int  # the membership epoch that starts at to_version
    unix_time: float

    @property
    def steps(self) -> int:
        return self.from_version - self.to_version


@dataclass
class JobState:
    """One named job: its spec and plan, its membership over time, and what happened to it."""

    name: str
    job_id: str
    job: JobConfig
    plan: list[ShardInfo]
    start_step: int = 0  # the first view's start step (a resumed job starts where its checkpoint is)
    views: list[View] = field(default_factory=list)  # views[e - 1] is epoch e
    pending: list[MemberInfo] = field(default_factory=list)  # registered, waiting to join a view
    left: list[int] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)  # removed because their lease ran out
    rollbacks: list[RollbackRecord] = field(default_factory=list)
    registered_ids: list[int] = field(default_factory=list)  # every worker that ever registered, in order
    last_seen: dict[int, float] = field(default_factory=dict)  # worker_id -> monotonic time (not durable)
    reports: dict[int, tuple[int, dict[str, int]]] = field(default_factory=dict)  # worker -> (step, counters)
    waiting_for: str = ""  # why the job cannot go on, when it cannot
    abandoned: bool = False  # ... because the other workers left it (nobody is coming back)
    balancer: BatchSplitter = field(default_factory=BatchSplitter)
    placement: Placement | None = None  # replicated jobs: where each shard's copies are
    rounds: Rounds = field(default_factory=Rounds)  # collectives among the workers (not durable)

    def latest(self) -> View:
        return self.views[-1] if self.views else View(0, 0, ())

    def registered(self, worker_id: int) -> bool:
        return worker_id in self.last_seen or worker_id in self.registered_ids
