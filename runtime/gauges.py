"""What a role tells its metrics collector at a scrape: plain, frozen copies of its counters.

A role builds these under its own lock (``ShardNode.gauges``, ``Coordinator.gauges``) and
``runtime.metrics`` turns them into Prometheus families, so the metrics code never walks a
role's state or takes its lock. Nothing here imports gRPC or Prometheus: the cores that
build them stay plain Python.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

PUSH_OUTCOMES = ("received", "duplicate", "dropped", "skipped", "rejected")


@dataclass(frozen=True)
class ShardGauges:
    """One job's shard on one server, copied at one instant (the server takes its own lock)."""

    shard: int
    job: str
    version: int
    epoch: int  # newest membership epoch the shard knows
    pushes: Mapping[str, int]  # PUSH_OUTCOMES -> pushes
    bytes_in: int
    bytes_out: int
    shm_bytes_in: int
    shm_bytes_out: int
    apply_seconds: float
    wait_seconds: float
    rollbacks: int
    steps_rolled_back: int
    checkpoints: int
    checkpoint_failures: int
    staleness: Mapping[int, int] = field(default_factory=dict)  # staleness -> applied pushes


@dataclass(frozen=True)
class JobGauges:
    """One job at the coordinator, copied at one instant (the coordinator takes its own lock)."""

    job: str
    epoch: int
    members: int
    pending: int  # registered, not yet in a view
    lease_expiries: int
    rollbacks: int
    steps_rolled_back: int
    worker_faults: Mapping[int, Mapping[str, int]] = field(default_factory=dict)  # worker -> counter -> n
