"""Checkpoints survive what disks and processes do to them: a writer SIGKILLed mid-write and a
full filesystem both leave the previous checkpoint intact and loadable, with a clear error."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, StepOpts, UpdateMode
from shardps.proto.plan import ShardRange
from shardps.server.checkpoint import CheckpointError, CheckpointStore
from shardps.server.modes import Push
from shardps.server.state import ShardState


def trained_state(numel=1000, steps=3):
    job = JobConfig(Layout.from_shapes([("w", (numel,), "float32")]), "adam", {"lr": 0.01}, UpdateMode.SYNC, 1)
    state = ShardState(ShardRange(0, 0, numel), job, "job-1", step_timeout=5)
    state.initialize(torch.linspace(-1, 1, numel))
    for step in range(steps):
        state.push(Push(0, step, 1, step, StepOpts(1), torch.full((numel,), 0.1 * (step + 1))), frozenset({0}))
    return state


def test_a_restored_shard_is_byte_identical_and_old_checkpoints_are_pruned(tmp_path):
    state = trained_state()
    store = CheckpointStore(tmp_path, keep=2)
    with state.cond:
        snap = state.checkpoint_snapshot()
    written = store.write(snap)
    assert written.path.name == "ckpt-000000000003.safetensors" and store.versions() == [3]
    fresh = ShardState.from_snapshot(store.load(3, shard_id=0))
    assert fresh.digest() == state.digest()  # parameters, Adam's moments and step, version, dedup table
    for v in (4, 5):
        snap.version = v
        store.write(snap)
    assert store.versions() == [4, 5]
    with pytest.raises(Exception, match="belongs to shard 0"):
        store.load(5, shard_id=1)


WRITER = textwrap.dedent("""
    import sys, torch
    from shardps.server.checkpoint import CheckpointStore, Snapshot
    store = CheckpointStore(sys.argv[1])
    def snap(version, numel):
        return Snapshot("job-1", b"", 0, 0, numel, version, {0: version - 1}, torch.full((numel,), float(version)),
                        {"exp_avg": torch.zeros(numel)})
    store.write(snap(1, 1000))
    print("one", flush=True)
    for v in range(2, 1000):
        store.write(snap(v, 32_000_000))  # 256 MB per file: seconds of writing and fsync
""")


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"one"
        deadline = time.monotonic() + 60
        while not any(".tmp-" in n for n in os.listdir(tmp_path)):  # version 2 is being written
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    store = CheckpointStore(tmp_path)
    assert any(".tmp-" in n for n in os.listdir(tmp_path))  # the torn file is there, under a temporary name
    newest = store.latest(shard_id=0)
    assert newest is not None and newest.version in (1, 2)
    assert torch.equal(newest.param, torch.full_like(newest.param, float(newest.version)))  # whole, not torn
    assert torch.equal(store.load(1).param, torch.full((1000,), 1.0))
    snap = store.load(1)
    snap.version = 7
    store.write(snap)  # the next write clears the leftovers
    assert not any(".tmp-" in n for n in os.listdir(tmp_path))


def test_a_full_filesystem_gives_a_clear_error_and_keeps_the_previous_checkpoint(tiny_fs):
    store = CheckpointStore(tiny_fs / "shard-0")
    small = trained_state(numel=1000)
    with small.cond:
        first = store.write(small.checkpoint_snapshot())
    big = trained_state(numel=100_000, steps=4)  # ~1.2 MB: does not fit in 256 kB
    with big.cond:
        snap = big.checkpoint_snapshot()
    snap.shard_id = 0
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoints are intact"):
        store.write(snap)
    assert store.versions() == [first.version]
    assert not [n for n in os.listdir(store.dir) if ".tmp-" in n]  # nothing half-written left behind
    assert ShardState.from_snapshot(store.load(first.version)).digest() == small.digest()


SHARDPS = [sys.executable, "-m", "shardps"]


def shardps(*args, timeout=120, cluster_token=""):
    env = {k: v for k, v in os.environ.items() if k != "SHARDPS_CLUSTER_TOKEN"}
    if cluster_token:
        env["SHARDPS_CLUSTER_TOKEN"] = cluster_token  # checkpoints and fault injection are an operator's calls
    return subprocess.run([*SHARDPS, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_shardps_checkpoint_and_chaos_commands_against_a_live_cluster_with_a_disk_that_fills_up(
        tiny_fs, run_workers):
    import json

    from shardps import LocalCluster

    with LocalCluster(servers=2, checkpoint_dir=tiny_fs) as cluster:
        run_workers(cluster, 2, steps=10)
        res = shardps("checkpoint", "--cluster", cluster.address)  # a worker's credential: refused
        assert res.returncode == 1 and "PERMISSION_DENIED" in res.stderr and "SHARDPS_CLUSTER_TOKEN" in res.stderr
        token = cluster.admin_security.cluster_token
        res = shardps("checkpoint", "--cluster", cluster.address, cluster_token=token)
        assert res.returncode == 0, res.stderr
        written = json.loads(res.stdout)
        assert [w["version"] for w in written] == [10, 10] and all(w["bytes"] > 0 for w in written)

        res = shardps("chaos", "rpc", "--cluster", cluster.address, "--kind", "abort", "--method", "Pull",
                      "--status", "UNAVAILABLE", "--probability", "0.5", cluster_token=token)
        assert res.returncode == 0, res.stderr
        assert [r["kind"] for r in json.loads(res.stdout)["server-1"]["rules"]] == ["abort"]
        res = shardps("chaos", "rpc", "--cluster", cluster.address, "--kind", "explode", cluster_token=token)
        assert res.returncode == 1 and res.stderr.startswith("error: fault kind must be one of")
        res = shardps("chaos", "rpc", "--cluster", cluster.address, "--clear", cluster_token=token)
        assert res.returncode == 0 and json.loads(res.stdout)["server-0"]["rules"] == []

        free = os.statvfs(tiny_fs)
        (tiny_fs / "filler").write_bytes(b"\0" * max(0, free.f_bavail * free.f_frsize - 1024))
        shard_dir = tiny_fs / "shard-0"
        before = sorted(os.listdir(shard_dir))
        res = shardps("checkpoint", "--cluster", cluster.address, cluster_token=token)
    assert res.returncode == 1, res.stdout
    assert "RESOURCE_EXHAUSTED" in res.stderr and "previous checkpoints are intact" in res.stderr
    assert sorted(os.listdir(shard_dir)) == before  # nothing torn, nothing lost
    assert CheckpointStore(shard_dir).latest(shard_id=0).version == 10


def test_checkpoints_taken_while_pushes_keep_arriving_each_hold_exactly_one_version(tmp_path):
    """The checkpoint's bytes come from the shard's live tensors, not a copy: every file must still be
    the parameters, Adam's moments and dedup table of the one version it is named after."""
    import threading

    from shardps.server.checkpoint import Checkpointer

    numel = 300_000
    state = trained_state(numel, steps=1)
    store = CheckpointStore(tmp_path, keep=1000)
    checkpointer = Checkpointer(store)
    seen = {}

    def record(st):  # under the lock, at each new version: what a checkpoint of it must hold
        seen[st.version] = (st.param.clone(), st.optimizer.state_tensors(), dict(st.last_step))

    with state.cond:
        record(state)
        state.on_version = record
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(numel, generator=gen) for _ in range(4)]

    def pushes():
        for step in range(1, 80):
            state.push(Push(0, step, 1, step, StepOpts(1), grads[step % 4].clone()), frozenset({0}))

    pusher = threading.Thread(target=pushes)
    pusher.start()
    versions = set()
    while pusher.is_alive() or not versions:
        versions.add(checkpointer.request(state, 0, timeout=60).version)
    pusher.join(60)
    assert len(versions) >= 2 and state.version == 80  # checkpoints were taken between pushes
    for v in sorted(versions):
        snap = store.load(v, shard_id=0)
        param, optim_state, table = seen[v]
        assert torch.equal(snap.param, param), f"checkpoint {v}: parameters of another version"
        assert snap.optimizer_state.keys() == optim_state.keys()
        for key, value in optim_state.items():
            assert torch.equal(snap.optimizer_state[key], value), f"checkpoint {v}: {key} of another version"
        assert snap.last_step == table


def test_an_export_to_a_full_disk_is_resource_exhausted_naming_the_directory_and_leaves_nothing(tiny_fs):
    from shardps.proto.errors import SpillError

    state = trained_state(numel=100_000)  # 1.2 MB of parameters and Adam's moments: not in 256 kB
    before = state.digest()
    with pytest.raises(SpillError, match=f"could not be written to {tiny_fs}.*No space left on device"):
        state.export(str(tiny_fs))
    assert SpillError.code == "RESOURCE_EXHAUSTED" and os.listdir(tiny_fs) == []
    assert state.digest() == before
    version, spill, _ = trained_state(numel=1000).export(str(tiny_fs))  # a small one fits, and reads back
    with spill:
        chunks = list(spill.chunks(1000))
    assert version == 3 and [n for n, _ in chunks][:4] == ["param"] * 4 and os.listdir(tiny_fs) == []
