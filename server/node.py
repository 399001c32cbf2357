"""ShardNode: what one shard-server process holds, before and after its job starts.

A server starts empty, registers with the coordinator and learns its shard id. When
the initializer worker uploads the starting parameters, the node asks the
coordinator for the job (the authority on spec and plan), checks that the upload
matches both, and creates its ``ShardState``. Calls that arrive before that wait,
with a timeout. No gRPC here: the coordinator lookups are functions passed in.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from ..proto.errors import FailedPrecondition, WrongJob
from ..proto.messages import JobConfig, ShardInfo, View
from .state import ShardState

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

    def members(self, job_id: str, epoch: int) -> frozenset[int]:
        key = (job_id, epoch)
        with self._lock:
            view = self._views.get(key)
        if view is None:
            view = self._fetch(job_id, epoch)  # outside the lock: a network call
            if view.epoch != epoch:
                raise FailedPrecondition(f"membership epoch {epoch} does not exist (latest is {view.epoch})")
            with self._lock:
                self._views[key] = view
        return view.worker_ids


class ShardNode:
    def __init__(self, shard_id: int, fetch_job: FetchJob, fetch_view: FetchView, step_timeout: float = 300.0):
        self.shard_id = shard_id
        self.step_timeout = step_timeout
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
                self._state = ShardState(mine[0].range, job, job_id, self.step_timeout)
                self._cond.notify_all()
            self.check(target)
            return self._state

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
