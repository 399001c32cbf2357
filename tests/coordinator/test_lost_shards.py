"""A replicated shard that lost every live copy, in-process: the placement's bookkeeping
(``coordinator/placement.py``) and the coordinator core's (``Coordinator._orphaned``, ``replica_calls``,
``restore_lost``); the processes-and-gRPC version of the story is tests/faults/test_lost_replicas.py."""
import dataclasses
import sys
import time
from pathlib import Path

import pytest

from shardps.coordinator.placement import Placement
from shardps.proto.errors import FailedPrecondition

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_coordinator import job, ready  # noqa: E402


def test_a_primary_that_restarts_with_no_backup_in_sync_leaves_its_shards_lost_until_they_go_home():
    p = Placement.initial(2, 2)  # shard 0 on [0, 1], shard 1 on [1, 0]
    p.learn_in_sync(0, {1})
    p.lose(0)  # shard 0 fails over to its in-sync backup; shard 1 loses its backup
    assert p.replicas == {0: [1], 1: [1]}
    p.heal({0}, 2, 2)  # server 0 back as a backup of both, no copy yet (not in sync)
    assert p.replicas == {0: [1, 0], 1: [1, 0]} and not any(p.in_sync.values())

    p.lose(1)  # a silent primary (perhaps paused, copies intact) with no in-sync backup keeps its shards
    assert p.replicas == {0: [1, 0], 1: [1, 0]} and p.lost == set()
    assert p.restarted(1) == {0, 1} and p.lost == {0, 1}  # restarted: its copies died with it
    assert Placement.from_dict(p.to_dict()).lost == {0, 1}  # journaled: a restarted coordinator restores them

    epoch = p.epoch
    assert p.restore_homes(2, 2)
    assert p.replicas == {0: [0, 1], 1: [1, 0]} and p.in_sync == {} and p.epoch == epoch + 1
    assert [(f.shard_id, f.from_server, f.to_server, f.reason) for f in p.failovers[-1:]] == [(0, 1, 0, "rollback")]
    assert not p.restore_homes(2, 2)  # already home and nothing in sync: no new epoch
    assert p.epoch == epoch + 1


def test_a_restarted_server_that_was_primary_of_nothing_loses_no_shard():
    p = Placement.initial(3, 2)
    p.learn_in_sync(0, {1})
    p.lose(0)  # shard 0 moved to server 1; server 0 was primary of nothing else
    assert p.restarted(0) == set() and p.lost == set()


def _replicated(min_workers):
    c = ready()
    reg = c.register_worker(dataclasses.replace(job(min_workers=min_workers), replicas=2))
    c.replica_calls()  # placing starts
    return c, reg


def test_a_started_jobs_shard_whose_only_holder_restarts_is_lost_and_its_job_gets_no_lease_until_restored():
    c, reg = _replicated(min_workers=1)  # one worker: training started (view 1)
    now = time.monotonic()  # shard 0's backup (server 1) is in sync; shard 1's (server 0) is not yet
    c.replicas_renewed({0: (now, [(reg.job_id, 0, ["127.0.0.1:7101"], [])]), 1: (now, [])})
    c.register_server("127.0.0.1:7101", 1)  # server 1 restarts: shard 1's only copy died with it
    placement = c.named("").placement
    assert placement.lost == {1} and placement.primary(0) == 0
    assert all(rows == [] for _, rows in c.replica_calls().values())  # every server called, no job row: no lease
    assert c.restore_lost() == []  # server 1 has not answered since its restart: nothing is restored yet


def test_before_training_starts_a_restarted_server_waits_for_the_upload_and_loses_nothing():
    c, _ = _replicated(min_workers=2)  # one of two workers: no view yet (the upload may still come)
    c.register_server("127.0.0.1:7100", 0)
    assert c.named("").placement.lost == set()
    assert any(rows for _, rows in c.replica_calls().values())


class Disks:
    """Shard servers as the coordinator sees them, each with a disk of its own (as with docker-compose's and
    Kubernetes' volumes): which checkpoints of which shard each server wrote, the version of each replica it
    holds, and the rollbacks and placements it was sent."""

    def __init__(self, versions: dict[tuple[str, int], int], disks: dict[tuple[str, int], list[int]]):
        self.versions, self.disks = versions, disks  # (address, shard) -> live version / checkpoint versions
        self.rollbacks: list[tuple[str, int, int]] = []  # (address, shard, version)
        self.placed: list[str] = []

    def own(self, address: str) -> int:
        return int(address.rsplit(":", 1)[1]) - 7100

    def checkpoints(self, address, job_id, shard_id=None, job_name=""):
        from shardps.coordinator.shards import Checkpoints

        shard = self.own(address) if shard_id is None else shard_id
        return Checkpoints(list(self.disks.get((address, shard), [])), self.versions.get((address, shard), 0))

    def set_replicas(self, address, rows, lease_s, timeout, lease_from=None):
        self.placed.append(address)
        return [], None

    def rollback(self, address, job_id, version, epoch, shard_id=None):
        shard = self.own(address) if shard_id is None else shard_id
        if version not in self.disks.get((address, shard), []):
            raise FailedPrecondition(f"{address} has no checkpoint of shard {shard} at version {version}")
        self.rollbacks.append((address, shard, version))
        before, self.versions[address, shard] = self.versions.get((address, shard), 0), version
        return before

    def set_membership(self, address, job_id, view, from_open_step):
        return True, 0


A, B = "127.0.0.1:7100", "127.0.0.1:7101"


def _lost_after_failover():
    """Server 0 restarted (shard 0 failed over to server 1, which then checkpointed it on its own disk), was
    placed back as the backup of both shards, and server 1 restarted before it sent a copy: both lost."""
    c, reg = _replicated(min_workers=1)
    now = time.monotonic()
    c.replicas_renewed({0: (now, [(reg.job_id, 0, [B], [])]), 1: (now, [])})  # shard 0's backup is in sync
    c.register_server(A, 0)  # server 0 restarted: shard 0 fails over to server 1
    c.replicas_renewed({0: (time.monotonic(), []), 1: (time.monotonic(), [])})  # server 0 placed back as a backup
    assert c.named("").placement.replicas == {0: [1, 0], 1: [1, 0]}
    c.register_server(B, 1)  # server 1 restarted before server 0 had a copy: no live copy of either shard
    c.replicas_renewed({0: (time.monotonic(), []), 1: (time.monotonic(), [])})
    assert c.named("").placement.lost == {0, 1}
    return c


def test_a_lost_shard_is_restored_from_the_server_that_holds_the_newest_checkpoint_common_to_the_job():
    # Server 0's disk has shard 0 up to version 10 (it lost the shard there); server 1, its primary since,
    # checkpointed it at 20, 25, 30 on its own disk. Restoring shard 0 from its home server's checkpoints
    # would find no version in common with shard 1's (20, 25, 30) and stall the job forever.
    c = _lost_after_failover()
    c.shards = disks = Disks({}, {(A, 0): [0, 5, 10], (B, 0): [20, 25, 30], (B, 1): [20, 25, 30]})
    [record] = c.restore_lost()
    assert record.to_version == 30
    assert sorted(disks.rollbacks) == [(B, 0, 30), (B, 1, 30)]  # both from server 1's disk, by shard id
    placement = c.named("").placement
    assert placement.replicas == {0: [1, 0], 1: [1, 0]} and placement.lost == set()  # server 1 serves both
    assert [s.address for s in c.named("").plan] == [B, B]
    assert c.named("").latest().start_step == 30  # the workers replay from the restored step


def test_a_lost_shard_goes_home_when_its_home_server_holds_the_common_checkpoint():
    c = _lost_after_failover()
    c.shards = disks = Disks({}, {(A, 0): [20, 25], (B, 0): [15, 20, 25], (B, 1): [25, 30]})
    [record] = c.restore_lost()
    assert record.to_version == 25  # shard 0 has nothing at 30: 25 is the newest version both shards have
    assert sorted(disks.rollbacks) == [(A, 0, 25), (B, 1, 25)]  # shard 0 from its home disk, which has it
    assert c.named("").placement.replicas == {0: [0, 1], 1: [1, 0]}
    assert [(f.shard_id, f.from_server, f.to_server, f.reason) for f in c.named("").placement.failovers[-1:]] == \
        [(0, 1, 0, "rollback")]


def test_with_no_version_common_to_every_shard_the_restore_names_what_each_server_holds_and_changes_nothing():
    c = _lost_after_failover()
    c.shards = disks = Disks({}, {(A, 0): [5, 10], (B, 0): [20], (B, 1): [25, 30]})
    before = c.named("").placement.to_dict()
    with pytest.raises(FailedPrecondition, match=r"shard 0 has \[5, 10\] on server 0, \[20\] on server 1"):
        c.restore_lost()
    assert disks.rollbacks == [] and c.named("").placement.to_dict() == before  # tried again on the next call


def test_a_view_after_a_restart_starts_at_the_shards_step_not_at_an_empty_replicas_zero():
    # Server 1 restarted and waits for its copy of shard 1 as a backup (its replica: version 0); server 0 is
    # primary of both shards at 321. A worker's lease runs out: the view that removes it starts at the open
    # step of the shards (their primaries'), not at "step 0".
    c, reg = _replicated(min_workers=1)
    now = time.monotonic()
    c.replicas_renewed({0: (now, []), 1: (now, [(reg.job_id, 1, [A], [])])})  # shard 1's backup is in sync
    c.register_server(B, 1)  # server 1 restarted: shard 1 fails over to server 0; server 1 comes back a backup
    c.replicas_renewed({0: (time.monotonic(), []), 1: (time.monotonic(), [])})
    assert c.named("").placement.replicas == {0: [0, 1], 1: [0, 1]}
    c.shards = Disks({(A, 0): 321, (A, 1): 321, (B, 0): 0, (B, 1): 0}, {})
    c.register_worker(dataclasses.replace(job(min_workers=1), replicas=2))  # a second worker joins ...
    joined = c.reconfigure()
    assert [v.epoch for v in joined] == [2] and joined[0].start_step > 321  # ... a few steps past the shards' step
    c.named("").last_seen[reg.worker_id] = time.monotonic() - 10 * c.lease_s  # the first one's lease ran out
    [view] = c.reconfigure()
    assert (view.epoch, view.start_step) == (3, 321)
