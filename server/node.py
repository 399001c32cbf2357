"""ShardNode: what one shard-server process holds, before and after its jobs start.

A server starts empty, registers with the coordinator and learns its shard id. When
a job's initializer worker uploads the starting parameters, the node asks the
coordinator for that job (the authority on spec and plan), checks that the upload
matches both, and creates its ``ShardState``; a cluster may run several jobs, each
a ``ShardState`` here. Calls that arrive before that wait, with a timeout. A server
that restarts restores each job's newest checkpoint, or knows it cannot serve the
job and says so at once. No gRPC here: the coordinator lookups are functions passed in.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..proto.errors import FailedPrecondition, InvalidArgument, WrongJob
from ..proto.defaults import STEP_TIMEOUT_S
from ..proto.messages import (DEFAULT_JOB, JOB_NAME, MAX_REPLICAS, JobConfig, ShardInfo, View,
                              added_group_parent)
from ..runtime.history import NO_HISTORY, History
from ..runtime.gauges import ShardGauges
from .checkpoint import Checkpointer, CheckpointStore
from . import replica as replicas
from .state import ShardState

log = logging.getLogger("shardps.server")

MAX_ASSIGNMENTS = 4096  # replica assignments in one SetReplicas call
MAX_EPOCH_JUMP = 1 << 20  # a rollback's epoch is at most this far past the newest view a shard knows
FetchJob = Callable[[str], tuple[str, JobConfig, list[ShardInfo]]]  # job_id -> (job_id, job, plan)
FetchView = Callable[[str, int], View]  # (job_id, epoch) -> view


@dataclass(frozen=True)
class Target:
    """What a caller says it is talking to (the ShardTarget message, decoded)."""

    job_id: str
    fingerprint: str
    shard_id: int
    start: int
    stop: int


class BufferPool:
    """Reusable receive buffers, by (dtype, numel): a fresh 100 MB buffer costs ~35 ms
    of page faults, a reused one nothing. Each buffer is lent to one call at a time."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        with self._lock:
            free = self._free[(dtype, numel)]
            if free:
                return free.pop()
        return torch.empty(numel, dtype=dtype)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free[(buf.dtype, buf.numel())].append(buf)


class MembershipCache:
    """Views by epoch, fetched from the coordinator once each (views never change)."""

    def __init__(self, fetch: FetchView):
        self._fetch = fetch
        self._views: dict[tuple[str, int], View] = {}
        self._lock = threading.Lock()

    def view(self, job_id: str, epoch: int) -> View:
        key = (job_id, epoch)
        with self._lock:
            view = self._views.get(key)
        if view is None:
            view = self._fetch(job_id, epoch)  # outside the lock: a network call
            if view.epoch != epoch:
                raise FailedPrecondition(f"membership epoch {epoch} does not exist (latest is {view.epoch})")
            with self._lock:
                self._views[key] = view
        return view


class ShardNode:
    """The jobs one shard server holds (a cluster may run several), by job id."""

    def __init__(self, shard_id: int, fetch_job: FetchJob, fetch_view: FetchView, step_timeout: float = STEP_TIMEOUT_S,
                 checkpoint_dir: str = "", checkpoint_every: int = 0, checkpoint_keep: int = 3,
                 history: History = NO_HISTORY):
        self.shard_id = shard_id
        self.history = history  # the run's history (runtime/history.py): every state here records into it
        self.step_timeout = step_timeout
        self.checkpoint_dir, self.checkpoint_every, self.checkpoint_keep = checkpoint_dir, checkpoint_every, checkpoint_keep
        self.checkpointers: dict[str, Checkpointer] = {}  # job_id -> its checkpointer
        self.membership = MembershipCache(fetch_view)
        self.buffers = BufferPool()
        self._fetch_job = fetch_job
        self.states: dict[str, ShardState] = {}  # job_id -> this server's own shard of it
        # Replicated jobs: copies of other shards this server holds (backups, or promoted primaries).
        self.others: dict[tuple[str, int], ShardState] = {}
        self.address = ""  # where workers reach this server (set at registration)
        self.send = None  # server.replica.Send: how a primary here reaches its backups (set by the gRPC layer)
        self.lost: dict[str, str] = {}  # job_id -> why this restarted server cannot serve it
        self.coordinator_generation = 0  # the newest coordinator generation seen (older ones are refused)
        self._cond = threading.Condition()

    @property
    def state(self) -> ShardState | None:
        """The job named "default", or the only job (tools that think of one job per cluster)."""
        return self.state_for("")

    def state_for(self, job_id: str) -> ShardState | None:
        """The state of ``job_id`` ("": the default-named job, or the only one)."""
        with self._cond:
            if job_id:
                return self.states.get(job_id)
            named = [s for s in self.states.values() if s.job.name == DEFAULT_JOB]
            if named or len(self.states) == 1:
                return (named or list(self.states.values()))[0]
            return None

    def gauges(self) -> list[ShardGauges]:
        """Every job's shard this server owns, each copied under its own lock: what a metrics
        scrape reads (``runtime.metrics.ShardCollector``). Blocks while a shard applies an update."""
        out = []
        for state in list(self.states.values()):
            checkpointer = self.checkpointer_for(state)
            with state.cond:  # one consistent copy of each shard
                s = state.stats
                out.append(ShardGauges(
                    shard=self.shard_id, job=state.job.name, version=state.version, epoch=state.views.latest_epoch,
                    pushes={"received": s.pushes_received, "duplicate": s.pushes_duplicate, "dropped": s.pushes_dropped,
                            "skipped": s.pushes_skipped, "rejected": s.pushes_rejected},
                    bytes_in=s.bytes_in, bytes_out=s.bytes_out, shm_bytes_in=s.shm_bytes_in,
                    shm_bytes_out=s.shm_bytes_out, apply_seconds=s.apply_seconds, wait_seconds=s.wait_seconds,
                    rollbacks=s.rollbacks, steps_rolled_back=s.steps_rolled_back,
                    checkpoints=checkpointer.written if checkpointer else 0,
                    checkpoint_failures=checkpointer.failures if checkpointer else 0, staleness=dict(s.staleness)))
        return out

    def checkpointer_for(self, state: ShardState) -> Checkpointer | None:
        return self.checkpointers.get(self._checkpoint_key(state))

    def _checkpoint_key(self, state: ShardState) -> str:
        return state.job_id if state.shard.shard_id == self.shard_id else f"{state.job_id}/{state.shard.shard_id}"

    def find(self, job_id: str, shard_id: int) -> ShardState | None:
        """This server's replica of shard ``shard_id`` of ``job_id``, if it holds one."""
        with self._cond:
            if shard_id == self.shard_id:
                return self.states.get(job_id)
            return self.others.get((job_id, shard_id))

    def replicas_of(self, job_id: str) -> list[ShardState]:
        """Every shard of ``job_id`` this server holds (its own first)."""
        with self._cond:
            own = [self.states[job_id]] if job_id in self.states else []
            return own + [s for (j, _), s in sorted(self.others.items()) if j == job_id]

    def assign(self, assignments, lease_s: float | None, generation: int, since: float | None = None) -> list:
        """The coordinator's replica placement (``SetReplicas``): create the replicas this server
        is to hold (empty until their primary sends a copy), and tell each its role and backups; a
        primary's lease runs ``lease_s`` from ``since`` (None: no renewal). Everything is checked
        before anything changes. Returns [(assignment, state)]."""
        self.check_generation(generation)
        if len(assignments) > MAX_ASSIGNMENTS:
            raise InvalidArgument(f"at most {MAX_ASSIGNMENTS} replica assignments per call")
        ranges = {}
        for a in assignments:
            if len(a.backups) >= MAX_REPLICAS or any(not b or len(b) > 256 for b in a.backups):
                raise InvalidArgument(f"a replica has at most {MAX_REPLICAS - 1} backups, each host:port")
            state = self.find(a.job_id, a.shard_id)
            if state is not None:
                if state.replica is None:
                    raise InvalidArgument(f"job {a.job_id[:64]!r} keeps no replicas of its shards")
                continue
            job_id, job, plan = self._fetch_job(a.job_id)  # network call, outside the lock
            mine = [p for p in plan if p.range.shard_id == a.shard_id]
            if job_id != a.job_id or not mine or job.replicas < 2:
                raise InvalidArgument(f"job {a.job_id[:64]!r} has no replicated shard {a.shard_id}")
            ranges[(a.job_id, a.shard_id)] = (mine[0].range, job)
        out = []
        for a in assignments:
            with self._cond:
                if self.find(a.job_id, a.shard_id) is None:  # (the lock is reentrant)
                    shard, job = ranges[(a.job_id, a.shard_id)]
                    self._install(ShardState(shard, job, a.job_id, self.step_timeout))
            state = self.find(a.job_id, a.shard_id)
            if state.replica.assign(a.placement_epoch, a.primary, list(a.backups), lease_s, since):
                with state.cond:  # a primary made a backup (the shard handed back): its open steps are void
                    replicas.void_open_steps(state)
            out.append((a, state))
        return out

    def state_for_init(self, target: Target) -> ShardState:
        """The shard's state for ``target``'s job, created on first use from the coordinator's
        job and plan; raises WrongJob if ``target`` does not match them."""
        with self._cond:
            state = self.states.get(target.job_id)
        if target.shard_id != self.shard_id:  # a replica of another shard (promoted while the job started)
            state = self.find(target.job_id, target.shard_id) or state
        if state is not None:
            self.check(state, target)
            return state
        self._refuse_lost(target.job_id)
        job_id, job, plan = self._fetch_job(target.job_id)  # network call, outside the lock
        mine = [s for s in plan if s.range.shard_id == self.shard_id]
        if job_id != target.job_id or not mine:
            raise WrongJob(f"job {target.job_id[:64]!r} is not one of the coordinator's jobs")
        with self._cond:
            if target.job_id not in self.states:
                self._install(ShardState(mine[0].range, job, job_id, self.step_timeout))
            state = self.states[target.job_id]
        self.check(state, target)
        return state

    def _install(self, state: ShardState) -> None:
        """Make ``state`` one of this node's jobs (under ``_cond``), checkpointing it if a directory is set."""
        own = state.shard.shard_id == self.shard_id
        if self.checkpoint_dir:
            key = self._checkpoint_key(state)
            checkpointer = self.checkpointers.get(key)
            if checkpointer is None:
                checkpointer = self.checkpointers[key] = Checkpointer(
                    self.store(state.job.name, state.shard.shard_id), self.checkpoint_every)
            state.on_version = checkpointer.on_version
            if state.replica is not None:  # only a shard's primary checkpoints it (not two writers of one file)
                state.on_version = _when_primary(state, checkpointer.on_version)
            elif state.job.first_step:  # an added param group's job (its parent's shard is on this server too)
                parent = next((p for p in self.states.values() if p.job.name == added_group_parent(state.job.name)),
                              None)
                if parent is not None and self.checkpointer_for(parent) is not None:
                    state.on_version = _checkpointing_parent(checkpointer.on_version, parent,
                                                             self.checkpointer_for(parent))
        state.send = self.send
        state.history = self.history
        job = state.job
        self.history.record("job", job=state.job_id, name=job.name, shard=state.shard.shard_id, own=own,
                            mode=job.mode.value, backup_workers=job.backup_workers, replicas=job.replicas,
                            staleness=job.staleness_bound)
        if not own:
            self.others[(state.job_id, state.shard.shard_id)] = state
            self._cond.notify_all()
            return
        self.states[state.job_id] = state
        self.lost.pop(state.job_id, None)
        self._cond.notify_all()

    def _refuse_lost(self, job_id: str) -> None:
        with self._cond:
            why = self.lost.get(job_id)
        if why:
            raise FailedPrecondition(why)

    # ------------------------------------------------------------------ checkpoints

    def store(self, job_name: str = DEFAULT_JOB, shard_id: int | None = None) -> CheckpointStore:
        """Job ``job_name``'s checkpoints of shard ``shard_id`` (default: this server's):
        ``<dir>/shard-<k>/`` for the default job, ``<dir>/job-<name>/shard-<k>/`` for the others."""
        if not self.checkpoint_dir:
            raise FailedPrecondition(f"shard {self.shard_id} keeps no checkpoints; start it with --checkpoint-dir")
        root = Path(self.checkpoint_dir)
        if job_name != DEFAULT_JOB:
            root = root / f"job-{job_name}"
        return CheckpointStore(root / f"shard-{self.shard_id if shard_id is None else shard_id}", self.checkpoint_keep)

    def restore_latest(self, job_id: str, job_name: str, started: bool) -> int | None:
        """At start-up: take the newest checkpoint of ``job_id`` (a job the coordinator runs) as this
        shard's state, waiting for the coordinator to align the others; returns its version. With
        none, a job that had ``started`` is marked lost here, with the reason, so its calls fail at
        once instead of waiting for an upload that will never come."""
        snap = self.store(job_name).latest(self.shard_id) if self.checkpoint_dir else None
        if snap is not None and snap.job_id != job_id:
            log.warning("ignoring checkpoints of job %s: the coordinator runs job %s", snap.job_id, job_id)
            snap = None
        if snap is None:
            if started and self.checkpoint_dir:
                # InitShard acknowledges only once version 0 is on disk: this shard was never
                # initialised, and the initializer's retried upload will do it now.
                log.warning("shard %d has no checkpoint of job %s: it was not initialised here before the "
                            "restart; waiting for the job's upload", self.shard_id, job_name)
            elif started:
                why = (f"shard {self.shard_id} restarted and has no checkpoint of job {job_name!r} (it was started "
                       "without --checkpoint-dir), so the job's parameters on this shard are lost; resume the job "
                       "from a run checkpoint (shardps run --resume) or start servers with --checkpoint-dir so a "
                       "restart can restore them")
                with self._cond:
                    if job_id not in self.states:
                        self.lost[job_id] = why
                log.error("%s", why)
            return None
        state = ShardState.from_snapshot(snap, self.step_timeout)
        state.timeline.hold_until_aligned()
        with self._cond:
            held = self.states.get(job_id)
            if held is not None and held.initialized:  # the coordinator's rollback got here first and restored it
                return None
            if held is not None and held.replica is not None:  # the empty replica the placement made: restore it
                role = held.replica
                state.replica.assign(role.placement_epoch, role.primary, list(role.backups), None)
            self._install(state)
        log.warning("shard %d restored job %s's checkpoint at version %d", self.shard_id, job_name, snap.version)
        return snap.version

    def checkpoints_of(self, job_id: str, shard_id: int, job_name: str = "") -> tuple[list[int], ShardState | None]:
        """The versions of this server's checkpoints of shard ``shard_id`` of ``job_id`` (a replicated job's
        primary checkpoints whichever shard it serves), and its replica of that shard (None if it holds none
        now: then ``job_name`` names the checkpoint directory; without it, no versions). Never calls the
        coordinator: it calls this while holding its lock."""
        if not 0 <= shard_id < 1 << 20:
            raise InvalidArgument(f"shard id {shard_id} is out of range")
        if job_name and not JOB_NAME.fullmatch(job_name):  # (it names a folder on this server's disk)
            raise InvalidArgument(f"job name {job_name[:80]!r} must be 1-64 letters, digits, '.', '_' or '-'")
        state = self.find(job_id, shard_id)
        held = state or next(iter(self.replicas_of(job_id)), None)
        name = held.job.name if held is not None else job_name
        if not self.checkpoint_dir or not name:
            return [], state
        return self.store(name, shard_id).versions(), state

    def rollback(self, job_id: str, version: int, epoch: int, generation: int = 0, shard_id: int | None = None) -> int:
        """Restore the checkpoint of ``version`` of shard ``shard_id`` (default: this server's own) from this
        server's disk; calls must name ``epoch`` or later. Returns the old version. Another shard's replica
        must be here already (placed by the coordinator): FailedPrecondition otherwise, nothing changed."""
        self.check_generation(generation)
        sid = self.shard_id if shard_id is None else shard_id
        own = sid == self.shard_id
        if own:
            with self._cond:
                state = self.states.get(job_id)
        else:
            state = self.find(job_id, sid)
            if state is None:
                raise FailedPrecondition(f"server {self.shard_id} holds no replica of shard {sid} of job "
                                         f"{job_id[:64]!r} to roll back; place it here first (SetReplicas)")
        latest = state.views.latest_epoch if state is not None else 0
        if version < 0 or not 1 <= epoch <= latest + MAX_EPOCH_JUMP:
            raise InvalidArgument(f"rollback version ({version}) must be >= 0 and epoch ({epoch}) in 1..{latest} + "
                                  f"{MAX_EPOCH_JUMP}")
        if state is None:
            _, job, _ = self._fetch_job(job_id)
            name = job.name if job is not None else DEFAULT_JOB
        else:
            name = state.job.name
        snap = self.store(name, sid).load(version, sid)
        if snap.job_id != job_id:
            raise WrongJob(f"server {self.shard_id}'s checkpoint of shard {sid} at version {version} belongs to job "
                           f"{snap.job_id!r}")
        if own:
            with self._cond:
                if job_id not in self.states:  # not restored yet (still starting): take the checkpoint as its state
                    self._install(ShardState.from_snapshot(snap, self.step_timeout))
                state = self.states[job_id]
        assert state is not None
        return state.restore(snap, epoch)

    def check_generation(self, generation: int) -> None:
        """Refuse a coordinator older than the newest one seen (see ``coordinator.journal``)."""
        with self._cond:
            if generation < self.coordinator_generation:
                raise FailedPrecondition(f"a coordinator of generation {generation} was replaced by generation "
                                         f"{self.coordinator_generation}; this shard takes no orders from it")
            self.coordinator_generation = generation

    def require(self, target: Target, timeout: float) -> ShardState:
        """The state for ``target``, waiting up to ``timeout`` s for the job's upload to arrive
        (a job the coordinator does not know is refused at once)."""
        self._refuse_lost(target.job_id)
        with self._cond:
            known = target.job_id in self.states
        if not known and self._fetch_job(target.job_id)[0] != target.job_id:
            raise WrongJob(f"job {target.job_id[:64]!r} is not one of the coordinator's jobs")
        with self._cond:
            if not self._cond.wait_for(lambda: target.job_id in self.states or target.job_id in self.lost,
                                       timeout=timeout):
                raise FailedPrecondition(
                    f"shard {self.shard_id} has not received job {target.job_id[:64]!r}'s starting parameters "
                    f"after {timeout:.0f}s (its first worker uploads them when it registers)"
                )
        self._refuse_lost(target.job_id)
        state = self.states[target.job_id]
        if target.shard_id != self.shard_id:  # a replica of another shard (a promoted backup)
            state = self.find(target.job_id, target.shard_id) or state
        self.check(state, target)
        with state.cond:
            state.check_serving()  # a backup replica waiting for its copy answers at once: not here
        state.wait_initialized(timeout)
        return state

    def check(self, state: ShardState, target: Target) -> None:
        """Refuse calls meant for another job, model or range (state unchanged)."""
        problem = None
        if target.job_id != state.job_id:
            problem = f"job {target.job_id[:64]!r} is not this shard's job {state.job_id!r}"
        elif target.fingerprint != state.job.layout.fingerprint:
            problem = (
                f"layout fingerprint {target.fingerprint[:12]} differs from the job's "
                f"{state.job.layout.fingerprint[:12]}: every worker must build the same model"
            )
        elif (target.shard_id, target.start, target.stop) != (state.shard.shard_id, state.shard.start,
                                                                state.shard.stop):
            problem = (
                f"shard {target.shard_id} [{target.start}, {target.stop}) is not this server's "
                f"shard {state.shard.shard_id} [{state.shard.start}, {state.shard.stop}); refresh the shard plan"
            )
        if problem:
            state.reject(WrongJob.reason)
            raise WrongJob(problem)


def _checkpointing_parent(on_version, parent: ShardState, parent_checkpointer: Checkpointer):
    """An added param group's checkpoint hook: at the group's first version (its parent's step when it was
    added) the parent checkpoints that step too, so that the two jobs have a checkpoint in common from the
    group's first step on and a rollback of both never goes below it (docs/architecture/torch-semantics.md).
    Runs under the group's lock and takes the parent's (nothing takes them the other way round)."""
    def hook(s: ShardState) -> None:
        on_version(s)
        if s.version == s.job.first_step and not parent_checkpointer.at(parent, s.version):
            log.warning("job %s moved past step %d before its added param group %s started there: the two have "
                        "no checkpoint in common until both checkpoint again", parent.job.name, s.version, s.job.name)
    return hook


def _when_primary(state: ShardState, on_version):
    """A backup's checkpoint hook: it writes only while its replica is the shard's primary."""
    def hook(s: ShardState) -> None:
        if state.replica is not None and state.replica.primary:
            on_version(s)
    return hook
