"""ShardNode: what one shard-server process holds, before and after its job starts.

A server starts empty, registers with the coordinator and learns its shard id. When
the initializer worker uploads the starting parameters, the node asks the
coordinator for the job (the authority on spec and plan), checks that the upload
matches both, and creates its ``ShardState``. Calls that arrive before that wait,
with a timeout. No gRPC here: the coordinator lookups are functions passed in.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..proto.errors import FailedPrecondition, WrongJob
from ..proto.messages import JobConfig, ShardInfo, View
from .checkpoint import Checkpointer, CheckpointStore
from .state import ShardState

log = logging.getLogger("shardps.server")

FetchJob = Callable[[], tuple[str, JobConfig, list[ShardInfo]]]  # -> (job_id, job, plan)
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
    def __init__(self, shard_id: int, fetch_job: FetchJob, fetch_view: FetchView, step_timeout: float = 300.0,
                 checkpoint_dir: str = "", checkpoint_every: int = 0, checkpoint_keep: int = 3):
        self.shard_id = shard_id
        self.step_timeout = step_timeout
        self.checkpoint_dir, self.checkpoint_every, self.checkpoint_keep = checkpoint_dir, checkpoint_every, checkpoint_keep
        self.checkpointer: Checkpointer | None = None
        self.membership = MembershipCache(fetch_view)
        self.buffers = BufferPool()
        self._fetch_job = fetch_job
        self._state: ShardState | None = None
        self._cond = threading.Condition()

    @property
    def state(self) -> ShardState | None:
        return self._state

    def state_for_init(self, target: Target) -> ShardState:
        """The shard's state for ``target``'s job, created on first use from the coordinator's
        job and plan; raises WrongJob if ``target`` does not match them."""
        with self._cond:
            if self._state is not None:
                self.check(target)
                return self._state
        job_id, job, plan = self._fetch_job()  # network call, outside the lock
        mine = [s for s in plan if s.range.shard_id == self.shard_id]
        if job_id != target.job_id or not mine:
            raise WrongJob(f"job {target.job_id!r} is not the coordinator's current job {job_id!r}")
        with self._cond:
            if self._state is None:
                self._install(ShardState(mine[0].range, job, job_id, self.step_timeout))
            self.check(target)
            return self._state

    def _install(self, state: ShardState) -> None:
        """Make ``state`` this node's (under ``_cond``), checkpointing it if a directory is set."""
        if self.checkpoint_dir:
            if self.checkpointer is None:
                self.checkpointer = Checkpointer(self.store(), self.checkpoint_every)
            state.on_version = self.checkpointer.on_version
        self._state = state
        self._cond.notify_all()

    # ------------------------------------------------------------------ checkpoints

    def store(self) -> CheckpointStore:
        if not self.checkpoint_dir:
            raise FailedPrecondition(f"shard {self.shard_id} keeps no checkpoints; start it with --checkpoint-dir")
        return CheckpointStore(Path(self.checkpoint_dir) / f"shard-{self.shard_id}", self.checkpoint_keep)

    def restore_latest(self, job_id: str) -> int | None:
        """At start-up: take the newest checkpoint of ``job_id`` (the coordinator's job) as this
        shard's state, waiting for the coordinator to align the others. Returns its version."""
        if not self.checkpoint_dir or not job_id:
            return None
        snap = self.store().latest(self.shard_id)
        if snap is None:
            return None
        if snap.job_id != job_id:
            log.warning("ignoring checkpoints of job %s: the coordinator runs job %s", snap.job_id, job_id)
            return None
        state = ShardState.from_snapshot(snap, self.step_timeout)
        state.awaiting_rollback = True
        with self._cond:
            if self._state is not None:  # the coordinator's rollback got here first and restored it
                return None
            self._install(state)
        log.warning("shard %d restored its checkpoint at version %d", self.shard_id, snap.version)
        return snap.version

    def rollback(self, job_id: str, version: int, epoch: int) -> int:
        """Restore the checkpoint of ``version``; calls must name ``epoch`` or later. Returns the old version."""
        snap = self.store().load(version, self.shard_id)
        if snap.job_id != job_id:
            raise WrongJob(f"shard {self.shard_id}'s checkpoint of version {version} belongs to job {snap.job_id!r}")
        with self._cond:
            if self._state is None:  # not restored yet (still starting): take the checkpoint as its state
                self._install(ShardState.from_snapshot(snap, self.step_timeout))
            state = self._state
        if state.job_id != job_id:
            raise WrongJob(f"shard {self.shard_id} holds job {state.job_id!r}, not {job_id!r}")
        return state.restore(snap, epoch)

    def require(self, target: Target, timeout: float) -> ShardState:
        """The state for ``target``, waiting up to ``timeout`` s for initialisation."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._state is not None, timeout=timeout):
                raise FailedPrecondition(
                    f"shard {self.shard_id} has no job yet after {timeout:.0f}s "
                    "(the initializer worker uploads the starting parameters)"
                )
        self.check(target)
        self._state.wait_initialized(timeout)
        return self._state

    def check(self, target: Target) -> None:
        """Refuse calls meant for another job, model or range (state unchanged)."""
        state = self._state
        problem = None
        if target.job_id != state.job_id:
            problem = f"job {target.job_id!r} is not this shard's job {state.job_id!r}"
        elif target.fingerprint != state.job.layout.fingerprint:
            problem = (
                f"layout fingerprint {target.fingerprint[:12]} differs from the job's "
                f"{state.job.layout.fingerprint[:12]}: every worker must build the same model"
            )
        elif (target.shard_id, target.start, target.stop) != (self.shard_id, state.shard.start, state.shard.stop):
            problem = (
                f"shard {target.shard_id} [{target.start}, {target.stop}) is not this server's "
                f"shard {self.shard_id} [{state.shard.start}, {state.shard.stop}); refresh the shard plan"
            )
        if problem:
            state.reject(WrongJob.reason)
            raise WrongJob(problem)
