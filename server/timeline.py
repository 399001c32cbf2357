"""Which timeline one shard is on: the generation its waiting calls were made in, and the fence a
rollback leaves behind.

A rollback (``ShardState.restore`` with an epoch) sends the whole job back to a checkpoint; a
replica that steps down, demotes itself or takes a whole copy voids the steps it had open. Both
move the *generation* on, which wakes every call waiting in the shard: such a call is void and
told why (``RolledBack``, or ``NotPrimary`` when no rollback did it). Invariants, all under the
shard's lock (``ShardState.cond``):

* the generation only grows, by one per restore, copy or void;
* ``rolled_back_generation`` is the generation the last restore made (later bumps are no rollback);
* after a rollback, calls that name a membership epoch before ``min_epoch`` are refused
  (``RolledBack``, naming ``rolled_back_to``); a shard restarted from its checkpoint refuses
  every call (``awaiting_rollback``) until the coordinator has aligned the job (a restore).
"""
from __future__ import annotations

from ..proto.errors import RolledBack, Unavailable
from .stats import ShardStats


class Timeline:
    def __init__(self, shard_id: int, stats: ShardStats):
        self._shard_id, self._stats = shard_id, stats
        self.generation = 0  # bumped by every restore, copy or void: pushes waiting across one start over
        self.rolled_back_generation = 0  # the generation the last restore made (later bumps are not rollbacks)
        self.min_epoch = 0  # pushes naming an earlier membership epoch were rolled back
        self.rolled_back_to = 0  # the version of the last rollback
        self.awaiting_rollback = False  # restored at start-up; the coordinator has not aligned the others yet
        self.restored_from: int | None = None  # version restored at start-up

    def check(self, epoch: int | None) -> None:
        """Refuse calls that belong to a timeline this shard rolled away from (counted); ``epoch``
        None checks only that the shard's own state is current."""
        if self.awaiting_rollback:
            self._stats.rejected("awaiting_rollback")
            raise Unavailable(f"shard {self._shard_id} restarted from its checkpoint at version "
                              f"{self.restored_from} and waits for the coordinator to align the other shards; retry")
        if epoch is not None and epoch < self.min_epoch:
            self._stats.rejected(RolledBack.reason)
            raise RolledBack.at(self.rolled_back_to, self.min_epoch, f" (this call named epoch {epoch})")

    def rolled_back(self, during: str) -> RolledBack:
        """The error for a call voided by the last rollback (``during``: what it was doing)."""
        return RolledBack.at(self.rolled_back_to, self.min_epoch, during)

    def rolled_back_since(self, generation: int) -> bool:
        """Whether a restore happened after ``generation`` (else another void moved it on)."""
        return self.rolled_back_generation > generation

    def void(self) -> None:
        """The open steps are void (a replica stepped down): calls waiting in them wake and are refused."""
        self.generation += 1

    def restored(self, version: int, epoch: int = 0) -> None:
        """A restore to ``version``; with ``epoch`` a rollback: later calls must name at least that epoch."""
        self.generation += 1
        self.rolled_back_generation = self.generation
        if epoch:
            self.min_epoch, self.rolled_back_to = epoch, version
            self.awaiting_rollback = False

    def copied(self, min_epoch: int, rolled_back_to: int) -> None:
        """A whole copy from the primary: its fence, and the calls waiting here are void."""
        self.min_epoch, self.rolled_back_to = min_epoch, rolled_back_to
        self.awaiting_rollback = False
        self.generation += 1

    def started_from(self, version: int) -> None:
        """Built from a checkpoint of ``version`` (``ShardState.from_snapshot``; status reports it)."""
        self.restored_from = version

    def hold_until_aligned(self) -> None:
        """Restarted from this shard's own checkpoint: refuse every call until the coordinator has
        aligned the job (its rollback restores every shard, this one too)."""
        self.awaiting_rollback = True
