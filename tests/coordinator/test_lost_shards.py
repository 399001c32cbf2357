"""A replicated shard that lost every live copy, in-process: the placement's bookkeeping
(``coordinator/placement.py``) and the coordinator core's (``Coordinator._orphaned``, ``replica_calls``,
``restore_lost``); the processes-and-gRPC version of the story is tests/faults/test_lost_replicas.py."""
import dataclasses
import sys
import time
from pathlib import Path

from shardps.coordinator.placement import Placement

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
