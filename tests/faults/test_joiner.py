"""A worker joining a running sync job waits for the parameters of its join step. While it waits,
the membership can make it a member from an earlier step: a server restart rolls the job back
below the join step, or a dead worker's removal view starts at the open step. The joiner must
follow the newest view and push the step the shards now wait for, so the job finishes instead of
stopping until its timeouts run out (real processes, SIGSTOP/SIGKILL, a server restart)."""
import json
import sys
import signal
import time
from pathlib import Path

import pytest

from shardps import LocalCluster, chaos
from shardps.client.sdk import shard_status
from shardps.coordinator.client import CoordinatorClient
from shardps.proto.errors import ShardpsError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from waiting import wait_until  # noqa: E402

STEPS = 40
OPTS = dict(optimizer="adam", kwargs=json.dumps({"lr": 0.01}), sizes="16,16,16", steps=STEPS, min_workers=2,
            sleep=0.02, retry_timeout=120)
FINISH_S = 90  # the whole remaining run takes seconds; a joiner stuck on its old join step waits for minutes


def view_with(coord, n):
    view = coord.status().view
    return view if len(view.members) == n else None


def versions(cluster):
    """Every shard's version; None while a status call fails (a machine busy with other tests)."""
    try:
        return [shard_status(a).version for a in cluster.server_addresses.values()]
    except ShardpsError:
        return None


def reached(cluster, version):
    now = versions(cluster)
    return now is not None and min(now) >= version


def held_still(cluster):
    """The shards' versions once they have stopped moving for a second."""
    before = versions(cluster)
    time.sleep(1.0)
    return before if before is not None and versions(cluster) == before else None


def finish_or_fail(cluster, procs, joiner, what):
    """Every shard closes every step and every worker in ``procs`` exits 0; a hang fails after FINISH_S."""
    deadline = time.monotonic() + FINISH_S
    while not reached(cluster, STEPS):
        if time.monotonic() > deadline:
            raise AssertionError(f"the job stopped at versions {versions(cluster)} after {what}: the joiner does not "
                                 f"push the step the shards wait for. Its log:\n{joiner.logs[0].read_text()[-3000:]}")
        time.sleep(0.2)
    for proc, log in procs:
        assert proc.wait(timeout=60) == 0, log.name


def member(view, worker_id):
    return worker_id in {m.worker_id for m in view.members}


@pytest.mark.slow
def test_a_joiner_waiting_for_its_join_step_follows_a_rollback_below_it(spawn_workers, tmp_path):
    # Leases outlast the pause below: nobody is removed, only the rollback moves the joiner's step.
    with LocalCluster(servers=2, checkpoint_every=5, checkpoint_dir=tmp_path / "ckpt", lease_seconds=60.0) as cluster, \
            CoordinatorClient(cluster.address) as coord:
        first = spawn_workers(cluster, 2, **OPTS)
        wait_until(lambda: reached(cluster, 8), what="training with 2")
        for proc, _ in first.procs:  # hold the job still, so that nobody reaches the join step
            proc.send_signal(signal.SIGSTOP)
        try:
            held = wait_until(lambda: held_still(cluster), what="the shards to stop moving")
            joiner = spawn_workers(cluster, 1, **OPTS)
            joined = wait_until(lambda: view_with(coord, 3), what="the joiner's view")
            newcomer = max(m.worker_id for m in joined.members)
            assert max(held) < joined.start_step  # the joiner waits in its pull for a version nobody reaches yet
            time.sleep(1.0)  # let it get there
            cluster.kill("server-1")
            cluster.restart("server-1")  # restores its checkpoint; the coordinator rolls every shard back
            (rb,) = wait_until(lambda: list(coord.status().rollbacks), timeout=60, what="the rollback")
            latest = coord.status().view
            assert rb.to_version < joined.start_step and latest.start_step == rb.to_version
            assert member(latest, newcomer)  # a member from the rollback's step on
        finally:
            for proc, _ in first.procs:
                proc.send_signal(signal.SIGCONT)
        finish_or_fail(cluster, first.procs + joiner.procs, joiner, f"the rollback to step {rb.to_version}")
        shards = [shard_status(a) for a in cluster.server_addresses.values()]
    for s in shards:
        assert s.version == STEPS
        assert s.worker_last_step[newcomer] == STEPS - 1  # the joiner pushed to the end
    (result,) = joiner.wait(timeout=10)
    assert len(result["losses"]) == STEPS - rb.to_version  # it started at the rollback's step, not its join step


@pytest.mark.slow
def test_a_joiner_waiting_for_its_join_step_follows_a_dead_workers_removal_from_the_open_step(spawn_workers):
    with LocalCluster(servers=2, lease_seconds=5.0) as cluster, CoordinatorClient(cluster.address) as coord:
        first = spawn_workers(cluster, 2, **OPTS)
        wait_until(lambda: reached(cluster, 5), what="training with 2")
        victim = max(coord.status().view.members, key=lambda m: m.worker_id)
        pid = int(victim.name.rsplit(":", 1)[1])  # workers are named host:pid
        proc = next(p for p, _ in first.procs if p.pid == pid)
        # Shard 0 never answers the victim's pushes: it stays alive (its lease too), and no step closes
        # on shard 0 past the one it is in, so nobody reaches the join step.
        chaos.set_rpc_faults(cluster, "server-0", [chaos.FaultRule(kind="drop", method="Push",
                                                                   worker_id=victim.worker_id)])
        held = wait_until(lambda: held_still(cluster), what="the shards to stop moving")
        joiner = spawn_workers(cluster, 1, **OPTS)
        joined = wait_until(lambda: view_with(coord, 3), what="the joiner's view")
        newcomer = max(m.worker_id for m in joined.members)
        assert max(held) < joined.start_step
        time.sleep(1.0)  # the joiner waits in its pull
        proc.kill()
        proc.wait()
        wait_until(lambda: victim.worker_id in coord.status().expired_worker_ids, timeout=60,
                   what="the victim's lease to run out")
        removed = coord.status().view
        assert removed.start_step < joined.start_step and member(removed, newcomer)
        survivors = [(p, log) for p, log in first.procs if p is not proc]
        finish_or_fail(cluster, survivors + joiner.procs, joiner, f"the removal from step {removed.start_step}")
        shards = [shard_status(a) for a in cluster.server_addresses.values()]
    for s in shards:
        assert s.version == STEPS
        assert s.worker_last_step[newcomer] == STEPS - 1
