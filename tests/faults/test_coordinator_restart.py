"""The coordinator is durable: SIGKILL it mid-run and restart it, and the same job goes on (workers and
servers reattach by themselves, status and close() work); a default LocalCluster survives SIGKILL of
each of its roles in turn and ends exactly where the fault-free run ends."""
import json
import sys
import time
from pathlib import Path

import pytest

from shardps import LocalCluster
from shardps.client.sdk import cluster_status

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rpc_and_process_faults import KWARGS, SIZES, reference, wait_for_version  # noqa: E402

STEPS = 200  # long enough that the job is still running through every restart (10 s of sleeps alone)


def run_opts(steps=STEPS):
    return dict(optimizer="adam", kwargs=json.dumps(KWARGS), sizes=",".join(map(str, SIZES)), steps=steps,
                sleep=0.05, retry_timeout=120)


def assert_equals_fault_free_run(results, steps=STEPS):
    ref, _ = reference(results[0]["initial"], "adam", KWARGS, SIZES, False, steps)
    for r in results:
        assert r["versions"] == [steps, steps]
        for key, value in ref.items():
            assert (r["final"][key] - value).abs().max().item() <= 1e-5, key


@pytest.mark.slow
def test_sigkill_the_coordinator_mid_run_restart_it_and_the_same_job_finishes_exactly(spawn_workers):
    with LocalCluster(servers=2) as cluster:
        workers = spawn_workers(cluster, 2, **run_opts())
        wait_for_version(cluster, 8)
        before = cluster_status(cluster.address)
        cluster.kill("coordinator")
        time.sleep(1.0)  # training goes on meanwhile: pushes never pass through the coordinator
        cluster.restart("coordinator")
        after = cluster_status(cluster.address)
        assert after["job_id"] == before["job_id"] and after["membership"]["epoch"] == before["membership"]["epoch"]
        assert after["coordinator_generation"] == before["coordinator_generation"] + 1
        results = workers.wait()  # every worker's close() left the job cleanly (exit code 0)
        final = cluster_status(cluster.address)
    assert sorted(final["membership"]["left"]) == sorted(m["worker_id"] for m in before["membership"]["workers"])
    assert all(r["rollbacks"] == 0 for r in results)  # nothing was undone
    assert_equals_fault_free_run(results)


@pytest.mark.slow
def test_the_coordinator_then_a_server_are_killed_and_restarted_and_the_job_rolls_back_and_finishes(spawn_workers):
    with LocalCluster(servers=2, checkpoint_every=5) as cluster:
        workers = spawn_workers(cluster, 2, **run_opts())
        wait_for_version(cluster, 8)
        cluster.kill("coordinator")
        cluster.restart("coordinator")
        wait_for_version(cluster, 24)
        cluster.kill("server-1")
        time.sleep(0.5)
        cluster.restart("server-1")  # restores its checkpoint and has the restarted coordinator roll back
        results = workers.wait()
        st = cluster_status(cluster.address)
    assert all(r["rollbacks"] == 1 for r in results)  # the kill came mid-run, and every worker went back
    assert len(st["rollbacks"]) == 1 and st["rollbacks"][0]["to_version"] % 5 == 0
    assert_equals_fault_free_run(results)


@pytest.mark.slow
def test_a_default_local_cluster_survives_sigkill_of_each_of_its_roles_in_turn(spawn_workers):
    steps = 150
    with LocalCluster(servers=2) as cluster:  # defaults: durable coordinator, checkpoints at 0 and every 100
        workers = spawn_workers(cluster, 2, **{**run_opts(steps), "sleep": 0.1})
        killed_at = {}
        for name, version in (("coordinator", 10), ("server-0", 30), ("server-1", 110)):
            wait_for_version(cluster, version, timeout=300)
            killed_at[name] = max(s.get("version", 0) for s in cluster_status(cluster.address)["shards"])
            cluster.kill(name)
            time.sleep(0.5)
            cluster.restart(name)
        results = workers.wait(timeout=600)
        st = cluster_status(cluster.address)
    # One rollback per server restart, to the newest checkpoint every shard has: 0 (unless the coordinator's
    # restart took so long that training passed step 100 meanwhile), then 100.
    first = 0 if killed_at["server-0"] < 100 else 100
    assert [r["to_version"] for r in st["rollbacks"]] == [first, 100]
    assert all(s["version"] == steps for s in st["shards"])
    assert_equals_fault_free_run(results, steps)
