"""A shard server SIGKILLed in the middle of a sync run and restarted: it restores its checkpoint,
the coordinator rolls the other shard back to the same step, the workers replay the undone steps,
and the run ends exactly where the fault-free run ends."""
import json
import sys
import time
from pathlib import Path

import pytest

from shardps import LocalCluster
from shardps.client.sdk import cluster_status
from shardps.coordinator.client import CoordinatorClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rpc_and_process_faults import KWARGS, SIZES, STEPS, applied_pushes, assert_equals_fault_free_run, \
    wait_for_version  # noqa: E402


@pytest.mark.slow
def test_sigkill_a_server_mid_run_restart_it_and_the_job_rolls_back_and_finishes_exactly(spawn_workers, tmp_path):
    with LocalCluster(servers=2, checkpoint_every=5, checkpoint_dir=tmp_path / "ckpt") as cluster:
        workers = spawn_workers(cluster, 2, optimizer="adam", kwargs=json.dumps(KWARGS),
                                sizes=",".join(map(str, SIZES)), steps=STEPS, sleep=0.05, retry_timeout=120)
        wait_for_version(cluster, 12)
        cluster.kill("server-1")
        killed_at = max(s.get("version", 0) for s in cluster_status(cluster.address)["shards"] if "version" in s)
        time.sleep(1.0)  # workers keep retrying against the dead address
        cluster.restart("server-1")
        results = workers.wait()
        with CoordinatorClient(cluster.address) as coord:
            rollbacks = list(coord.status().rollbacks)
        shards = cluster_status(cluster.address)["shards"]
    assert len(rollbacks) == 1
    rb = rollbacks[0]
    assert rb.shard_id == 1 and rb.to_version % 5 == 0 and rb.to_version >= 10
    assert rb.from_version >= killed_at and rb.from_version - rb.to_version >= 1  # the report states what was undone
    assert all(r["rollbacks"] == 1 for r in results)
    assert all(s["version"] == STEPS for s in shards)
    # The surviving shard applied the undone steps twice (once before the rollback), the restarted one
    # once from its checkpoint on; neither ever applied a push twice within one timeline.
    assert shards[0]["steps_rolled_back"] == rb.from_version - rb.to_version
    assert applied_pushes(shards[0]) == 2 * (STEPS + shards[0]["steps_rolled_back"])
    assert_equals_fault_free_run(results)
