"""Update policies: when a shard applies pushes, and with what gradient.

A policy is chosen once per job and handed to ``ShardState``; the state never asks
which mode it is in (as in Ray's parameter-server example, sync vs async is a
policy over one unchanged server). Both policies run under the state's lock and
see the same ``Push``; they differ only in when ``state.apply`` is called.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..proto.errors import FailedPrecondition, FutureStep, RolledBack, StaleStep, UnknownWorker, WaitTimeout
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
    evicted: bool = False  # its worker left the step's membership while the push waited


@dataclass(frozen=True)
class Outcome:
    version: int  # shard version the reply's parameters have
    staleness: int  # version at apply time minus base_version (0 in sync)
    duplicate: bool  # seen before; not applied again
    next_step: int  # the step number the worker's next push carries
    applied_lr: float = 0.0  # lr this push was applied with (0: not applied by it)
    dropped: bool = False  # arrived after its step closed (backup workers); never applied


CLOSED_LR_KEPT = 1024  # closed steps whose lr SyncPolicy remembers (a late SSP reply looks it up)


@dataclass
class _OpenStep:
    """A step that has pushes but has not closed yet."""

    members: frozenset[int]  # who makes up the step (the view governing it; changes with the membership)
    pushes: dict[int, Push]  # worker_id -> its push


class SyncPolicy:
    """Synchronous steps, optionally with bounded staleness (SSP) and backup workers.

    Step t is applied once, with the sample-weighted mean of the gradients of the
    members of step t's view; the shard version is the number of closed steps, and
    steps close in order. Each push's received buffer is kept until its step closes
    and the buffers are then summed in worker-id order (no separate accumulator; the
    result does not depend on arrival order).

    ``submit`` blocks (releasing the lock) until step ``t - staleness`` has closed,
    then answers with the current slice, or raises ``WaitTimeout`` after ``timeout``
    seconds. With ``staleness`` = 0 that is bulk-synchronous training: the answer to
    step t includes step t. With k > 0 a worker may compute up to k steps ahead on
    parameters that miss at most k closed steps (stale-synchronous parallel); its
    pushes still join their own step's mean, so k = 0 *is* sync, and up to (k + 1)
    steps of receive buffers are held.

    With ``backup`` = b > 0 a step closes after the first (members - b) pushes; a
    push for a step that closed without it is *dropped*: counted, never applied,
    and answered with the current slice, so the late worker carries on from there.

    With ``staleness_lr`` (SSP's version of Zhang et al. 2016) a step is applied with
    lr / max(1, s), s the sample-weighted mean staleness (step - base_version) of the
    pushes it averages: one optimizer step per closed step, so one lr per step.
    """

    def __init__(self, timeout: float, backup: int = 0, staleness: int = 0, staleness_lr: bool = False):
        self.timeout, self.backup, self.staleness, self.staleness_lr = timeout, backup, staleness, staleness_lr
        self._open: dict[int, _OpenStep] = {}  # step -> its pushes so far
        self.closed_lr: dict[int, float] = {}  # step -> lr it was applied with (the last CLOSED_LR_KEPT steps)

    def reconsider(self, state) -> None:
        """The membership changed: every open step is made up of its new members; pushes of
        workers that are no longer among them are let go (never applied)."""
        for step, open_ in self._open.items():
            members = state.members_for(step)
            if not members:
                continue
            for w in [w for w in open_.pushes if w not in members]:
                gone = open_.pushes.pop(w)
                gone.evicted = True
                if gone.release is not None:
                    gone.release()
            open_.members = members
        self._close_ready(state)

    def reset(self) -> None:
        """Forget open steps (a rollback): their buffers go back to the pool."""
        for open_ in self._open.values():
            for p in open_.pushes.values():
                if p.release is not None:
                    p.release()
        self._open.clear()
        self.closed_lr.clear()

    def check(self, state, push: Push, members: frozenset[int]) -> bool:
        """Validate without changing anything; True when the push is a duplicate."""
        open_step, last = state.version, state.last_step.get(push.worker_id, -1)
        if push.step > open_step + self.staleness:
            raise FutureStep(
                f"push for step {push.step} from the future: this shard's open step is {open_step}"
                + (f" and the staleness bound {self.staleness}" if self.staleness else "")
            )
        if push.step <= last:
            return True  # retried push: answered, never applied twice
        if push.worker_id not in members:
            raise UnknownWorker(
                f"worker {push.worker_id} is not a member of the view governing step {push.step} "
                f"(members {sorted(members)}; the push names epoch {push.epoch}); register with the coordinator"
            )
        if push.step < open_step:
            if self.backup:
                return False  # late: submit() drops it
            raise StaleStep(f"step {push.step} closed already (open step {open_step}); pull and continue")
        return False

    def submit(self, state, push: Push, members: frozenset[int], duplicate: bool) -> Outcome:
        w = push.worker_id
        if not duplicate and push.step < state.version:  # late for a step that closed without it
            state.last_step[w] = push.step
            state.stats.pushes_dropped += 1
            return Outcome(state.version, 0, False, next_step=state.version, dropped=True)
        if not duplicate:
            push.kept = True
            self._open.setdefault(push.step, _OpenStep(members, {})).pushes[w] = push
            state.last_step[w] = push.step
            state.stats.staleness[push.step - push.base_version] += 1
            self._close_ready(state)
        start, generation = time.monotonic(), state.generation
        released = state.cond.wait_for(lambda: state.version > push.step - self.staleness
                                       or state.generation != generation, timeout=self.timeout)
        state.stats.wait_seconds += time.monotonic() - start
        if state.generation != generation:  # rolled back while this push waited: it is void
            raise RolledBack.at(state.rolled_back_to, state.min_epoch, f" while step {push.step} was open")
        if push.evicted:
            raise UnknownWorker(f"worker {w} was removed from the membership (its lease ran out) while its push "
                                f"for step {push.step} waited; register again to rejoin")
        if not released:
            waiting_for = self._open.get(state.version, _OpenStep(members, {}))
            missing = sorted(waiting_for.members - waiting_for.pushes.keys())
            raise WaitTimeout(
                f"step {state.version} did not close within {self.timeout:.0f}s; still waiting for workers {missing}"
            )
        next_step = max(state.last_step[w] + 1, state.version)
        # SSP answers before the step closes; its lr is then not known yet (0).
        applied_lr = 0.0 if duplicate else self.closed_lr.get(push.step, 0.0)
        return Outcome(state.version, push.step - push.base_version if not duplicate else 0, duplicate,
                       next_step=next_step, applied_lr=applied_lr)

    def _close_ready(self, state) -> None:
        """Close the open step, and the ones after it, while they have enough pushes."""
        while True:
            open_ = self._open.get(state.version)
            if open_ is None or len(open_.pushes) < len(open_.members) - self.backup:
                return
            self._close(state, self._open.pop(state.version))

    def _close(self, state, step: _OpenStep) -> None:
        pushes = [step.pushes[w] for w in sorted(step.pushes)]
        if len(pushes) == 1:
            mean = pushes[0].grad
        else:  # sum_i b_i g_i / sum_i b_i, in the first buffer
            mean = pushes[0].grad.mul_(pushes[0].batch_size)
            for p in pushes[1:]:
                mean.add_(p.grad, alpha=p.batch_size)
            mean.div_(sum(p.batch_size for p in pushes))
        lr = pushes[-1].lr
        if self.staleness_lr:
            samples = sum(p.batch_size for p in pushes)
            lr /= max(1.0, sum(p.batch_size * (p.step - p.base_version) for p in pushes) / samples)
        self.closed_lr[state.version] = lr
        self.closed_lr.pop(state.version - CLOSED_LR_KEPT, None)
        state.apply(mean, lr)
        for p in pushes:
            if p.release is not None:
                p.release()
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

    def reset(self) -> None:
        pass  # nothing is held between pushes

    def reconsider(self, state) -> None:
        pass  # nothing waits

    def check(self, state, push: Push, members: frozenset[int]) -> bool:
        last = state.last_step.get(push.worker_id, -1)
        if push.step <= last:
            return True  # retried push: answered with the current slice, never applied twice
        if push.worker_id not in members:
            raise UnknownWorker(
                f"worker {push.worker_id} is not a member of the view governing step {push.step} "
                f"(members {sorted(members)}; the push names epoch {push.epoch}); register with the coordinator"
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
    if job.mode is UpdateMode.ASYNC:
        return AsyncPolicy(job.staleness_lr)
    return SyncPolicy(step_timeout, job.backup_workers, job.staleness_bound, job.staleness_lr)
