"""A replicated shard that loses every live copy (its primary dies while the restarted backup still waits
for its whole copy) is restored from checkpoints: the coordinator places every shard on its home server,
rolls the job back to the newest common checkpoint (a recorded rollback), and the job finishes where one
process on the union batch ends (real processes, real gRPC; chaos at scale found it stalling forever)."""
import json
import sys
from pathlib import Path

import pytest

from shardps import LocalCluster
from shardps.chaos.checker import check_run
from shardps.client.sdk import shard_status
from shardps.coordinator.client import CoordinatorClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from test_rpc_and_process_faults import KWARGS, SIZES, STEPS, assert_equals_fault_free_run  # noqa: E402
from waiting import wait_until  # noqa: E402

EVERY = 5  # checkpoint interval (versions)


def plan(coord):
    return {s.range.shard_id: s for s in coord.job()[2]}


def version(coord, shard):
    """The version of ``shard`` on its primary now (-1 while the job is not defined yet)."""
    info = plan(coord).get(shard)
    return shard_status(info.address, shard_id=shard).version if info else -1


def waits_for_copy(cluster, coord, server, shard):
    """``server`` is placed as a backup of ``shard`` and holds no copy of it yet."""
    info = plan(coord)[shard]
    here = cluster.server_address(server)
    return here in info.backups and not shard_status(here, shard_id=shard).initialized


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("own_disks", [False, True], ids=["shared-disk", "own-disks"])
def test_a_primary_killed_while_its_restarted_backup_waits_for_its_copy_is_restored_from_checkpoints(
        spawn_workers, tmp_path, own_disks):
    """server-0 is SIGKILLed: server-1 holds the only copy of both shards. server-1 is paused (it can
    send no copy) while server-0 restarts and is placed back as the backup of both; then server-1 is
    SIGKILLed and restarted. No live replica holds either shard: waiting for a copy would stall forever
    ("shard 0 was not initialised within 60s"); instead the job rolls back to a checkpoint. With a disk
    per server (as in a deployment) shard 0's newest checkpoints are on server-1's, which checkpointed it
    as its primary: the job rolls back to them, not to server-0's older ones (by then no step is common
    to those and shard 1's, which server-1 pruned past them: restoring from home would stall the job)."""
    # with own disks, checkpoints every 2 steps: server-1 prunes its 3 newest of shard 1 past server-0's within
    # the run's 30 steps
    every = 2 if own_disks else EVERY
    with LocalCluster(servers=2, checkpoint_every=every, checkpoint_dir=tmp_path / "ckpt", own_disks=own_disks,
                      log_dir=tmp_path / "logs") as cluster, CoordinatorClient(cluster.address) as coord:
        workers = spawn_workers(cluster, 2, optimizer="adam", kwargs=json.dumps(KWARGS),
                                sizes=",".join(map(str, SIZES)), steps=STEPS, replicas=2, sleep=0.05,
                                retry_timeout=120)
        wait_until(lambda: version(coord, 0) >= 12, what="step 12")
        cluster.kill("server-0")
        survivor = cluster.server_address(1)
        wait_until(lambda: all(s.address == survivor for s in plan(coord).values()), timeout=60,
                   what="both shards to fail over to server-1")
        killed_at = shard_status(survivor, shard_id=0).version
        if own_disks:  # server-1 checkpoints shard 0 past server-0's copies, and prunes shard 1 past them
            wait_until(lambda: version(coord, 0) >= killed_at + 4 * every, timeout=60, what="more steps on server-1")
        cluster.pause("server-1")  # the only copies: they cannot be sent while it is stopped
        cluster.restart("server-0")
        wait_until(lambda: all(waits_for_copy(cluster, coord, 0, k) for k in (0, 1)), timeout=60,
                   what="the restarted server-0 to wait for its copies as a backup")
        cluster.kill("server-1")  # the primary dies before it sent a copy
        cluster.restart("server-1")
        results = workers.wait(timeout=240)

        def copies_agree():
            for shard, info in plan(coord).items():
                copies = [shard_status(a, shard_id=shard, digest=True) for a in (info.address, *info.backups)]
                if len(copies) != 2 or len({(c.version, c.state_digest) for c in copies}) != 1:
                    return False
            return True

        wait_until(copies_agree, timeout=60, what="every shard's two copies to agree")
        status = coord.status()
        verdict = check_run(cluster.history_dir)
    assert len(status.rollbacks) == 1
    rb = status.rollbacks[0]
    rollback_moves = [(f.shard_id, f.to_server, f.reason) for f in status.failovers if f.reason == "rollback"]
    if own_disks:
        assert rb.to_version % every == 0 and rb.to_version > killed_at + every  # server-1's checkpoints
        assert rollback_moves == []  # shard 0 was restored where its checkpoint was: on server-1, its primary
    else:
        assert rb.to_version % EVERY == 0 and 10 <= rb.to_version <= killed_at
        assert rollback_moves == [(0, 0, "rollback")]  # shard 0 went home to server-0 (shard 1's home, server-1,
        # held it already)
    assert all(r["rollbacks"] == 1 for r in results)
    assert_equals_fault_free_run(results)  # the undone steps were replayed: nothing lost, nothing doubled
    assert verdict.ok, verdict.violations  # the rollback is recorded: versions made again after it are legal
    assert verdict.counts["rollbacks"] >= 2
