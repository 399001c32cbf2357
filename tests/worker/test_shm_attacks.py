"""Hostile same-host pushes against real shard server processes: a caller naming segments it
should not (another worker's, a truncated one, one of a non-member, a link, a FIFO) gets a
clear status for its own call, the server stays up, and the two honest workers' sync job
trains bit for bit as it does over gRPC."""
import os
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from shardps import LocalCluster
from shardps.client.sdk import shard_status
from shardps.runtime import shm
from shardps.proto.gen import shardps_pb2 as pb
from shardps.runtime.shm import Segment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from shm_pair import train_pair  # noqa: E402

pytestmark = pytest.mark.slow
HOOK_STEP = 2


@pytest.fixture(scope="module")
def reference():
    """Rank 0's parameters after the same training over gRPC."""
    with LocalCluster(servers=2, durable=False) as cluster:
        results, _ = train_pair(cluster, "grpc")
    return results[0][0]


def push_as(opt, k, worker_id, name, nonce, step):
    """One raw Push to shard ``k`` through ``opt``'s channel naming segment ``name``; returns
    (status code, details) — OK for an answered push."""
    shard = opt.ps.shards[k]
    h = pb.PushHeader(worker_id=worker_id, step=step, epoch=opt.epoch, base_version=step,
                      options=pb.StepOptions(batch_size=1), shm=pb.ShmSegment(name=name, nonce=nonce))
    h.target.CopyFrom(shard.target)
    try:
        for _ in shard._push(iter([pb.PushRequest(header=h)]), timeout=20, metadata=shard._metadata):
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def victims_push_arrived(cluster, step):
    """Wait until rank 0's push of ``step`` reached every shard (rank 1's has not been sent): the
    victim's step is open on each server, its gradient held there, while the attack runs."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(shard_status(a).pushes_received >= 2 * step + 1 for a in cluster.server_addresses.values()):
            return
        time.sleep(0.05)


def run_attacked(reference, attack):
    """Train two honest workers while rank 1's thread also runs ``attack(cluster, opts)`` (for
    each shard, returning what it observed); the servers stay up and the training is unchanged."""
    seen = []
    with LocalCluster(servers=2, durable=False) as cluster:
        def hook(opts, step):
            victims_push_arrived(cluster, step)
            seen.append(attack(cluster, opts))
        try:
            results, transports = train_pair(cluster, "auto", hook=hook, hook_step=HOOK_STEP)
        finally:  # a dead server is the first thing to say (-11: SIGSEGV, -7: SIGBUS)
            exits = [cluster.procs[f"server-{k}"].poll() for k in range(2)]
            assert exits == [None, None], f"server exit statuses {exits}"
    assert sorted(results) == [0, 1] and all(flags == [True, True] for _, flags in results.values())
    assert all(set(t.values()) == {"shm"} for t in transports)  # the honest workers never left shared memory
    for key, value in reference.items():
        assert torch.equal(results[0][0][key], value), key
    return seen[0]


def opened_by(pid: int, path: str) -> bool:
    """Whether process ``pid`` has ``path`` open or mapped."""
    fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    with open(f"/proc/{pid}/maps") as f:
        return any(path in line for line in fds + f.read().splitlines())


def test_a_push_under_another_members_id_with_its_own_segment_is_refused(reference):
    def attack(cluster, opts):
        mine = opts[1].flat.segment  # rank 1's own segment, in use; it pushes as rank 0
        return [push_as(opts[1], k, opts[0].worker_id, mine.name, mine.nonce, HOOK_STEP - 1) for k in range(2)]

    for code, details in run_attacked(reference, attack):
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no shared memory" in details
        assert "must push through a segment of its own" in details


def test_a_segment_truncated_after_use_fails_that_push_only(reference):
    def attack(cluster, opts):
        extra = Segment.create(opts[1].flat.segment.numel)  # rank 1 moves to a new segment of its own ...
        first = [push_as(opts[1], k, opts[1].worker_id, extra.name, extra.nonce, HOOK_STEP - 1) for k in range(2)]
        os.truncate(extra.path, shm.HEADER)  # ... shrinks it under the servers (this process no longer touches it)
        again = [push_as(opts[1], k, opts[1].worker_id, extra.name, extra.nonce, HOOK_STEP - 1) for k in range(2)]
        extra.unlink()
        return first, again

    first, again = run_attacked(reference, attack)
    assert all(code == grpc.StatusCode.OK for code, _ in first)  # a repeat of step 1, answered through it
    for code, details in again:
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "truncated" in details


def test_a_non_member_naming_a_segment_is_refused_without_the_server_opening_it(reference):
    def attack(cluster, opts):
        extra = Segment.create(opts[1].flat.segment.numel)
        codes = [push_as(opts[1], k, 999, extra.name, extra.nonce, 0) for k in range(2)]
        held = [opened_by(cluster.pid(f"server-{k}"), extra.path) for k in range(2)]
        os.truncate(extra.path, shm.HEADER)
        codes += [push_as(opts[1], k, 999, extra.name, extra.nonce, 0) for k in range(2)]
        extra.unlink()
        return codes, held

    codes, held = run_attacked(reference, attack)
    assert held == [False, False]
    for code, details in codes:
        assert code == grpc.StatusCode.NOT_FOUND and "not a member" in details


def test_a_link_to_another_workers_segment_or_a_fifo_is_refused(reference):
    def attack(cluster, opts):
        victim = opts[0].flat.segment
        names = [f"shardps-{os.urandom(16).hex()}" for _ in range(3)]
        os.symlink(victim.path, f"{shm.SHM_DIR}/{names[0]}")
        os.link(victim.path, f"{shm.SHM_DIR}/{names[1]}")  # the same file under a second name
        os.mkfifo(f"{shm.SHM_DIR}/{names[2]}")
        try:
            return [push_as(opts[1], k, opts[1].worker_id, name, victim.nonce, HOOK_STEP - 1)
                    for name in names for k in range(2)]
        finally:
            for name in names:
                os.unlink(f"{shm.SHM_DIR}/{name}")

    seen = run_attacked(reference, attack)
    for code, details in seen:
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no shared memory" in details
    assert all("not a plain file" in d for _, d in seen[:2])
    assert all("is worker" in d for _, d in seen[2:4])  # bound to the victim, whatever the name
    assert all("not a regular file" in d for _, d in seen[4:])
