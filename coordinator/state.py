"""Coordinator core: job spec, shard plan, servers and membership views. Never touches tensors.

The first worker to register defines the job; later workers must send the same
spec. Training starts when ``min_workers`` workers have registered: that forms
membership view 1 (epoch 1, ranks in registration order). In async mode a later
worker joins at once with a new view; in sync mode the view is fixed once
training starts (a change needs every shard to agree on the step it takes
effect, which is the membership protocol's job, see docs/architecture.md).

    coord = Coordinator(num_servers=2)
    coord.register_server("127.0.0.1:7071", shard_id=-1)
    reg = coord.register_worker(job, name="host-a", device="cpu")
    view = coord.watch(reg.job_id, after_epoch=0, timeout=30)
"""
from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

from ..proto.errors import FailedPrecondition, InvalidArgument, Unavailable, WrongJob
from ..proto.messages import JobConfig, MemberInfo, ShardInfo, UpdateMode, View
from ..proto.plan import DEFAULT_ALIGN, plan_shards

MAX_WATCH_S = 60.0  # longest a WatchMembership call is held open


@dataclass(frozen=True)
class Registration:
    job_id: str
    worker_id: int
    job: JobConfig
    plan: list[ShardInfo]
    initializer: bool


class Coordinator:
    def __init__(self, num_servers: int, align: int = DEFAULT_ALIGN):
        if num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {num_servers}")
        self.num_servers, self.align = num_servers, align
        self.servers: dict[int, str] = {}  # shard_id -> address
        self.job: JobConfig | None = None
        self.job_id = ""
        self.plan: list[ShardInfo] = []
        self.views: list[View] = []  # views[e - 1] is epoch e
        self.pending: list[MemberInfo] = []  # registered, waiting for the first view
        self.left: list[int] = []
        self._next_worker_id = 0
        self.cond = threading.Condition()

    # ------------------------------------------------------------------ servers

    def register_server(self, address: str, shard_id: int = -1) -> int:
        """Record where shard ``shard_id`` is served (-1: the lowest free id). Returns the id."""
        if not address or ":" not in address:
            raise InvalidArgument(f"server address must be host:port, got {address!r}")
        with self.cond:
            if shard_id == -1:
                free = [i for i in range(self.num_servers) if i not in self.servers]
                if not free:
                    raise FailedPrecondition(
                        f"all {self.num_servers} shard ids are taken; restart a server with its --shard-id"
                    )
                shard_id = free[0]
            elif not 0 <= shard_id < self.num_servers:
                raise InvalidArgument(f"shard id {shard_id} is outside 0..{self.num_servers - 1}")
            self.servers[shard_id] = address
            self.plan = [ShardInfo(s.range, self.servers[s.range.shard_id]) for s in self.plan]
            self.cond.notify_all()
            return shard_id

    # ------------------------------------------------------------------ workers

    def register_worker(self, job: JobConfig, name: str = "", device: str = "") -> Registration:
        with self.cond:
            if len(self.servers) < self.num_servers:
                raise Unavailable(
                    f"waiting for shard servers: {len(self.servers)}/{self.num_servers} registered"
                )
            initializer = self.job is None
            if initializer:
                self._define(job)
            else:
                differences = self.job.differences(job)
                if differences:
                    raise WrongJob("refused: " + "; ".join(differences))
            if self.views and self.job.mode is UpdateMode.SYNC:
                raise FailedPrecondition(
                    f"the sync job is already training with {len(self.views[-1].members)} workers and its "
                    "membership is fixed; start every worker before training (set min_workers to their number)"
                )
            member = MemberInfo(self._next_worker_id, -1, name, device)
            self._next_worker_id += 1
            self._admit(member)
            return Registration(self.job_id, member.worker_id, self.job, list(self.plan), initializer)

    def _define(self, job: JobConfig) -> None:
        self.job, self.job_id = job, uuid.uuid4().hex[:16]
        ranges = plan_shards(job.layout.numel, self.num_servers, self.align)
        self.plan = [ShardInfo(r, self.servers[r.shard_id]) for r in ranges]

    def _admit(self, member: MemberInfo) -> None:
        if self.views:  # async job already running: join now
            current = self.views[-1].members
            self._new_view((*current, MemberInfo(member.worker_id, len(current), member.name, member.device)))
            return
        self.pending.append(member)
        if len(self.pending) >= self.job.min_workers:
            ranked = tuple(MemberInfo(m.worker_id, r, m.name, m.device) for r, m in enumerate(self.pending))
            self.pending.clear()
            self._new_view(ranked)

    def _new_view(self, members: tuple[MemberInfo, ...], start_step: int = 0) -> None:
        self.views.append(View(len(self.views) + 1, start_step, members))
        self.cond.notify_all()

    def leave(self, job_id: str, worker_id: int) -> None:
        """A worker is done. Async jobs get a view without it; sync views stay fixed."""
        with self.cond:
            self._check_job(job_id)
            if worker_id in self.left:
                return
            self.left.append(worker_id)
            self.pending = [m for m in self.pending if m.worker_id != worker_id]
            if self.views and self.job.mode is UpdateMode.ASYNC:
                rest = [m for m in self.views[-1].members if m.worker_id != worker_id]
                self._new_view(tuple(MemberInfo(m.worker_id, r, m.name, m.device) for r, m in enumerate(rest)))

    # ------------------------------------------------------------------ views

    def latest(self) -> View:
        return self.views[-1] if self.views else View(0, 0, ())

    def watch(self, job_id: str, after_epoch: int, timeout: float) -> View:
        """Block until a view newer than ``after_epoch`` exists or ``timeout`` s pass; return the latest."""
        with self.cond:
            self._check_job(job_id)
            self.cond.wait_for(lambda: self.latest().epoch > after_epoch, timeout=min(timeout, MAX_WATCH_S))
            return self.latest()

    def view(self, job_id: str, epoch: int) -> View:
        """The view of ``epoch`` (0: the latest)."""
        with self.cond:
            self._check_job(job_id)
            if epoch == 0:
                return self.latest()
            if not 1 <= epoch <= len(self.views):
                raise FailedPrecondition(f"membership epoch {epoch} does not exist (latest is {len(self.views)})")
            return self.views[epoch - 1]

    def _check_job(self, job_id: str) -> None:
        if not self.job_id or job_id != self.job_id:
            raise WrongJob(f"job {job_id!r} is not this cluster's job {self.job_id!r}")
