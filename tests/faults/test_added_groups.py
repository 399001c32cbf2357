"""Param groups added mid-run (``add_param_group``: each is a job ``<job>.g<k>`` of its own) under
faults, with real processes and real gRPC: a server restart rolls the job and its added group back to
one step (their checkpoints line up), and a worker that joins after a group was added is refused
with the fix instead of training without the group. Each compares with the same training in one
process with torch.optim (tests/helpers/group_worker.py)."""
import signal
import sys
from pathlib import Path

import pytest
import torch

from shardps import LocalCluster
from shardps.client.sdk import cluster_status
from shardps.coordinator.client import CoordinatorClient
from shardps.proto.assemble import model_state_dict
from shardps.proto.errors import ShardpsError
from shardps.server.checkpoint import CheckpointStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from group_worker import reference  # noqa: E402
from waiting import wait_until  # noqa: E402

JOB, ADD_AT, STEPS, EVERY = "unfreezing", 6, 24, 4  # the group is added between two checkpoints (4 and 8)
GROUP_JOB = f"{JOB}.g2"


def version(cluster, job):
    """The lowest version of ``job``'s shards (None while a call fails on a busy machine, or no such job)."""
    try:
        shards = cluster_status(cluster.address, job)["shards"]
    except ShardpsError:
        return None
    found = [s["version"] for s in shards if "version" in s]
    return min(found) if found and len(found) == len(shards) else None


def assert_state_equal(got, want, what):
    for name, tensor in got.items():
        assert torch.allclose(tensor, want[name], atol=1e-5, rtol=0), \
            f"{what}: {name} is {(tensor - want[name]).abs().max():.3g} off torch's"


def checkpointed_state(coord, root, job, at):
    """``job``'s parameters in its checkpoints of version ``at`` (every shard's), by name."""
    _, config, plan = coord.job(name=job)
    flat = torch.zeros(config.layout.numel)
    for shard in plan:
        k = shard.range.shard_id
        snap = CheckpointStore(root / f"job-{job}" / f"shard-{k}").load(at, k)
        flat[snap.start:snap.stop] = snap.param
    return model_state_dict(config.layout, flat)


@pytest.mark.slow
def test_a_server_restart_rolls_a_job_and_its_added_group_back_to_one_step_and_the_run_ends_as_torch(
        spawn_workers, tmp_path):
    want = reference(STEPS, ADD_AT)
    ckpt = tmp_path / "ckpt"
    # Leases outlast the pause below: the restart's rollback is the only membership change.
    with LocalCluster(servers=2, checkpoint_every=EVERY, checkpoint_dir=ckpt, lease_seconds=60.0) as cluster, \
            CoordinatorClient(cluster.address) as coord:
        workers = spawn_workers(cluster, 2, script="group_worker.py", job=JOB, steps=STEPS, add_at=ADD_AT, sleep=0.05)
        wait_until(lambda: (version(cluster, JOB) or 0) >= 11 and (version(cluster, GROUP_JOB) or 0) >= 1,
                   timeout=80, what="training past the next checkpoint after the group was added")
        for proc, _ in workers.procs:  # held still: nothing checkpoints over the rollback's step meanwhile
            proc.send_signal(signal.SIGSTOP)
        try:
            cluster.kill("server-1")
            cluster.restart("server-1")
            wait_until(lambda: coord.status(JOB).rollbacks and coord.status(GROUP_JOB).rollbacks, timeout=60,
                       what="the restarted server's rollback")
            (parent,), (group,) = coord.status(JOB).rollbacks, coord.status(GROUP_JOB).rollbacks
            # One step for both, at or after the step the group was added: the optimizer as torch had it then.
            assert parent.to_version == group.to_version >= ADD_AT
            at = parent.to_version
            assert_state_equal(checkpointed_state(coord, ckpt, JOB, at), want[at], f"{JOB} at step {at}")
            assert_state_equal(checkpointed_state(coord, ckpt, GROUP_JOB, at), want[at], f"{GROUP_JOB} at step {at}")
        finally:
            for proc, _ in workers.procs:
                proc.send_signal(signal.SIGCONT)
        results = workers.wait(timeout=120)
    for r in results:  # each replayed the undone steps once, the group's job in step with the job's
        assert r["rollbacks"] == 1 and r["group_rollbacks"] == [1] and r["group_steps"] == [STEPS]
        assert r["steps"].count(at) == 2
        assert_state_equal(r["model"], want[STEPS], f"rank {r['rank']} after {STEPS} steps")


@pytest.mark.slow
def test_a_worker_joining_after_a_group_was_added_is_refused_with_the_fix_and_the_others_train_as_torch(
        spawn_workers, tmp_path):
    want = reference(40, 3)
    with LocalCluster(servers=2) as cluster, CoordinatorClient(cluster.address) as coord:
        first = spawn_workers(cluster, 2, script="group_worker.py", job="late", steps=40, add_at=3, sleep=0.05)
        wait_until(lambda: (version(cluster, "late.g2") or 0) >= 5, timeout=80, what="the group added and training")
        late = spawn_workers(cluster, 1, script="group_worker.py", job="late", steps=40, add_at=3)
        (refused,) = late.wait(timeout=60)
        members = [m.worker_id for m in coord.status("late").view.members]
        results = first.wait(timeout=120)
    assert refused["rank"] == -1, "the late worker trained without the group"
    error = refused["error"]
    assert error.startswith("FailedPrecondition") and "late.g2" in error and "added before step 3" in error
    assert "2.weight, 2.bias" in error and "start every worker before add_param_group" in error
    assert len(members) == 2  # it never became a member: the job went on as it was
    for r in results:
        assert_state_equal(r["model"], want[40], f"rank {r['rank']}")
