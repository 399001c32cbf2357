"""A push in parts (``LinkTransfer.parts``): the shard applies each part of a sync step once every
member's part is in, and answers it while later parts still arrive, so that both directions of a
link are busy at once (``docs/architecture/byte-link.md``, "Pushes in parts").

The attempt that reads a push's parts off its link holds a ``Fill``. The parts go straight into the
push's pooled buffer, outside the shard's lock; each part is committed under the lock (``arrived``),
which may apply parts of the open step (``SyncPolicy._apply_parts``). A push whose parts stopped
coming (its link broke) stays in its step with the parts it sent; the worker's retry *continues* it:
``begin`` fences the old attempt off (closes its link and waits for it to let go) and the new one
writes the parts still missing. Nothing here is applied twice, and nothing is applied that a member
did not send; a member that leaves the job in the middle of a step tears it (``SyncPolicy.reconsider``).

    fill = parts.begin(state, push, members, abort=link.close)
    ... read part k into push.grad[lo:hi] (unless fill.skips(k)); parts.arrived(state, fill, k) ...
    outcome = parts.finish(state, fill)       # blocks until the step closes, as a whole push's submit
"""
from __future__ import annotations

from typing import Callable

from ..proto.errors import InvalidArgument, Unavailable, UnknownWorker
from .steps import Outcome, Push

FENCE_S = 10.0  # how long a retry waits for the attempt it continues to let go of the push


class Fill:
    """One attempt's hold on a push in parts: it writes parts ``start..`` of ``push``'s buffer (a
    duplicate, or a late joiner's dropped push, writes none: its parts are read and dropped)."""

    def __init__(self, push: Push, start: int, duplicate: bool, generation: int, abort: Callable[[], None],
                 give: Callable[[], None], dropped: Outcome | None = None):
        self.push, self.start, self.duplicate, self.generation = push, start, duplicate, generation
        self.abort, self.give, self.dropped = abort, give, dropped
        self.active = dropped is None and not duplicate  # writing into push.grad (its buffer must stay)
        self.release_later = False  # the policy let the push go while this attempt still wrote into it

    def skips(self, part: int) -> bool:
        """Whether part ``part`` is read and dropped (already in, or nothing of this attempt is taken)."""
        return not self.active or part < self.start


def releaser(push: Push, give: Callable[[], None]) -> Callable[[], None]:
    """``push.release`` for a push in parts: the buffer goes back once no attempt writes into it."""
    def release() -> None:
        fill = push.filler
        if fill is not None and fill.active:
            fill.release_later = True
        else:
            give()
    return release


def begin(state, push: Push, members: frozenset[int], abort: Callable[[], None], give: Callable[[], None]) -> Fill:
    """Take ``push`` (its ``stops`` set, its buffer empty) into its step, or find the push it continues
    (a retry after the link broke) or repeats (answered, never applied twice). Raises a domain error,
    nothing changed, for a push that may not be taken; Unavailable when the attempt it continues
    does not let go within FENCE_S. ``abort`` ends this attempt's reading (closes its link); ``give``
    hands ``push``'s buffer back (this attempt's; a continued push keeps the first attempt's)."""
    state.checks.validate(push)
    with state.cond:
        earlier = state.policy.continuing(push.worker_id, push.step)
        if earlier is None:
            admitted = state.admit(push, members)
            if admitted is None:  # a joiner's push late for its first step: dropped, answered
                return Fill(push, 0, False, state.generation, abort, give,
                            dropped=Outcome(state.version, 0, False, next_step=state.version, dropped=True))
            members, duplicate = admitted
            if duplicate:
                return Fill(push, 0, True, state.generation, abort, give)
            push.filler = Fill(push, 0, False, state.generation, abort, give)
            state.policy.take(state, push, members)
            return push.filler
        state.check_serving()
        state.timeline.check(push.epoch)
        if earlier.stops != push.stops:
            raise InvalidArgument(f"this push continues one in {len(earlier.stops or [])} parts; it has "
                                  f"{len(push.stops or [])}")
        old = earlier.filler
        if old.active:
            old.abort()  # (its link: the attempt's read fails at once and it lets go)
            if not state.cond.wait_for(lambda: not old.active, timeout=FENCE_S):
                raise Unavailable(f"worker {push.worker_id}'s earlier attempt at step {push.step} still holds its "
                                  f"push; try again")
        earlier.filler = Fill(earlier, earlier.have, False, state.generation, abort, old.give)
        state.stats.received(push.worker_id, True)
        return earlier.filler


def arrived(state, fill: Fill, part: int) -> None:
    """Under the lock: part ``part`` of ``fill``'s push is in its buffer. Raises (the attempt stops)
    when the push was let go meanwhile: rolled back, or its worker left the step."""
    if state.generation != fill.generation:
        state.raise_voided(fill.generation, f" while parts of step {fill.push.step} arrived")
    if fill.push.evicted:
        raise UnknownWorker(f"worker {fill.push.worker_id} was removed from the membership while its push for step "
                            f"{fill.push.step} arrived; register again to rejoin")
    fill.push.have = max(fill.push.have, part + 1)
    state.policy.parts_arrived(state)


def stop(state, fill: Fill) -> None:
    """Under the lock: the attempt writes no more (done or failed); a buffer let go meanwhile goes back."""
    if fill.active:
        fill.active = False
        if fill.release_later:
            fill.give()
        state.notify_all()


def finish(state, fill: Fill) -> Outcome:
    """Under the lock: the answer, once the push's step closed (blocks as a whole push's submit does)."""
    if fill.dropped is not None:
        return fill.dropped
    return state.policy.await_reply(state, fill.push, fill.duplicate)
