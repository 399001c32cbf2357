"""Update policies: when a shard applies pushes, and with what gradient.

A policy is chosen once per job and handed to ``ShardState``; the state never asks
which mode it is in (as in Ray's parameter-server example, sync vs async is a
policy over one unchanged server). Both policies run under the state's lock and
see the same ``Push``; they differ only in when ``state.apply`` is called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..proto.errors import FailedPrecondition, FutureStep, StaleStep, UnknownWorker, WaitTimeout
from ..proto.messages import UpdateMode


@dataclass
class Push:
    """One push. ``grad`` is an fp32 tensor of the shard's size (usually a pooled receive
    buffer); ``ShardState.push`` calls ``release`` exactly once, when nothing needs it any more."""

    worker_id: int
    step: int  # the worker's step number (updates it has taken), 0-based
    epoch: int  # membership epoch the worker believes current
    base_version: int  # shard version the gradient was computed on
    batch_size: int  # samples behind the gradient (> 0)
    lr: float  # learning rate to apply (> 0)
    grad: torch.Tensor
    release: Callable[[], None] | None = None  # give the grad's buffer back
    kept: bool = False  # set by a policy that holds on to grad past submit()


@dataclass(frozen=True)
class Outcome:
    version: int  # shard version the reply's parameters have
    staleness: int  # version at apply time minus base_version (0 in sync)
    duplicate: bool  # seen before; not applied again
    next_step: int  # the step number the worker's next push carries
    applied_lr: float = 0.0  # lr this push was applied with (0: not applied by it)
    dropped: bool = False  # arrived after its step closed (backup workers); never applied


class SyncPolicy:
    """Bulk-synchronous: step t is applied once, with the sample-weighted mean of the
    gradients of every member of step t's view.

    ``submit`` blocks (releasing the lock) until step t has closed, i.e. until every
    member pushed step t, or raises ``WaitTimeout`` after ``timeout`` seconds. The
    shard version equals the number of closed steps, so the open step is ``version``.
    Each member's received gradient buffer is kept until the step closes and then
    summed in worker-id order, so no separate accumulator exists (one fp32 slice of
    memory less) and the sum's order does not depend on arrival order.

    With ``backup`` = b > 0 a step closes after the first (members - b) pushes; a
    push for a step that closed without it is *dropped*: counted, never applied,
    and answered with the current slice, so the late worker carries on from there.
    """

    mode = UpdateMode.SYNC

    def __init__(self, timeout: float, backup: int = 0):
        self.timeout, self.backup = timeout, backup
        self._pushes: dict[int, Push] = {}  # worker_id -> its push of the open step
        self._epoch: int | None = None  # the view this step's pushes named

    def check(self, state, push: Push, members: frozenset[int]) -> bool:
        """Validate without changing anything; True when the push is a duplicate."""
        open_step = state.version
        if push.step > open_step:
            raise FutureStep(
                f"push for step {push.step} from the future: this shard's open step is {open_step}"
            )
        if state.last_step.get(push.worker_id) == push.step:
            return True  # retried push: answered, never applied twice
        if push.worker_id not in members:
            raise UnknownWorker(
                f"worker {push.worker_id} is not a member of epoch {push.epoch}; register with the coordinator"
            )
        if push.step < open_step:
            if self.backup:
                return False  # late: submit() drops it
            raise StaleStep(f"step {push.step} closed already (open step {open_step}); pull and continue")
        if self._pushes and push.epoch != self._epoch:
            raise FailedPrecondition(
                f"step {open_step} is collecting pushes of epoch {self._epoch}, this one names epoch {push.epoch}"
            )
        return False

    def submit(self, state, push: Push, members: frozenset[int], duplicate: bool) -> Outcome:
        if not duplicate and push.step < state.version:  # late for a step that closed without it
            state.last_step[push.worker_id] = push.step
            state.stats.pushes_dropped += 1
            return Outcome(state.version, 0, False, next_step=state.version, dropped=True)
        applied_lr = 0.0
        if not duplicate:
            push.kept = True
            self._pushes[push.worker_id] = push
            self._epoch = push.epoch
            state.last_step[push.worker_id] = push.step
            applied_lr = push.lr
            if len(self._pushes) >= len(members) - self.backup:
                self._close(state, push.lr)
        if not state.cond.wait_for(lambda: state.version > push.step, timeout=self.timeout):
            missing = sorted(members - self._pushes.keys())
            raise WaitTimeout(
                f"step {push.step} did not close within {self.timeout:.0f}s; still waiting for workers {missing}"
            )
        return Outcome(state.version, 0, duplicate, next_step=state.version, applied_lr=applied_lr)

    def _close(self, state, lr: float) -> None:
        pushes = [self._pushes[w] for w in sorted(self._pushes)]
        if len(pushes) == 1:
            mean = pushes[0].grad
        else:  # sum_i b_i g_i / sum_i b_i, in the first buffer
            mean = pushes[0].grad.mul_(pushes[0].batch_size)
            for p in pushes[1:]:
                mean.add_(p.grad, alpha=p.batch_size)
            mean.div_(sum(p.batch_size for p in pushes))
        state.apply(mean, lr)
        for p in pushes:
            if p.release is not None:
                p.release()
        self._pushes.clear()
        self._epoch = None
        state.cond.notify_all()


class AsyncPolicy:
    """Asynchronous: every push is applied on arrival with its own gradient and answered
    with the fresh slice. Staleness = version at apply time - the push's base_version.

    With ``staleness_lr`` the push is applied with lr / max(1, staleness), after
    Zhang et al. 2016 ("Staleness-aware Async-SGD"): stale gradients move less.
    """

    mode = UpdateMode.ASYNC

    def __init__(self, staleness_lr: bool = False):
        self.staleness_lr = staleness_lr

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
        next_step = state.last_step.get(push.worker_id, -1) + 1
        if duplicate:
            return Outcome(state.version, 0, True, next_step=next_step)
        staleness = state.version - push.base_version
        lr = push.lr / max(1, staleness) if self.staleness_lr else push.lr
        state.apply(push.grad, lr)
        state.last_step[push.worker_id] = push.step
        state.stats.staleness[staleness] += 1
        return Outcome(state.version, staleness, False, next_step=push.step + 1, applied_lr=lr)


def make_policy(job, step_timeout: float):
    """The policy object for the job's mode: the one place a mode is looked at."""
    if job.mode is UpdateMode.SYNC:
        return SyncPolicy(step_timeout, job.backup_workers)
    return AsyncPolicy(job.staleness_lr)
