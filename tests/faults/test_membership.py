"""Workers die and join while a sync job trains: leases expire, views change at step boundaries
that every shard agrees on, and a replacement is used (real processes, SIGKILL)."""
import json
import sys
from pathlib import Path

import pytest

from shardps import LocalCluster, chaos
from shardps.runtime.faults import FaultRule
from shardps.client.sdk import shard_status
from shardps.coordinator.client import CoordinatorClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from waiting import wait_until  # noqa: E402

STEPS = 300


def view_with(coord, n):
    view = coord.status().view
    return view if len(view.members) == n else None


def versions(cluster):
    return [shard_status(a).version for a in cluster.server_addresses.values()]


@pytest.mark.slow
def test_a_killed_worker_is_removed_when_its_lease_runs_out_and_a_replacement_joins_and_is_used(spawn_workers):
    opts = dict(optimizer="adam", kwargs=json.dumps({"lr": 0.01}), sizes="16,16,16", steps=STEPS, sleep=0.05,
                min_workers=2)
    with LocalCluster(servers=2, lease_seconds=3.0) as cluster, CoordinatorClient(cluster.address) as coord:
        first = spawn_workers(cluster, 3, **opts)  # training starts with 2; the third joins the running job
        view = wait_until(lambda: view_with(coord, 3), what="3 members")
        assert view.epoch == 2 and view.start_step > 0
        wait_until(lambda: min(versions(cluster)) >= view.start_step + 5, what="training with 3")

        victim = max(view.members, key=lambda m: m.worker_id)
        pid = int(victim.name.rsplit(":", 1)[1])  # workers are named host:pid
        proc = next(p for p, _ in first.procs if p.pid == pid)
        proc.kill()
        proc.wait()
        wait_until(lambda: victim.worker_id in coord.status().expired_worker_ids, timeout=60,
                   what="the lease to run out")
        st = coord.status()
        assert victim.worker_id not in {m.worker_id for m in st.view.members} and len(st.view.members) == 2
        removed = st.view
        wait_until(lambda: min(versions(cluster)) >= removed.start_step + 5, what="the survivors to go on")

        replacement = spawn_workers(cluster, 1, **opts)
        joined = wait_until(lambda: view_with(coord, 3), timeout=60, what="the replacement to join")
        newcomer = max(m.worker_id for m in joined.members)
        assert newcomer > victim.worker_id and joined.epoch == removed.epoch + 1
        assert joined.start_step > removed.start_step
        for p, _ in first.procs:
            if p is not proc:
                assert p.wait(timeout=300) == 0
        assert replacement.procs[0][0].wait(timeout=300) == 0
        shards = [shard_status(a) for a in cluster.server_addresses.values()]
        counters = dict(coord.status().worker_counters)
    for s in shards:
        assert s.version == STEPS  # every step closed exactly once
        assert s.worker_last_step[newcomer] == STEPS - 1  # the replacement pushed every step to the end
        assert s.worker_last_step[victim.worker_id] < removed.start_step + 1  # nothing after its removal
    assert counters[newcomer].step == STEPS or counters[newcomer].step >= joined.start_step


@pytest.mark.slow
def test_a_worker_left_alone_by_workers_that_finished_is_told_at_once_instead_of_timing_out(spawn_workers):
    opts = dict(optimizer="sgd", kwargs=json.dumps({"lr": 0.1}), sizes="8,8,8", min_workers=2)
    with LocalCluster(servers=2, lease_seconds=3.0) as cluster, CoordinatorClient(cluster.address) as coord:
        long = spawn_workers(cluster, 1, steps=400, step_timeout=300, **opts)  # this one wants 400
        # It registers first, so it is in the job whenever the others finish (were it still starting up by
        # then, it would find nobody to train with and only wait for min_workers).
        wait_until(lambda: len(coord.status().pending) == 1, timeout=120, what="the long worker to register")
        short = spawn_workers(cluster, 2, steps=10, **opts)  # these two finish after 10 steps and leave
        short.wait(timeout=120)
        proc, log = long.procs[0]
        code = proc.wait(timeout=120)  # far less than its step timeout and retries (minutes)
        log.close()
        text = long.logs[0].read_text()
    assert code != 0 and "cannot close" in text and "left" in text and "min_workers 2" in text


@pytest.mark.slow
def test_a_worker_whose_last_reply_is_lost_after_the_others_finished_gets_it_and_is_stopped_only_at_the_next_step(
        spawn_workers):
    # The short worker trains one step and leaves; the long one's push of that step is applied but its
    # replies are lost for several retries. The job is then "abandoned" (1 of min_workers 2), yet that
    # step closed: the long worker must get its reply (a duplicate answer) and stop only at step 1,
    # which nobody else will push. It used to stop at step 0, saying a closed step could not close.
    opts = dict(optimizer="sgd", kwargs=json.dumps({"lr": 0.1}), sizes="8,8", min_workers=2, step_timeout=300)
    with LocalCluster(servers=2, lease_seconds=3.0) as cluster, CoordinatorClient(cluster.address) as coord:
        long = spawn_workers(cluster, 1, steps=5, **opts)
        pending = wait_until(lambda: coord.status().pending, timeout=120, what="the long worker to register")
        chaos.set_rpc_faults(cluster, "servers", [FaultRule(kind="abort", method="Push", status="UNAVAILABLE",
                                                            worker_id=pending[0].worker_id, after=True,
                                                            max_count=9)])  # ~4 s of retries per shard
        short = spawn_workers(cluster, 1, steps=1, **opts)
        short.wait(timeout=120)
        proc, log = long.procs[0]
        code = proc.wait(timeout=120)
        log.close()
        text = long.logs[0].read_text()
        closed = versions(cluster)
    assert closed == [1, 1]  # step 0 closed (the long worker's push was applied, once)
    assert code != 0 and "step 1 of job 'default' cannot close" in text, text[-3000:]
    assert "step 0 of job" not in text


@pytest.mark.slow
def test_every_worker_killed_and_replaced_and_the_new_ones_take_the_job_from_its_open_step(spawn_workers):
    opts = dict(optimizer="adam", kwargs=json.dumps({"lr": 0.01}), sizes="16,16", steps=STEPS, sleep=0.05,
                min_workers=2, step_timeout=60)
    with LocalCluster(servers=2, lease_seconds=3.0) as cluster, CoordinatorClient(cluster.address) as coord:
        first = spawn_workers(cluster, 2, **opts)
        wait_until(lambda: min(versions(cluster)) >= 10, what="training")
        first.kill()  # SIGKILL: nobody is left in the job
        dead = {m.worker_id for m in coord.status().view.members}
        wait_until(lambda: all(coord.status().heartbeat_age_s[w] > 4.0 for w in dead), timeout=60,
                   what="both leases (3 s) to run out")
        stopped = versions(cluster)
        replacements = spawn_workers(cluster, 2, **opts)

        def newcomers():
            view = coord.status().view
            ids = {m.worker_id for m in view.members}
            return view if len(ids) == 2 and not ids & dead else None

        joined = wait_until(newcomers, timeout=60, what="the replacements to join")
        assert joined.start_step <= max(stopped)  # the open step: nobody else could close the ones after it
        for proc, _ in replacements.procs:
            assert proc.wait(timeout=300) == 0, [log.read_text()[-2000:] for log in replacements.logs]
        shards = [shard_status(a) for a in cluster.server_addresses.values()]
    for s in shards:
        assert s.version == STEPS  # the new workers took the job from where it stopped to the end
