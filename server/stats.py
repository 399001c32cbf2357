"""One shard's counters (``GetShardStatus``, the Prometheus gauges, the run's reports).

Invariant: every counter only grows, and only under the shard's lock (``ShardState.cond``):
the state and its update policy count through the methods below; readers (status, gauges)
copy what they need under that lock. A rejected call is counted once, by its typed reason
(``proto/errors.py``), and changes nothing else.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ShardStats:
    """Counters reported by GetShardStatus."""

    pushes_received: int = 0
    pushes_duplicate: int = 0
    pushes_dropped: int = 0  # late for a step that closed without them (backup workers)
    pushes_skipped: int = 0  # steps (sync) or pushes (async) skipped for an fp16 overflow
    bytes_in: int = 0
    bytes_out: int = 0
    shm_bytes_in: int = 0  # moved through a same-host worker's shared memory instead of gRPC
    shm_bytes_out: int = 0
    apply_seconds: float = 0.0
    parts_applied: int = 0  # parts of steps applied before their step closed (pushes in parts)
    wait_seconds: float = 0.0  # pushes held back by the sync barrier or the SSP bound, total
    last_push: dict[int, float] = field(default_factory=dict)  # worker_id -> Unix time of its last push
    staleness: Counter = field(default_factory=Counter)  # staleness value -> applied pushes
    rejections: Counter = field(default_factory=Counter)  # reason -> rejected calls
    rollbacks: int = 0  # times this shard was rolled back to a checkpoint
    steps_rolled_back: int = 0  # updates those rollbacks undid

    @property
    def pushes_rejected(self) -> int:
        return sum(self.rejections.values())

    # Each method below is called under the shard's lock.

    def rejected(self, reason: str) -> None:
        self.rejections[reason] += 1

    def received(self, worker_id: int, duplicate: bool) -> None:
        """A push passed its policy's check (a retry counts as a duplicate too)."""
        self.pushes_received += 1
        self.pushes_duplicate += duplicate
        self.last_push[worker_id] = time.time()

    def dropped(self) -> None:
        """A push late for a step that closed without it: answered, never applied."""
        self.pushes_dropped += 1

    def skipped(self) -> None:
        """A step (sync) or push (async) skipped for an fp16 overflow."""
        self.pushes_skipped += 1

    def taken(self, staleness: int) -> None:
        """A push that will be applied, ``staleness`` versions behind."""
        self.staleness[staleness] += 1

    def waited(self, seconds: float) -> None:
        self.wait_seconds += seconds

    def applied(self, seconds: float, part: bool = False) -> None:
        """Time in the optimizer: a whole step's, or (``part``) one part of a step applied early."""
        self.apply_seconds += seconds
        self.parts_applied += part

    def rolled_back(self, steps: int) -> None:
        self.rollbacks += 1
        self.steps_rolled_back += max(0, steps)

    def moved(self, received: int = 0, sent: int = 0, shm_received: int = 0, shm_sent: int = 0) -> None:
        """Bytes in and out, inside gRPC (or a byte link) and through shared memory."""
        self.bytes_in += received
        self.bytes_out += sent
        self.shm_bytes_in += shm_received
        self.shm_bytes_out += shm_sent
