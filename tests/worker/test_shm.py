"""The same-host byte path: gradients and parameters through a shared-memory segment, with gRPC
carrying the headers. Same training as over gRPC, observable per worker, falls back by itself,
and a killed worker's segment does not outlive its lease."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shardps import LocalCluster, ShardedOptimizer
from shardps.client.sdk import shard_status
from shardps.runtime import shm
from shardps.runtime.shm import Segment, SegmentFile, ShmUnavailable
from shardps.worker.flat import FlatParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from shm_pair import train_pair  # noqa: E402
from task import global_batch, loss_fn, make_model  # noqa: E402

@pytest.mark.slow
def test_same_host_workers_push_through_shared_memory_and_train_exactly_as_over_grpc():
    runs = {}
    for transport in ("auto", "grpc"):
        with LocalCluster(servers=2, durable=False) as cluster:
            runs[transport] = train_pair(cluster, transport)
    (shm_results, shm_paths), (grpc_results, grpc_paths) = runs["auto"], runs["grpc"]
    assert all(flags == [True, True] for _, flags in shm_results.values())
    assert all(set(t.values()) == {"shm"} for t in shm_paths) and all(set(t.values()) == {"grpc"} for t in grpc_paths)
    for key, value in grpc_results[0][0].items():
        assert torch.equal(shm_results[0][0][key], value), key  # bit for bit the same training
    assert not ours()  # both workers closed: no segment of theirs is left


@pytest.mark.slow
def test_a_push_given_up_before_its_server_answered_leaves_the_segment_that_server_may_still_write_into():
    """A server answers a push through shared memory by writing straight into the worker's memory,
    and it may do so long after the worker gave the call up (its deadline passed, its shard moved,
    its primary was paused and woke): then it writes parameters the model has moved on from. So a
    worker that gave a push up moves its model to a new segment before the step returns; whatever
    is written into the old one later (done here by the test, mapping it as a server does) no longer
    reaches the model. A push the server answered with an error (its handler ended) moves nothing."""
    from shardps import chaos
    from shardps.runtime.faults import FaultRule

    def train_step(opt, model, step):
        x, y = global_batch(step, 24)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()

    with LocalCluster(servers=2, durable=False) as cluster:
        model = make_model(0)
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=0.01, min_workers=1,
                               step_timeout=1.0)
        try:
            train_step(opt, model, 0)
            first = opt.flat.segment
            late_writer = SegmentFile.open(first.name, first.nonce, first.numel)  # what a server holds

            chaos.set_rpc_faults(cluster, "servers", [FaultRule(kind="abort", method="Push", worker_id=opt.worker_id,
                                                                max_count=1)])
            train_step(opt, model, 1)  # refused once, by the server itself: nothing of that call runs on
            assert opt.retry.stats.as_dict()["retries"] >= 1 and opt.flat.segment is first

            chaos.set_rpc_faults(cluster, "servers", [FaultRule(kind="delay", method="Push", worker_id=opt.worker_id,
                                                                delay_s=3.0, max_count=1)], clear=True)
            train_step(opt, model, 2)  # one push is held past its 1 s deadline and given up; the retry is applied
            assert opt.retry.stats.as_dict()["timeouts"] >= 1
            late_writer.write_values(0, torch.full((first.numel,), float("nan")))  # the held server wakes, replies
            late_writer.retire()
            pulled = opt.model_state_dict()
            for key, value in model.state_dict().items():
                assert torch.equal(value, pulled[key]), key  # the shards' parameters, untouched by the late write
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            assert opt.flat.segment is not first and not os.path.exists(first.path)  # its name is gone too

            train_step(opt, model, 3)  # training goes on through the new segment
            for address in cluster.server_addresses.values():
                assert dict(shard_status(address).worker_transport)[opt.worker_id] == "shm"
            assert all(torch.isfinite(p).all() for p in model.parameters())
        finally:
            opt.close()
        assert not ours()


@pytest.mark.slow
def test_a_server_that_cannot_open_the_segment_takes_the_same_push_on_its_byte_link():
    with LocalCluster(servers=2, durable=False) as cluster:
        results, transports = train_pair(cluster, "auto", sabotage=True)
    assert all(flags == [False, False] for _, flags in results.values())  # refused once, then the link
    assert all(set(t.values()) == {"tcp"} for t in transports)  # (what another host's server gets)
    with LocalCluster(servers=2, durable=False) as cluster:
        plain, _ = train_pair(cluster, "grpc")
    for key, value in plain[0][0].items():
        assert torch.equal(results[0][0][key], value), key


@pytest.mark.slow
def test_a_killed_workers_segment_is_unlinked_once_its_lease_runs_out(tmp_path):
    helpers = Path(__file__).resolve().parents[1] / "helpers"
    before = set(glob.glob(f"{shm.SHM_DIR}/shardps-*"))
    with LocalCluster(servers=2, lease_seconds=2.0, durable=False) as cluster:
        procs = [subprocess.Popen([sys.executable, str(helpers / "train_worker.py"), "--cluster", cluster.address,
                                   "--out", str(tmp_path / f"w{i}.pt"), "--optimizer", "sgd", "--kwargs",
                                   json.dumps({"lr": 0.1}), "--sizes", "16,16", "--min-workers", "1",
                                   "--steps", "100000", "--sleep", "0.02"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
        try:
            deadline, paths = time.monotonic() + 60, {}
            while time.monotonic() < deadline and not {p.pid for p in procs} <= set(paths):
                paths = {_owner(p): p for p in set(glob.glob(f"{shm.SHM_DIR}/shardps-*")) - before}
                time.sleep(0.2)
            victim = procs[0]
            assert victim.pid in paths, "the workers did not create their segments"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not _both_training(cluster):
                time.sleep(0.2)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            deadline = time.monotonic() + 60
            while os.path.exists(paths[victim.pid]) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not os.path.exists(paths[victim.pid])  # the servers unlinked it when the lease ran out
            assert os.path.exists(paths[procs[1].pid])  # the live worker's stays
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _both_training(cluster) -> bool:
    """Both workers are in the view and their shared memory is attached on every shard."""
    return all(sorted(shard_status(a).worker_transport.values()) == ["shm", "shm"]
               for a in cluster.server_addresses.values())


def _owner(path: str) -> int:
    return shm.creator(path)[0]


def ours() -> list[str]:
    """The segments this process created and still names (other runs on the host may have theirs)."""
    return [p for p in glob.glob(f"{shm.SHM_DIR}/shardps-*") if _owner(p) == os.getpid()]


def test_a_segment_is_found_only_by_its_name_and_nonce_and_never_outside_dev_shm():
    seg = Segment.create(100)
    try:
        seg.grads.fill_(3.0)
        other = SegmentFile.open(seg.name, seg.nonce, 100)  # what a server holds: a descriptor, no mapping
        got = torch.empty(60)
        other.read_grads(40, got)
        assert torch.equal(got, seg.grads[40:])
        other.write_values(5, torch.full((5,), 7.0))
        assert seg.values[5:10].eq(7.0).all() and seg.values[:5].eq(0.0).all()
        other.retire()
        with pytest.raises(ShmUnavailable, match="not the worker's segment"):
            SegmentFile.open(seg.name, b"\0" * 16, 100)
        with pytest.raises(ShmUnavailable, match="not the worker's segment"):
            SegmentFile.open(seg.name, seg.nonce, 99)
        for name in ("../etc/passwd", "shardps-xyz", "/dev/shm/" + seg.name):
            with pytest.raises(ShmUnavailable, match="not a shardps segment name"):
                SegmentFile.open(name, seg.nonce, 100)
    finally:
        seg.unlink()
    with pytest.raises(ShmUnavailable, match="no shared memory"):
        SegmentFile.open(seg.name, seg.nonce, 100)


def test_a_symlink_or_a_fifo_named_as_a_segment_is_never_opened_and_never_blocks():
    seg = Segment.create(100)
    fake = [f"{shm.SHM_DIR}/shardps-{os.urandom(16).hex()}" for _ in range(2)]
    try:
        os.symlink(seg.path, fake[0])  # a valid segment, reached through a link
        os.mkfifo(fake[1])
        assert shm.creator(fake[1]) == (0, 0) and fake[1] not in shm.sweep()  # looked at without blocking
        with pytest.raises(ShmUnavailable, match="not a plain file"):
            SegmentFile.open(os.path.basename(fake[0]), seg.nonce, 100)
        with pytest.raises(ShmUnavailable, match="not a regular file"):
            SegmentFile.open(os.path.basename(fake[1]), seg.nonce, 100)
    finally:
        seg.unlink()
        for path in fake:
            os.unlink(path)


def test_a_full_dev_shm_is_refused_up_front_instead_of_a_sigbus_later(tiny_fs, monkeypatch):
    monkeypatch.setattr(shm, "SHM_DIR", str(tiny_fs))
    with pytest.raises(ShmUnavailable, match="cannot reserve"):
        Segment.create(1_000_000)  # 8 MB does not fit in 256 kB
    assert os.listdir(tiny_fs) == []  # nothing left behind


def test_a_dev_shm_this_worker_cannot_write_is_refused_so_the_bytes_go_over_the_network(tiny_fs, monkeypatch):
    # A container whose /dev/shm belongs to another user, or is read-only: no segment, no crash ("auto" falls
    # back to the byte link; FlatParams catches ShmUnavailable).
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    monkeypatch.setattr(shm, "SHM_DIR", str(tiny_fs))
    with pytest.raises(ShmUnavailable, match="cannot create a segment"):
        Segment.create(10)
    flat = FlatParams([torch.nn.Parameter(torch.ones(10))], ["w"], [0], [()], 1, shared=True)
    try:
        assert flat.segment is None
    finally:
        flat.close()


def test_sweep_unlinks_the_segments_of_dead_creators_only():
    code = ("import sys, time; from shardps.runtime.shm import Segment; s = Segment.create(10); "
            "print(s.name, flush=True); time.sleep(60)")
    dead, alive = (subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2))
    try:
        names = [p.stdout.readline().strip() for p in (dead, alive)]
        dead.kill()
        dead.wait()
        removed = shm.sweep()
        assert names[0] in removed and not os.path.exists(f"{shm.SHM_DIR}/{names[0]}")
        assert names[1] not in removed and os.path.exists(f"{shm.SHM_DIR}/{names[1]}")
    finally:
        alive.kill()
        alive.wait()
        shm.sweep()
    assert not os.path.exists(f"{shm.SHM_DIR}/{names[1]}")
