"""Replicated shards: a primary ships every update to its backups before it answers.

A job with ``replicas`` = r >= 2 keeps each shard on r servers. The coordinator
places them (shard k on servers k, k+1, ..., first = primary), and tells every
server, a few times a second, which replicas it holds (``SetReplicas``); that
call also renews the server's *primary lease*. The primary of a shard applies a
closed step like this, under the shard's lock:

1. it ships the step's update (the aggregated gradient, which pieces had one, the
   hyper-parameters, the lr scale, shard 0's buffers and the dedup table) to every
   backup, which applies it with the same torch kernels: the copies stay
   bit-identical (a backup that is behind, or new, gets a whole copy first);
2. only when every backup has acknowledged does it apply the step itself and
   answer the workers.

So a worker never sees a version that a backup lacks, and the dedup table a
backup holds is the primary's: when the coordinator promotes a backup (a new
placement epoch), workers' retried pushes are answered exactly once by it and no
step is rolled back. Split brain is ruled out by the lease: the coordinator
declares a primary dead only after the lease it last granted has run out (the
lease runs from the server's own clock in its previous answer, echoed by the
call, so a call read late, by a primary that was paused, grants nothing), and a
primary whose lease ran out ships nothing and answers nothing (it is *demoted*);
a backup refuses updates from an older placement epoch. A backup that cannot be
reached holds the step until the coordinator drops it from the placement
(reported in ``SetReplicas``'s answer), or the lease runs out.

No gRPC here: ``send(address, header, tensors)`` is passed in (``server.service``).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# A backup's refusals (ReplicaRefused) are told apart by their class, which travels as a typed reason
# (proto/errors.py): NeedsCopy (an update it cannot apply in order: a whole copy first), Superseded
# (the sender is a primary of an older placement: it steps down).
from ..proto.errors import NeedsCopy, NotPrimary, ReplicaRefused, ShardpsError, Superseded, Unavailable  # noqa: F401 - ReplicaRefused for callers

log = logging.getLogger("shardps.server")

RETRY_PAUSE_S = 0.2  # between attempts to reach a backup that failed


@dataclass
class Update:
    """One closed step, as a backup applies it."""

    version: int  # the version after it
    grad: torch.Tensor | None  # the aggregated fp32 gradient (None: skipped)
    present: list[bool] | None
    hyper_json: str  # the groups' hyper-parameters it is applied with
    lr_scale: float
    buffers: bytes | None
    last_step: dict[int, int]  # the dedup table after it
    clip_partial: float | None = None  # a clipped step: this shard's share of its norm


Send = Callable[[str, object, list], int]  # (backup address, pb.ReplicaHeader, [(name, tensor)]) -> its version


@dataclass
class ReplicaRole:
    """What one replica of a shard is, as the coordinator last said, and the primary's shipping state."""

    primary: bool = False
    placement_epoch: int = 0
    backups: list[str] = field(default_factory=list)  # primary: where updates go
    lease_until: float = 0.0  # primary: monotonic time its lease runs out
    demoted: str = ""  # why this replica stopped being primary on its own (lease lost, superseded)
    synced: set[str] = field(default_factory=set)  # backups known to hold this replica's version
    unreachable: set[str] = field(default_factory=set)  # reported to the coordinator, which drops them
    updates_replicated: int = 0
    copies_sent: int = 0
    assigned: bool = False  # the coordinator has placed this replica at least once
    copying: bool = False  # a whole copy to a new backup is under way
    cond: threading.Condition = field(default_factory=threading.Condition)

    def assign(self, epoch: int, primary: bool, backups: list[str], lease_s: float | None,
               since: float | None = None) -> bool:
        """Take the coordinator's placement (ignored when older than the one held). A primary's
        lease then runs ``lease_s`` from ``since`` (monotonic seconds; default now); None renews nothing.
        Returns whether this replica stopped being the primary (its open steps are void)."""
        with self.cond:
            if epoch < self.placement_epoch:
                return False
            stepped_down = self.primary and not primary
            if epoch > self.placement_epoch or primary != self.primary:
                self.demoted = ""
            self.placement_epoch, self.primary, self.assigned = epoch, primary, True
            self.synced &= set(backups)
            self.unreachable &= set(backups)
            self.backups = list(backups)
            if primary and lease_s is not None:  # (a late call's lease may end sooner than the one held: so be it)
                self.lease_until = (time.monotonic() if since is None else since) + lease_s
            self.cond.notify_all()
            return stepped_down

    def wait_assigned(self, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.assigned, timeout=timeout):
                raise Unavailable("this replicated shard has not been placed by the coordinator yet; retry")

    def serving(self) -> str:
        """Why this replica may not answer pushes or pulls now ("" when it may)."""
        with self.cond:
            if self.demoted:
                return self.demoted
            if not self.primary:
                return "this server holds a backup of the shard, not its primary"
            if time.monotonic() > self.lease_until:
                return "its primary lease ran out (the coordinator is unreachable or placed the shard elsewhere)"
            return ""

    def unsync(self) -> bool:
        """The state changed outside a step (loaded, restored): every backup needs a whole copy before
        its next update. Returns whether this replica is the primary."""
        with self.cond:
            self.synced.clear()
            return self.primary

    def report(self) -> list[str]:
        with self.cond:
            return sorted(self.unreachable)

    def in_sync(self) -> list[str]:
        with self.cond:
            return sorted(self.synced & set(self.backups)) if self.primary and not self.demoted else []

    def take_from(self, placement_epoch: int, shard_id: int) -> bool:
        """Whether an update (or copy) sent by the primary of ``placement_epoch`` may be taken: updates
        come only from the primary of this replica's placement or a newer one (Superseded, naming this
        placement, otherwise). True when this replica acts as primary of an older placement: it must
        step down (``step_down``) before it takes the update."""
        with self.cond:
            acting = self.primary and not self.demoted
            if placement_epoch < self.placement_epoch or (acting and placement_epoch == self.placement_epoch):
                raise Superseded(
                    f"superseded by placement epoch {self.placement_epoch}: shard {shard_id}'s replica "
                    f"here {'is the primary' if self.primary else 'follows a newer placement'} (the update named "
                    f"{placement_epoch})", placement_epoch=self.placement_epoch)
            return acting


def ship(role: ReplicaRole, state, update: Update | None, send: Send, timeout: float) -> None:
    """Have every backup of ``state`` apply ``update`` (under the state's lock, before the primary
    applies it; None: only bring every backup to the primary's version). Returns once all have it (or the coordinator dropped the ones that could not be
    reached); raises Unavailable, demoting the replica, when it may no longer act as primary."""
    deadline = time.monotonic() + timeout
    done: set[str] = set()
    while True:
        why = role.serving()
        if why:
            demote(role, state, why)
        with role.cond:
            todo = [b for b in role.backups if b not in done]
        if not todo:
            return
        for address in todo:
            try:
                if address not in role.synced:
                    send_copy(role, state, address, send)
                if update is not None:
                    send(address, update_header(state, role, update), update_tensors(update))
                done.add(address)
                with role.cond:
                    role.updates_replicated += update is not None
                    role.unreachable.discard(address)
            except Superseded as exc:
                demote(role, state, f"backup {address} follows placement epoch {exc.placement_epoch} ({exc})")
            except NeedsCopy:
                with role.cond:
                    role.synced.discard(address)  # next attempt sends a whole copy first
            except ShardpsError as exc:
                with role.cond:
                    if address not in role.unreachable:
                        log.warning("shard %d: backup %s did not take version %d (waiting for the coordinator to "
                                    "drop it): %s", state.shard.shard_id, address, state.version + (update is not None),
                                    exc)
                    role.unreachable.add(address)
                    role.synced.discard(address)
        if done.issuperset(todo):
            continue  # every backup took it: the check above returns, unless the placement added one
        if time.monotonic() > deadline:
            demote(role, state, f"its backups {sorted(set(todo) - done)} could not be reached within {timeout:.0f}s")
        with role.cond:
            role.cond.wait(RETRY_PAUSE_S)  # the coordinator may drop the unreachable ones meanwhile


def send_copy(role: ReplicaRole, state, address: str, send: Send) -> None:
    """A whole copy of ``state`` (under its lock) to ``address``, which takes it as its replica. Its
    dedup table is the one of the applied version: pushes waiting in an open step are not in it (were
    the copy promoted, they must be applied when they come again)."""
    from ..proto.gen import shardps_pb2 as pb

    header = pb.ReplicaHeader(job_id=state.job_id, shard_id=state.shard.shard_id,
                              placement_epoch=role.placement_epoch, full=True, version=state.version,
                              hyperparams_json=state.hyper_json(), last_step=dict(state.applied_table),
                              views_json=state.views.to_json(), min_epoch=state.timeline.min_epoch,
                              rolled_back_to=state.timeline.rolled_back_to)
    tensors = [("param", state.param), *state.optimizer.state_tensors(copy=False).items()]  # sent under the lock
    if state.buffers is not None:
        tensors.append(("buffers", torch.frombuffer(bytearray(state.buffers), dtype=torch.uint8)))
    send(address, header, tensors)
    with role.cond:
        role.synced.add(address)
        role.copies_sent += 1
    log.info("shard %d: whole copy at version %d sent to backup %s", state.shard.shard_id, state.version, address)


def update_header(state, role: ReplicaRole, u: Update):
    from ..proto.gen import shardps_pb2 as pb

    return pb.ReplicaHeader(job_id=state.job_id, shard_id=state.shard.shard_id, placement_epoch=role.placement_epoch,
                            version=u.version, skipped=u.grad is None, present=u.present or [],
                            hyperparams_json=u.hyper_json, lr_scale=u.lr_scale, clip_partial=u.clip_partial,
                            last_step=u.last_step)


def update_tensors(u: Update) -> list:
    out = [] if u.grad is None else [("grad", u.grad)]
    if u.buffers is not None:
        out.append(("buffers", torch.frombuffer(bytearray(u.buffers), dtype=torch.uint8)))
    return out


def step_down(role: ReplicaRole, state, why: str) -> None:
    """Stop acting as primary (under the state's lock): pushes waiting in a step are told to go
    elsewhere, and nothing is answered until the coordinator places this replica again."""
    with role.cond:
        role.primary, role.demoted = False, why
        role.synced.clear()
    void_open_steps(state)
    log.error("shard %d: no longer primary: %s", state.shard.shard_id, why)


def demote(role: ReplicaRole, state, why: str) -> None:
    """``step_down``, and refuse the call that found out (Unavailable: its worker goes elsewhere)."""
    step_down(role, state, why)
    raise NotPrimary(moved(state.shard.shard_id, why))


def void_open_steps(state) -> None:
    """Under the state's lock: the steps this replica had open will be closed elsewhere (or again)
    (``ShardState.void_open_steps``)."""
    state.void_open_steps()


def moved(shard_id: int, why: str) -> str:
    return f"shard {shard_id} is not served here: {why}; ask the coordinator for the shard plan and retry"
