"""A shard server SIGKILLed in the middle of a sync run and restarted: it restores its checkpoint,
the coordinator rolls the other shard back to the same step, the workers replay the undone steps,
and the run ends exactly where the fault-free run ends."""
import json
import sys
import time
from pathlib import Path

import pytest

from shardps import LocalCluster
from shardps.chaos.checker import check_run
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
        verdict = check_run(cluster.history_dir)  # the cluster's own log folder goes with it
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
    # The recorded history says the same, event by event: every push applied once per timeline, every
    # acknowledged version kept or undone by the recorded rollback, one primary at a time.
    assert verdict.ok, verdict.violations
    assert verdict.counts["rollbacks"] >= 2  # the restart's checkpoint, the coordinator's rollback of both shards
    assert verdict.counts["updates"] >= 2 * STEPS + shards[0]["steps_rolled_back"]  # replays are updates too
    assert verdict.counts["acks"] >= 2 * 2 * STEPS  # two workers, two shards, every step (replays too)


@pytest.mark.slow
def test_a_server_killed_before_its_upload_landed_is_initialised_by_the_retry_not_declared_lost(tmp_path):
    import threading

    import torch

    from shardps import ShardedOptimizer, chaos

    with LocalCluster(servers=2, checkpoint_dir=tmp_path / "ckpt") as cluster:
        # server-1 refuses every upload (as if it died mid-transfer each time) while the job exists
        chaos.set_rpc_faults(cluster, "server-1", [chaos.FaultRule(kind="abort", method="InitShard")])
        model, made = torch.nn.Linear(6, 3), {}

        def construct():
            try:
                made["opt"] = ShardedOptimizer(model, cluster=cluster.address, lr=0.1, retry_timeout=90)
            except Exception as exc:  # noqa: BLE001 - the assertion below reports it
                made["error"] = exc

        t = threading.Thread(target=construct)
        t.start()
        deadline = time.monotonic() + 60
        while not chaos.get_rpc_faults(cluster, "server-1")["server-1"]["injected"]:
            assert time.monotonic() < deadline, "the upload never reached server-1"
            time.sleep(0.1)
        with CoordinatorClient(cluster.address, security=cluster.admin_security) as coord:
            assert coord.status().view.epoch > 0  # the job had started when the shard went down
        cluster.kill("server-1")
        cluster.restart("server-1")  # no checkpoint here: never initialised, so it waits for the upload
        t.join(120)
        assert "error" not in made, made.get("error")
        opt = made["opt"]
        for k in (0, 1):  # an acknowledged upload is on disk already
            assert (tmp_path / "ckpt" / f"shard-{k}" / "ckpt-000000000000.safetensors").exists()
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step(batch_size=4)
        assert opt.versions == [1, 1]
        opt.close()
