"""What a shard's update policy and the shard's state say to each other, and what they pass.

The value types (``Push``, ``Outcome``, ``Closed``) and two ``Protocol``s:

* ``UpdatePolicy`` is what ``ShardState`` needs from a policy (``server/modes.py``: sync or
  async; the one place a mode is looked at is ``modes.make_policy``);
* ``StepHost`` is what a policy needs from the shard it runs in: read the version, the
  membership and the dedup table; take a push; apply or skip a step; wait on the shard's lock.
  ``ShardState`` is the one implementation. A policy writes no field of the state: it calls
  these methods, which keep the state's invariants (one version per applied or skipped step,
  backups first on a replicated shard, counters only under the lock).

Both run under the shard's lock (``ShardState.cond``). Nothing here imports the state or a
policy, so ``modes.py`` and ``state.py`` need not import each other: the state builds its
policy with ``modes.make_policy`` and hands itself to every call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Protocol

import torch

from ..proto.messages import StepOpts

if TYPE_CHECKING:  # types only: neither module imports this one's users
    from .slice_optimizer import SliceOptimizer
    from .stats import ShardStats


@dataclass
class Push:
    """One push. ``grad`` is an fp32 tensor of the shard's size (usually a pooled receive
    buffer; None for an overflow vote); ``ShardState.push`` calls ``release`` exactly once,
    when nothing needs it any more."""

    worker_id: int
    step: int  # the worker's step number (updates it has taken), 0-based
    epoch: int  # membership epoch the worker believes current
    base_version: int  # shard version the gradient was computed on
    options: StepOpts  # batch size, hyper-parameters, mask, overflow, loss scale, clipping
    grad: torch.Tensor | None
    release: Callable[[], None] | None = None  # give the grad's buffer back
    hyper: list | None = None  # the job groups' kwargs parsed from options (None: keep the shard's)
    present: list[bool] | None = None  # which pieces carry a gradient (None: all)
    buffers: bytes | None = None  # the model's buffers (shard 0, rank 0), checked
    kept: bool = False  # set by a policy that holds on to grad past submit()
    evicted: bool = False  # its worker left the step's membership while the push waited
    # A push in parts (byte link, plain sync): ``grad`` fills part by part; ``stops`` are the parts' end
    # offsets in the slice (``proto.plan.part_stops``), ``have`` how many arrived. None: it came whole.
    stops: list[int] | None = None
    have: int = 0
    filler: Any = None  # the attempt now writing its parts (``server/parts.py``'s Fill)

    @property
    def complete(self) -> bool:
        """Its whole gradient is in (a whole push always is)."""
        return self.stops is None or self.have >= len(self.stops)

    def parts_in(self, stops: list[int]) -> int:
        """How many of ``stops``' parts of the step have arrived from this push."""
        return len(stops) if self.stops is None else self.have

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    @property
    def gradient(self) -> torch.Tensor:
        """``grad`` of a push that is no overflow vote (``ShardState`` refuses such a push without one)."""
        assert self.grad is not None, "only an fp16 overflow vote carries no gradient"
        return self.grad


@dataclass(frozen=True)
class Outcome:
    version: int  # shard version the reply's parameters have
    staleness: int  # version at apply time minus base_version (0 in sync)
    duplicate: bool  # seen before; not applied again
    next_step: int  # the step number the worker's next push carries
    applied_lr: float = 0.0  # lr this push was applied with (0: not applied by it)
    dropped: bool = False  # arrived after its step closed (backup workers); never applied
    skipped: bool = False  # its step was skipped (an fp16 overflow on some worker)
    clip_partial: float | None = None  # clipped step: this shard's share of the norm; send finish_clip next


@dataclass
class Closed:
    """What a closed step did, remembered for replies that come after it."""

    lr: float  # group 0's lr as applied (0 when skipped)
    skipped: bool = False
    partial: float | None = None  # a clipped step: this shard's share of its norm (every clipped push gets it)


class StepHost(Protocol):
    """The shard a policy runs in (``ShardState``), as the policy sees it: every member is used
    under the shard's lock, which ``wait_for`` releases while it waits."""

    @property
    def version(self) -> int:
        """Updates applied (or skipped): a sync shard's open step."""

    @property
    def generation(self) -> int:
        """Moves on at every restore, copy or void: a push that waited across one is void."""

    @property
    def optimizer(self) -> SliceOptimizer:
        """The slice's optimizer (read only: ``partial_norm``, ``lr``; replaced by a restore)."""

    @property
    def stats(self) -> ShardStats:
        """The counters; a policy counts through their methods."""

    def members_for(self, step: int) -> frozenset[int]:
        """Member ids of the newest known view that governs ``step``."""

    def last_step_of(self, worker_id: int) -> int:
        """The last step of ``worker_id`` taken (the dedup table; -1: none)."""

    def took(self, worker_id: int, step: int) -> None:
        """Record that ``worker_id``'s push for ``step`` was taken: its repeats are duplicates."""

    def apply(self, grad: torch.Tensor, present: list[bool] | None, hyper: list | None, lr_scale: float = 1.0,
              buffers: bytes | None = None, step: int | None = None, partial: float | None = None,
              pushed: dict[int, int] | None = None, stepped: int = 0) -> None:
        """One optimizer step: a new version (a replicated shard's backups take it first). ``stepped``:
        the slice's first ``stepped`` elements took this step already, part by part (``apply_part``)."""

    @property
    def early_parts(self) -> bool:
        """Whether parts of an open step may be applied before the step closes (an unreplicated shard:
        a replicated one's backups must take a step before its primary changes)."""

    def apply_part(self, grad: torch.Tensor, present: list[bool] | None, hyper: list | None, lr_scale: float,
                   lo: int, hi: int) -> None:
        """Step the optimizer on elements [lo, hi) of the slice only (a part of the open step); no new
        version: ``apply`` with ``stepped`` closes the step."""

    def torn(self, step: int, worker_id: int, parts: int) -> None:
        """Record that ``worker_id`` left step ``step`` after its first ``parts`` parts were applied with it."""

    def skip(self, buffers: bytes | None = None, step: int | None = None,
             pushed: dict[int, int] | None = None) -> None:
        """Close a step without applying it (an fp16 overflow): a new version all the same."""

    def skip_push(self, buffers: bytes | None) -> None:
        """An async push's fp16 overflow vote: counted, its buffers kept, no new version."""

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait on the shard's lock (released meanwhile) until ``predicate``; False at ``timeout``."""

    def notify_all(self) -> None:
        """Wake the calls waiting on the shard's lock (a step closed or became ready)."""

    def raise_voided(self, generation: int, during: str) -> NoReturn:
        """For a call that waited while the generation moved on from ``generation``: RolledBack,
        or NotPrimary when the replica stepped down or took a copy (``during``: what waited)."""


class UpdatePolicy(Protocol):
    """When a shard applies pushes. ``ShardState`` calls these under its lock (``state.cond``); a
    method that waits (``submit`` in sync mode, ``finish_clip``) releases it while it waits and
    raises ``WaitTimeout`` after its ``timeout``, never blocking for ever."""

    @property
    def params_still_while_replying(self) -> bool:
        """True when the slice cannot change while a reply streams it (the reply may stream the
        live tensor instead of a copy)."""

    def check(self, state: StepHost, push: Push, members: frozenset[int]) -> bool:
        """Raise a domain error for a push that may not be submitted (nothing changes); True when it
        is a retry of one already submitted (it is answered, never applied twice)."""

    def submit(self, state: StepHost, push: Push, members: frozenset[int], duplicate: bool) -> Outcome:
        """Take the push (apply it now, or keep it for its step) and return its answer once it may be
        answered. Sets ``push.kept`` when the policy keeps ``push.grad`` past the call."""

    def take(self, state: StepHost, push: Push, members: frozenset[int]) -> None:
        """Take a push in parts (not a duplicate) into its step without waiting: its parts arrive
        later (``parts_arrived``), its answer comes from ``await_reply``. Plain sync only."""

    def await_reply(self, state: StepHost, push: Push, duplicate: bool, clip_done: bool = False) -> Outcome:
        """Wait (releasing the lock) until a taken push may be answered, and answer it."""

    def parts_arrived(self, state: StepHost) -> None:
        """More parts of a push in parts are in: apply the open step's parts every member has sent."""

    def continuing(self, worker_id: int, step: int) -> Push | None:
        """The push in parts of ``worker_id`` for ``step`` that is still open with parts missing (a
        retry fills them in), or None."""

    def part_ready(self, state: StepHost, step: int, part: int) -> bool:
        """Whether part ``part`` of step ``step``'s answer may go out (applied, or the step closed)."""

    def mid_step(self, state: StepHost) -> bool:
        """Whether the open step has parts applied but is not closed (the slice is between versions)."""

    def finish_clip(self, state: StepHost, push: Push, total_norm: float, duplicate: bool) -> Outcome:
        """The total norm over all shards for a clipped push's step: clip, apply, answer."""

    def reconsider(self, state: StepHost) -> None:
        """The membership changed: steps waiting on members who left are made up of the new view."""

    def reset(self) -> None:
        """Forget everything open or pending (a rollback); kept buffers go back to their pool."""

    def remember(self, step: int, closed: Closed) -> None:
        """Record what a step did (a backup replica replays its primary's steps)."""

    def waiting_pushes(self) -> int:
        """Pushes held by the policy now (status)."""
