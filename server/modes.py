"""Update policies: when a shard applies pushes, and with what gradient.

A policy is chosen once per job and handed to ``ShardState``; the state never asks
which mode it is in (as in Ray's parameter-server example, sync vs async is a
policy over one unchanged server). Both policies run under the state's lock and
see the same ``Push``; they differ only in when ``state.apply`` is called.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..proto.errors import FailedPrecondition, FutureStep, StaleStep, UnknownWorker, WaitTimeout
from ..proto.messages import UpdateMode


@dataclass
class Push:
    """One validated push. ``grad`` is an fp32 tensor of the shard's size, owned by the caller."""

    worker_id: int
    step: int  # the worker's step number (updates it has taken), 0-based
    epoch: int  # membership epoch the worker believes current
    base_version: int  # shard version the gradient was computed on
    batch_size: int  # samples behind the gradient (> 0)
    lr: float  # learning rate to apply (> 0)
    grad: torch.Tensor


@dataclass(frozen=True)
class Outcome:
    version: int  # shard version the reply's parameters have
    staleness: int  # version at apply time minus base_version (0 in sync)
    duplicate: bool  # seen before; not applied again


class SyncPolicy:
    """Bulk-synchronous: step t is applied once, with the sample-weighted mean of the
    gradients of every member of step t's view.

    ``submit`` blocks (releasing the lock) until step t has closed, i.e. until every
    member pushed step t, or raises ``WaitTimeout`` after ``timeout`` seconds. The
    shard version equals the number of closed steps, so the open step is ``version``.
    """

    mode = UpdateMode.SYNC

    def __init__(self, numel: int, timeout: float):
        self.timeout = timeout
        self._acc = torch.zeros(numel, dtype=torch.float32)  # sum of batch_size * grad
        self._weight = 0  # sum of batch_size
        self._pushed: set[int] = set()
        self._epoch: int | None = None  # the view this step's pushes named
        self._lr = 0.0

    def check(self, state, push: Push, members: frozenset[int]) -> bool:
        """Validate without changing anything; True when the push is a duplicate."""
        open_step = state.version
        if push.step > open_step:
            raise FutureStep(
                f"push for step {push.step} from the future: this shard's open step is {open_step}"
            )
        if state.last_step.get(push.worker_id) == push.step:
            return True  # retried push: answered, never applied twice
        if push.step < open_step:
            raise StaleStep(f"step {push.step} closed already (open step {open_step}); pull and continue")
        if push.worker_id not in members:
            raise UnknownWorker(
                f"worker {push.worker_id} is not a member of epoch {push.epoch}; register with the coordinator"
            )
        if self._epoch is not None and push.epoch != self._epoch:
            raise FailedPrecondition(
                f"step {open_step} is collecting pushes of epoch {self._epoch}, this one names epoch {push.epoch}"
            )
        return False

    def submit(self, state, push: Push, members: frozenset[int], duplicate: bool) -> Outcome:
        if not duplicate:
            self._acc.add_(push.grad, alpha=push.batch_size)
            self._weight += push.batch_size
            self._pushed.add(push.worker_id)
            self._epoch, self._lr = push.epoch, push.lr
            state.last_step[push.worker_id] = push.step
            if self._pushed >= members:
                self._close(state)
        if not state.cond.wait_for(lambda: state.version > push.step, timeout=self.timeout):
            missing = sorted(members - self._pushed)
            raise WaitTimeout(
                f"step {push.step} did not close within {self.timeout:.0f}s; still waiting for workers {missing}"
            )
        return Outcome(state.version, 0, duplicate)

    def _close(self, state) -> None:
        state.apply(self._acc.div_(self._weight), self._lr)
        self._acc.zero_()
        self._weight, self._epoch = 0, None
        self._pushed.clear()
        state.cond.notify_all()


class AsyncPolicy:
    """Asynchronous: every push is applied on arrival with its own gradient and answered
    with the fresh slice. Staleness = version at apply time - the push's base_version."""

    mode = UpdateMode.ASYNC

    def check(self, state, push: Push, members: frozenset[int]) -> bool:
        last = state.last_step.get(push.worker_id, -1)
        if push.step <= last:
            return True  # retried push: answered with the current slice, never applied twice
        if push.worker_id not in members:
            raise UnknownWorker(
                f"worker {push.worker_id} is not a member of epoch {push.epoch}; register with the coordinator"
            )
        if push.step != last + 1:
            raise FutureStep(
                f"push for step {push.step} from the future: worker {push.worker_id}'s next step is {last + 1}"
            )
        if push.base_version > state.version:
            raise FailedPrecondition(
                f"base_version {push.base_version} is ahead of this shard's version {state.version}"
            )
        return False

    def submit(self, state, push: Push, members: frozenset[int], duplicate: bool) -> Outcome:
        if duplicate:
            return Outcome(state.version, 0, True)
        staleness = state.version - push.base_version
        state.apply(push.grad, push.lr)
        state.last_step[push.worker_id] = push.step
        state.stats.staleness[staleness] += 1
        return Outcome(state.version, staleness, False)


def make_policy(mode: UpdateMode, numel: int, step_timeout: float):
    """The policy object for ``mode``: the one place a mode is looked at."""
    if mode is UpdateMode.SYNC:
        return SyncPolicy(numel, step_timeout)
    return AsyncPolicy()
