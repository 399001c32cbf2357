"""Placement bookkeeping for a replicated shard that lost every live copy (``coordinator/placement.py``);
the processes-and-gRPC version of the story is tests/faults/test_lost_replicas.py."""
from shardps.coordinator.placement import Placement


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
