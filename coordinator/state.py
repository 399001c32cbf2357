"""Coordinator core: job spec, shard plan, servers and membership views. Never touches tensors.

The first worker to register defines the job; later workers must send the same
spec. Training starts when ``min_workers`` workers have registered: that forms
membership view 1 (epoch 1, ranks in registration order). In async mode a later
worker joins at once with a new view. Sync and SSP jobs change membership at a
step boundary that every shard agrees on (``reconfigure``): workers hold leases
renewed by heartbeats; a worker whose lease runs out is removed from the step
its shards have open, and a new worker is added from a step a few steps ahead
that no shard has closed yet (every shard must accept that step before the view
is published; see docs/architecture.md).

    coord = Coordinator(num_servers=2)
    coord.register_server("127.0.0.1:7071", shard_id=-1)
    reg = coord.register_worker(job, name="host-a", device="cpu")
    view = coord.watch(reg.job_id, after_epoch=0, timeout=30)
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

from ..proto.errors import FailedPrecondition, InvalidArgument, Unavailable, UnknownWorker, WrongJob
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


class Coordinator:
    def __init__(self, num_servers: int, align: int = DEFAULT_ALIGN, shards=None, lease_s: float = 10.0):
        """``shards``: how to reach shard servers (``coordinator.shards.ShardAdmin``); needed for rollbacks."""
        if num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {num_servers}")
        self.num_servers, self.align, self.shards = num_servers, align, shards
        self.rollbacks: list[RollbackRecord] = []
        self.lease_s = lease_s
        self.last_seen: dict[int, float] = {}  # worker_id -> monotonic time of its last sign of life
        self.reports: dict[int, tuple[int, dict[str, int]]] = {}  # worker_id -> (step, fault counters)
        self.expired: list[int] = []  # removed because their lease ran out
        self.waiting_for = ""  # why the job cannot go on, when it cannot
        self.start_step = 0  # the first view's start step (a resumed job starts where its checkpoint is)
        self.servers: dict[int, str] = {}  # shard_id -> address
        self.job: JobConfig | None = None
        self.job_id = ""
        self.plan: list[ShardInfo] = []
        self.views: list[View] = []  # views[e - 1] is epoch e
        self.pending: list[MemberInfo] = []  # registered, waiting for the first view
        self.left: list[int] = []
        self._next_worker_id = 0
        self.balancer = BatchSplitter()
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
            self.plan = [ShardInfo(s.range, self.servers.get(s.range.shard_id, "")) for s in self.plan]
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
            member = MemberInfo(self._next_worker_id, -1, name, device)
            self._next_worker_id += 1
            self.last_seen[member.worker_id] = time.monotonic()
            self._admit(member)
            return Registration(self.job_id, member.worker_id, self.job, list(self.plan), initializer)

    def resume(self, job_id: str, job: JobConfig, step: int) -> None:
        """Run a job resumed from a checkpoint: it is defined before any worker registers (nobody
        uploads parameters: the servers restore them) and training starts at ``step``."""
        with self.cond:
            if self.job is not None:
                raise FailedPrecondition("this coordinator already runs a job")
            self._define(job, job_id)
            self.start_step = step

    def _define(self, job: JobConfig, job_id: str = "") -> None:
        self.job, self.job_id = job, job_id or uuid.uuid4().hex[:16]
        ranges = plan_shards(job.layout.numel, self.num_servers, self.align)
        self.plan = [ShardInfo(r, self.servers.get(r.shard_id, "")) for r in ranges]  # addresses fill in as servers register

    def _admit(self, member: MemberInfo) -> None:
        if self.views and self.job.mode is not UpdateMode.ASYNC:
            self.pending.append(member)  # joins at a step boundary: reconfigure()
            return
        if self.views:  # async job already running: join now
            current = self.views[-1].members
            self._new_view((*current, MemberInfo(member.worker_id, len(current), member.name, member.device)))
            return
        self.pending.append(member)
        if len(self.pending) >= self.job.min_workers:
            ranked = tuple(MemberInfo(m.worker_id, r, m.name, m.device) for r, m in enumerate(self.pending))
            self.pending.clear()
            self._new_view(ranked, start_step=self.start_step)

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

    # ------------------------------------------------------------------ leases and membership changes

    def heartbeat(self, job_id: str, worker_id: int, step: int, counters: dict[str, int]) -> tuple[int, float]:
        """Renew ``worker_id``'s lease; returns (newest epoch, lease seconds)."""
        with self.cond:
            self._check_job(job_id)
            if worker_id in self.expired:
                raise UnknownWorker(f"worker {worker_id}'s lease ran out and it was removed from the job; "
                                    "register again to rejoin")
            if worker_id >= self._next_worker_id:
                raise UnknownWorker(f"worker {worker_id} never registered with this coordinator")
            self.last_seen[worker_id] = time.monotonic()
            self.reports[worker_id] = (step, dict(counters))
            return self.latest().epoch, self.lease_s

    def reconfigure(self) -> View | None:
        """Apply due membership changes (called a few times a second): remove members whose lease ran
        out, add workers that registered after training started. Returns the new view, if any."""
        with self.cond:
            if not self.views or self.job is None:
                return None
            now = time.monotonic()
            current = self.latest().members
            dead = [m for m in current if m.worker_id not in self.left
                    and now - self.last_seen.get(m.worker_id, now) > self.lease_s]
            alive = [m for m in current if m not in dead]
            if self.job.mode is UpdateMode.ASYNC:
                if dead:
                    self.expired += [m.worker_id for m in dead]
                    self._new_view(_ranked(alive))
                return self.latest() if dead else None
            if dead and len(alive) + len(self.pending) < self.job.min_workers:
                self.waiting_for = (
                    f"only {len(alive)} of min_workers {self.job.min_workers} workers are alive (the lease of "
                    f"worker {', '.join(str(m.worker_id) for m in dead)} ran out); start another worker"
                )
                return None
            self.waiting_for = ""
            view = None
            if dead:
                self.expired += [m.worker_id for m in dead]
                view = self._install(_ranked(alive), from_open_step=True)
            if self.pending:
                joiners, self.pending = self.pending, []
                try:
                    view = self._install(_ranked([*self.latest().members, *joiners]), from_open_step=False)
                except Exception:
                    self.pending = joiners + self.pending  # try again next time
                    raise
            return view

    def _install(self, members: tuple[MemberInfo, ...], from_open_step: bool) -> View:
        """Have every shard install the next view, then publish it (under the lock).

        A removal takes effect at the lowest open step (shards that closed it already apply it
        from their own open step: the dead worker's last step may be made up differently on
        different shards, as with backup workers). A join must start at a step no shard has
        closed, so that every shard waits for the new worker there: the coordinator proposes a
        step a few ahead of the furthest shard and proposes again if any shard is already past it.
        """
        epoch = len(self.views) + 1
        margin = 3 + self.job.staleness_bound
        for _ in range(20):
            versions = {sid: self.shards.checkpoints(a).version for sid, a in sorted(self.servers.items())}
            start = min(versions.values()) if from_open_step else max(versions.values()) + margin
            view = View(epoch, start, members)
            answers = [self.shards.set_membership(a, self.job_id, view, from_open_step)
                       for _, a in sorted(self.servers.items())]
            if all(accepted for accepted, _ in answers):
                self.views.append(view)
                self.cond.notify_all()
                return view
            margin *= 2
        raise Unavailable(f"could not agree on a step for membership epoch {epoch} with the shards; retrying")

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

    # ------------------------------------------------------------------ recovery

    def report_restore(self, job_id: str, shard_id: int, version: int) -> RollbackRecord:
        """Shard ``shard_id`` restarted and restored its checkpoint of ``version``. Roll every shard
        back to the newest version all of them have a checkpoint of, and start a new membership
        epoch there (same members): workers whose pushes name the old epoch are told to pull and
        go on from that step. Holds the coordinator's lock throughout, so nothing else changes
        membership meanwhile."""
        with self.cond:
            self._check_job(job_id)
            if self.shards is None:
                raise FailedPrecondition("this coordinator cannot reach shard servers to roll them back")
            if len(self.servers) < self.num_servers:
                raise Unavailable(f"waiting for shard servers: {len(self.servers)}/{self.num_servers} registered")
            listings = {sid: self.shards.checkpoints(address) for sid, address in sorted(self.servers.items())}
            common = set.intersection(*(set(c.versions) for c in listings.values()))
            if not common:
                raise FailedPrecondition(
                    "no checkpoint version is common to every shard: "
                    + "; ".join(f"shard {sid} has {c.versions}" for sid, c in listings.items())
                    + " (checkpoint every shard at the same versions: --checkpoint-every)"
                )
            target = max(common)
            epoch = len(self.views) + 1
            from_version = max(c.version for c in listings.values())
            for address in (a for _, a in sorted(self.servers.items())):
                self.shards.rollback(address, job_id, target, epoch)
            if self.views:
                self._new_view(self.latest().members, start_step=target)
            else:  # a resumed job, before training started: the first view starts there
                self.start_step = target
            record = RollbackRecord(shard_id, from_version, target, epoch, time.time())
            self.rollbacks.append(record)
            return record

    # ------------------------------------------------------------------ batch balancing

    def report_throughput(self, job_id: str, worker_id: int, window: int, rate: float,
                          global_batch: int) -> tuple[int, ...]:
        """Record ``rate`` (samples/s over window - 1) and return window's batch size per rank."""
        with self.cond:
            self._check_job(job_id)
            if not self.job.balance_every:
                raise FailedPrecondition("this job keeps equal batches; start its workers with --balance-every N")
            members = self.latest().members
            if worker_id not in {m.worker_id for m in members}:
                raise UnknownWorker(f"worker {worker_id} is not in the job's current view; register first")
            if window < 0 or rate < 0 or rate != rate:
                raise InvalidArgument(f"window ({window}) and samples_per_second ({rate}) must be >= 0")
            return self.balancer.report(members, worker_id, window, rate, global_batch)

    def _check_job(self, job_id: str) -> None:
        if not self.job_id or job_id != self.job_id:
            raise WrongJob(f"job {job_id!r} is not this cluster's job {self.job_id!r}")


def _ranked(members) -> tuple[MemberInfo, ...]:
    """``members`` renumbered 0..n-1 in order."""
    return tuple(MemberInfo(m.worker_id, r, m.name, m.device) for r, m in enumerate(members))


class BatchSplitter:
    """Splits each global batch between ranks in proportion to their measured throughput.

    Windows are ``balance_every`` steps long. At the start of window n a worker
    reports the samples/s it measured over window n - 1 and asks for window n's
    split. Window n's split is decided by the first worker that asks (then kept, so
    every worker uses the same one) from the rates measured over window n - 2:
    those were reported at the start of window n - 1, before any worker could have
    finished it, so in sync mode they are all in. If some are missing (a backup
    worker skipped the window) the split stays as it was. Splitting the global
    batch, never resizing it, keeps sync training the same as one process on the
    union batch: only who computes which rows changes.
    """

    def __init__(self):
        self.global_batch = 0
        self.splits: dict[int, tuple[int, ...]] = {}  # window -> batch size by rank
        self.rates: dict[int, dict[int, float]] = {}  # window -> worker_id -> samples/s measured over it

    def report(self, members, worker_id: int, window: int, rate: float, global_batch: int) -> tuple[int, ...]:
        if global_batch < len(members):
            raise InvalidArgument(f"a global batch of {global_batch} cannot be split between {len(members)} workers")
        if self.global_batch and global_batch != self.global_batch:
            raise InvalidArgument(f"global batch {global_batch} differs from the job's {self.global_batch}; "
                                  "every worker must use the same --batch-size")
        self.global_batch = global_batch
        if window > 0 and rate > 0:
            self.rates.setdefault(window - 1, {})[worker_id] = rate
        if window not in self.splits:
            self.splits[window] = self._decide(members, window)
            for old in [w for w in self.rates if w < window - 2]:
                del self.rates[old]
        return self.splits[window]

    def _decide(self, members, window: int) -> tuple[int, ...]:
        rates = self.rates.get(window - 2, {})
        if all(m.worker_id in rates for m in members):
            return proportional_split(self.global_batch, [rates[m.worker_id] for m in members])
        earlier = [w for w in self.splits if w < window]
        return self.splits[max(earlier)] if earlier else proportional_split(self.global_batch, [1.0] * len(members))


def proportional_split(total: int, weights: list[float]) -> tuple[int, ...]:
    """``total`` cut into len(weights) parts >= 1 in proportion to ``weights`` (largest remainders)."""
    n = len(weights)
    spare, whole = total - n, sum(weights)
    shares = [spare * w / whole for w in weights]
    sizes = [1 + int(s) for s in shares]
    by_remainder = sorted(range(n), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in by_remainder[:total - sum(sizes)]:
        sizes[i] += 1
    return tuple(sizes)
