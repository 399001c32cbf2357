"""Update policies: when a shard applies pushes, and with what gradient.

A policy is chosen once per job (``make_policy``) and handed to ``ShardState``; the state never asks
which mode it is in (as in Ray's parameter-server example, sync vs async is a
policy over one unchanged server). Both policies run under the state's lock and
see the same ``Push``; they differ only in when ``state.apply`` is called.

Every policy honours a push's ``StepOpts`` the same way: pieces without a gradient
on every push of a step are skipped; a step with an fp16 overflow on any of its
pushes is skipped whole (``state.skip``); a clipped step is applied only once a
worker has sent the total norm over all shards (``finish_clip``): the push first
gets an ``Outcome`` carrying ``clip_partial``, its shard's share of that norm.

A policy sees the shard only as a ``StepHost`` and is one ``UpdatePolicy`` (both in
``server/steps.py``): it reads the version, membership and dedup table and calls the
host to take a push, apply or skip a step and wait; it writes no field of the state,
and this module does not import ``state.py``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..proto.errors import FailedPrecondition, FutureStep, InvalidArgument, StaleStep, UnknownWorker, WaitTimeout
from ..proto.messages import JobConfig, StepOpts, UpdateMode
from ..proto.plan import part_bounds
from .steps import Closed, Outcome, Push, StepHost, UpdatePolicy

__all__ = ["AsyncPolicy", "Closed", "Outcome", "Push", "SyncPolicy", "UpdatePolicy", "make_policy"]


@dataclass
class _Pending:
    """A clipped step whose gradient is aggregated, waiting for the total norm."""

    grad: torch.Tensor
    present: list[bool] | None
    hyper: list | None
    lr_scale: float
    options: StepOpts
    partial: float
    buffers: bytes | None = None
    release: Callable[[], None] | None = None  # gives the mean's buffer back once applied
    pushed: dict[int, int] | None = None  # worker -> step of the pushes it is made of (the run's history)


CLOSED_KEPT = 1024  # closed steps a policy remembers (a late SSP reply or retry looks them up)


def _merge_present(pushes: list[Push]) -> list[bool] | None:
    """Pieces with a gradient on at least one push (None: all of them)."""
    merged: list[bool] | None = None
    for p in pushes:
        if p.present is None:
            return None
        merged = list(p.present) if merged is None else [a or b for a, b in zip(merged, p.present)]
    return merged


def _let_go(pushes) -> None:
    """Give every push's receive buffer back (those a policy kept hold none any more)."""
    for p in pushes:
        if p.release is not None:
            p.release()


def _pushed(pushes) -> dict[int, int]:
    return {p.worker_id: p.step for p in pushes}


def _scale_of(push: Push) -> float:
    """The factor that undoes the push's loss scale (1 when it has none)."""
    scale = push.options.grad_scale
    return 1.0 / scale if scale and scale != 1.0 else 1.0


def _unscale(push: Push) -> torch.Tensor:
    """The push's gradient divided by its loss scale (in place: the buffer is the shard's own)."""
    factor = _scale_of(push)
    if factor != 1.0:
        push.gradient.mul_(factor)
    return push.gradient


def clip_coefficient(max_norm: float, total_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor, computed as it does (fp32, clamped to 1)."""
    total = torch.tensor(total_norm, dtype=torch.float32)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def check_total(total_norm: float) -> None:
    """A clip total is a norm: >= 0, or +inf when the partial norms overflowed, which clips the
    gradient to zero as ``torch.nn.utils.clip_grad_norm_`` does (refusing it would leave a step that
    every worker's total is refused for, and so never closes)."""
    if not total_norm >= 0:  # NaN fails too
        raise InvalidArgument(f"clip total_norm must be a number >= 0 (or inf), got {total_norm}")


@dataclass
class _OpenStep:
    """A step that has pushes but has not closed yet."""

    members: frozenset[int]  # who makes up the step (the view governing it; changes with the membership)
    pushes: dict[int, Push]  # worker_id -> its push
    applied: int = 0  # parts of it applied already (pushes in parts; the slice is between versions meanwhile)

    def stops(self) -> list[int] | None:
        """The parts' end offsets of its pushes in parts (None: every push came whole)."""
        return next((p.stops for p in self.pushes.values() if p.stops is not None), None)


def _mean_into(pushes: list[Push], lo: int, hi: int | None) -> None:
    """sum_i (b_i / B) g_i / s_i (s_i: loss scale) over elements [lo, hi), into the first push's buffer.
    A weighted mean of finite values never overflows; b_i g_i summed could."""
    total = sum(p.batch_size for p in pushes)
    weight = pushes[0].batch_size / total * _scale_of(pushes[0])
    mean = pushes[0].gradient[lo:hi]
    if weight != 1.0:
        mean.mul_(weight)
    for p in pushes[1:]:
        mean.add_(p.gradient[lo:hi], alpha=p.batch_size / total * _scale_of(p))


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
    steps of receive buffers are held. A clipped push waits for its own step (the
    norm is the step's), so clipping gives up SSP's slack.

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
        self._pending: dict[int, _Pending] = {}  # step -> clipped step waiting for its total norm
        self.closed: dict[int, Closed] = {}  # step -> what it did (the last CLOSED_KEPT steps)

    def reconsider(self, state: StepHost) -> None:
        """The membership changed: every open step is made up of its new members; pushes of
        workers that are no longer among them are let go (never applied)."""
        for step, open_ in self._open.items():
            members = state.members_for(step)
            if not members:
                continue
            for w in [w for w in open_.pushes if w not in members]:
                gone = open_.pushes.pop(w)
                gone.evicted = True
                if open_.applied:  # its parts so far are in the applied parts of the step: it is torn
                    state.torn(step, w, open_.applied)
                if gone.release is not None:
                    gone.release()
            open_.members = members
        self._close_ready(state)

    def reset(self) -> None:
        """Forget open and pending steps (a rollback): their buffers go back to the pool."""
        for open_ in self._open.values():
            _let_go(open_.pushes.values())
        for pending in self._pending.values():
            if pending.release is not None:
                pending.release()
        self._open.clear()
        self._pending.clear()
        self.closed.clear()

    def waiting_pushes(self) -> int:
        return sum(len(o.pushes) for o in self._open.values())

    @property
    def params_still_while_replying(self) -> bool:
        """Whether the slice cannot change while a reply streams it: in plain sync the next step needs
        every worker's next push, which each sends only after its whole reply arrived."""
        return self.staleness == 0 and self.backup == 0

    def check(self, state: StepHost, push: Push, members: frozenset[int]) -> bool:
        """Validate without changing anything; True when the push is a duplicate."""
        open_step, last = state.version, state.last_step_of(push.worker_id)
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

    def submit(self, state: StepHost, push: Push, members: frozenset[int], duplicate: bool) -> Outcome:
        w = push.worker_id
        if not duplicate and push.step < state.version:  # late for a step that closed without it
            state.took(w, push.step)
            state.stats.dropped()
            return Outcome(state.version, 0, False, next_step=state.version, dropped=True)
        if not duplicate:
            self._take(state, push, members)
        return self.await_reply(state, push, duplicate)

    def take(self, state: StepHost, push: Push, members: frozenset[int]) -> None:
        if not self.params_still_while_replying:
            raise InvalidArgument("a push in parts needs plain sync (no staleness bound, no backup workers): "
                                  "send it whole")
        self._take(state, push, members)

    def _take(self, state: StepHost, push: Push, members: frozenset[int]) -> None:
        push.kept = True
        self._open.setdefault(push.step, _OpenStep(members, {})).pushes[push.worker_id] = push
        state.took(push.worker_id, push.step)
        state.stats.taken(push.step - push.base_version)
        self._close_ready(state)

    def parts_arrived(self, state: StepHost) -> None:
        self._close_ready(state)

    def continuing(self, worker_id: int, step: int) -> Push | None:
        open_ = self._open.get(step)
        push = open_.pushes.get(worker_id) if open_ is not None else None
        return push if push is not None and not push.complete else None

    def part_ready(self, state: StepHost, step: int, part: int) -> bool:
        if state.version > step:
            return True
        open_ = self._open.get(step)
        return step == state.version and open_ is not None and open_.applied > part

    def mid_step(self, state: StepHost) -> bool:
        open_ = self._open.get(state.version)
        return open_ is not None and open_.applied > 0

    def await_reply(self, state: StepHost, push: Push, duplicate: bool, clip_done: bool = False) -> Outcome:
        """Wait (releasing the lock) until the push may be answered: its step - staleness closed, or
        (clipped pushes) its own step is aggregated and waits for the total norm. Every push of a
        clipped step gets the step's partial norm once (``clip_done`` after that), also when another
        worker's total applied the step first: each worker needs every shard's partial."""
        slack = 0 if push.options.clipped else self.staleness
        start, generation = time.monotonic(), state.generation
        released = state.wait_for(lambda: state.version > push.step - slack or push.step in self._pending
                                       or state.generation != generation or push.evicted, timeout=self.timeout)
        state.stats.waited(time.monotonic() - start)
        if state.generation != generation:  # rolled back (or demoted) while this push waited: it is void
            state.raise_voided(generation, f" while step {push.step} was open")
        if push.evicted:
            raise UnknownWorker(f"worker {push.worker_id} was removed from the membership (its lease ran out) while "
                                f"its push for step {push.step} waited; register again to rejoin")
        if not released:
            waiting_for = self._open.get(state.version, _OpenStep(frozenset(), {}))
            missing = sorted(waiting_for.members - waiting_for.pushes.keys())
            raise WaitTimeout(
                f"step {state.version} did not close within {self.timeout:.0f}s; still waiting for workers {missing}"
                if missing or state.version not in self._pending else
                f"step {state.version} waits for a clip total norm that no worker sent within {self.timeout:.0f}s"
            )
        if push.step in self._pending and state.version <= push.step:
            return Outcome(state.version, 0, duplicate, next_step=push.step + 1,
                           clip_partial=self._pending[push.step].partial)
        next_step = max(state.last_step_of(push.worker_id) + 1, state.version)
        closed = self.closed.get(push.step, Closed(0.0))  # SSP answers before the step closes: lr unknown (0)
        if push.options.clipped and not clip_done and closed.partial is not None:
            return Outcome(state.version, 0, duplicate, next_step=next_step, clip_partial=closed.partial)
        return Outcome(state.version, push.step - push.base_version if not duplicate else 0, duplicate,
                       next_step=next_step, applied_lr=0.0 if duplicate else closed.lr, skipped=closed.skipped)

    def finish_clip(self, state: StepHost, push: Push, total_norm: float, duplicate: bool) -> Outcome:
        """A worker's total norm for the clipped step of ``push``: apply it (the first total counts;
        every worker computes the same one), then answer as ``await_reply`` does."""
        check_total(total_norm)
        pending = self._pending.pop(push.step, None)
        if pending is not None:
            pending.grad.mul_(clip_coefficient(pending.options.clip_max_norm, total_norm))
            self._apply(state, push.step, pending.grad, pending)
            if pending.release is not None:
                pending.release()
            state.notify_all()
            self._close_ready(state)
        return self.await_reply(state, push, duplicate, clip_done=True)

    def _close_ready(self, state: StepHost) -> None:
        """Close the open step, and the ones after it, while they have enough pushes."""
        while state.version not in self._pending:
            open_ = self._open.get(state.version)
            if open_ is None or len(open_.pushes) < len(open_.members) - self.backup:
                return
            if not all(p.complete for p in open_.pushes.values()):
                self._apply_parts(state, open_)
                return
            self._close(state, state.version, self._open.pop(state.version))

    def _apply_parts(self, state: StepHost, open_: _OpenStep) -> None:
        """Apply the parts of the open step that every member's push has sent (pushes in parts): the
        mean of each part, then the optimizer on that part only. The step closes (``_close``) once
        every part is in; until then the slice is between versions (``mid_step``)."""
        stops = open_.stops()
        pushes = [open_.pushes[w] for w in sorted(open_.pushes)]
        if stops is None or not state.early_parts or any(p.options.overflow or p.options.clipped for p in pushes):
            return  # applied whole once every part is in (a skipped or clipped step needs all of it first)
        ready = min(p.parts_in(stops) for p in pushes)
        if open_.applied >= ready:
            return
        present, lr_scale = _merge_present(pushes), self._lr_scale(pushes)
        bounds = part_bounds(stops)
        while open_.applied < ready:
            lo, hi = bounds[open_.applied]
            _mean_into(pushes, lo, hi)
            state.apply_part(pushes[0].gradient, present, pushes[0].hyper if not open_.applied else None, lr_scale,
                             lo, hi)
            open_.applied += 1
        state.notify_all()

    def _lr_scale(self, pushes: list[Push]) -> float:
        if not self.staleness_lr:
            return 1.0
        samples = sum(p.batch_size for p in pushes)
        return 1.0 / max(1.0, sum(p.batch_size * (p.step - p.base_version) for p in pushes) / samples)

    def _close(self, state: StepHost, step: int, open_: _OpenStep) -> None:
        pushes = [open_.pushes[w] for w in sorted(open_.pushes)]
        buffers = next((p.buffers for p in pushes if p.buffers is not None), None)
        if any(p.options.overflow for p in pushes):
            state.skip(buffers, step=step, pushed=_pushed(pushes))
            self._remember(state, step, Closed(0.0, skipped=True))
        else:
            stops = open_.stops()
            stepped = stops[open_.applied - 1] if stops is not None and open_.applied else 0
            _mean_into(pushes, stepped, None)  # (the parts applied already hold their mean)
            clipped = next((p.options for p in pushes if p.options.clipped), None)
            mean, lr_scale = pushes[0].gradient, self._lr_scale(pushes)
            present = _merge_present(pushes)
            pushes[0].release, first_release = None, pushes[0].release  # the mean's buffer, given back after apply
            pending = _Pending(mean, present, pushes[0].hyper, lr_scale, clipped or pushes[0].options, 0.0,
                               buffers, pushed=_pushed(pushes))
            if clipped is not None:
                pending.partial = state.optimizer.partial_norm(mean, present, clipped.clip_norm_type)
                pending.release = first_release  # the mean lives in the first push's buffer until applied
                self._pending[step] = pending
                _let_go(pushes[1:])
                state.notify_all()
                return
            self._apply(state, step, mean, pending, stepped)
            if first_release is not None:
                first_release()
        _let_go(pushes)
        state.notify_all()

    def _apply(self, state: StepHost, step: int, grad: torch.Tensor, pending: _Pending, stepped: int = 0) -> None:
        partial = pending.partial if pending.options.clipped else None
        state.apply(grad, pending.present, pending.hyper, pending.lr_scale, pending.buffers, step=step,
                    partial=partial, pushed=pending.pushed, stepped=stepped)
        self._remember(state, step, Closed(state.optimizer.lr() * pending.lr_scale, partial=partial))

    def _remember(self, state: StepHost, step: int, closed: Closed) -> None:
        self.remember(step, closed)

    def remember(self, step: int, closed: Closed) -> None:
        """Keep what step ``step`` did, for answering its repeats (a backup replica learns it from its primary)."""
        self.closed[step] = closed
        self.closed.pop(step - CLOSED_KEPT, None)


class AsyncPolicy:
    """Asynchronous: every push is applied on arrival with its own gradient and answered
    with the fresh slice. Staleness = version at apply time - the push's base_version.

    With ``staleness_lr`` the push is applied with lr / max(1, staleness), after
    Zhang et al. 2016 ("Staleness-aware Async-SGD"): stale gradients move less. A
    clipped push is clipped by its own gradient's norm over all shards (it waits for
    its worker's total norm); an overflow vote is counted and applies nothing.
    """

    mode = UpdateMode.ASYNC

    def __init__(self, staleness_lr: bool = False, timeout: float = 300.0):
        self.staleness_lr, self.timeout = staleness_lr, timeout
        self._pending: dict[tuple[int, int], _Pending] = {}  # (worker, step) -> clipped push waiting for its norm

    def reset(self) -> None:
        for pending in self._pending.values():
            if pending.release is not None:
                pending.release()
        self._pending.clear()

    def reconsider(self, state: StepHost) -> None:
        pass  # nothing waits for other workers

    def remember(self, step: int, closed: Closed) -> None:
        pass  # an async repeat is answered with the current slice

    def waiting_pushes(self) -> int:
        return len(self._pending)

    params_still_while_replying = False  # every push applies on arrival

    def take(self, state: StepHost, push: Push, members: frozenset[int]) -> None:
        raise InvalidArgument("a push in parts needs plain sync; this job is async: send it whole")

    def await_reply(self, state: StepHost, push: Push, duplicate: bool, clip_done: bool = False) -> Outcome:
        return Outcome(state.version, 0, duplicate, next_step=state.last_step_of(push.worker_id) + 1)

    def parts_arrived(self, state: StepHost) -> None:
        pass  # (no push in parts is taken)

    def continuing(self, worker_id: int, step: int) -> Push | None:
        return None

    def part_ready(self, state: StepHost, step: int, part: int) -> bool:
        return True

    def mid_step(self, state: StepHost) -> bool:
        return False

    def check(self, state: StepHost, push: Push, members: frozenset[int]) -> bool:
        last = state.last_step_of(push.worker_id)
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

    def submit(self, state: StepHost, push: Push, members: frozenset[int], duplicate: bool) -> Outcome:
        key = (push.worker_id, push.step)
        if duplicate:
            if key in self._pending:
                return Outcome(state.version, 0, True, next_step=push.step + 1,
                               clip_partial=self._pending[key].partial)
            return Outcome(state.version, 0, True, next_step=state.last_step_of(push.worker_id) + 1)
        state.took(push.worker_id, push.step)
        if push.options.overflow:
            state.skip_push(push.buffers)
            return Outcome(state.version, 0, False, next_step=push.step + 1, skipped=True)
        staleness = state.version - push.base_version
        state.stats.taken(staleness)
        lr_scale = 1.0 / max(1, staleness) if self.staleness_lr else 1.0
        pending = _Pending(_unscale(push), push.present, push.hyper, lr_scale, push.options, 0.0, push.buffers,
                           pushed={push.worker_id: push.step})
        if push.options.clipped:
            push.kept = True
            pending.grad = push.gradient  # scaled in place by the clip coefficient later
            pending.release, push.release = push.release, None
            pending.partial = state.optimizer.partial_norm(push.gradient, push.present, push.options.clip_norm_type)
            self._pending[key] = pending
            return Outcome(state.version, staleness, False, next_step=push.step + 1, clip_partial=pending.partial)
        return self._apply(state, push, pending, staleness)

    def finish_clip(self, state: StepHost, push: Push, total_norm: float, duplicate: bool) -> Outcome:
        check_total(total_norm)
        pending = self._pending.pop((push.worker_id, push.step), None)
        if pending is None:  # applied already (a retry of the total)
            return Outcome(state.version, 0, True, next_step=push.step + 1)
        pending.grad.mul_(clip_coefficient(pending.options.clip_max_norm, total_norm))
        try:
            return self._apply(state, push, pending, state.version - push.base_version)
        finally:
            if pending.release is not None:
                pending.release()

    def _apply(self, state: StepHost, push: Push, pending: _Pending, staleness: int) -> Outcome:
        state.apply(pending.grad, pending.present, pending.hyper, pending.lr_scale, pending.buffers,
                    pushed=pending.pushed)
        return Outcome(state.version, staleness, False, next_step=push.step + 1,
                       applied_lr=state.optimizer.lr() * pending.lr_scale)


def make_policy(job: JobConfig, step_timeout: float) -> UpdatePolicy:
    """The policy object for the job's mode: the one place a mode is looked at."""
    if job.mode is UpdateMode.ASYNC:
        return AsyncPolicy(job.staleness_lr, step_timeout)
    return SyncPolicy(step_timeout, job.backup_workers, job.staleness_bound, job.staleness_lr)
