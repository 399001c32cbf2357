"""Collectives among a job's workers: the coordinator core in-process, then over gRPC from worker processes."""
import threading
import time

import pytest
import torch

from shardps.coordinator.collectives import MAX_PAYLOAD
from shardps.proto.errors import FailedPrecondition, InvalidArgument, UnknownWorker
from shardps.worker.collectives import decode, encode

from test_coordinator import job, ready


def two_workers():
    c = ready()
    a, b = c.register_worker(job(), "a"), c.register_worker(job(), "b")
    return c, a, b


def test_a_round_closes_when_every_member_contributed_and_gives_everyone_the_payloads_by_rank():
    c, a, b = two_workers()
    assert c.collective(a.job_id, a.worker_id, "loss", 0, b"a0", timeout=0.05) == (None, 1)  # b not in yet
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("a", c.collective(a.job_id, a.worker_id, "loss", 0, b"a0", 5)))
    t.start()
    assert c.collective(b.job_id, b.worker_id, "loss", 0, b"b0", timeout=5) == ((b"a0", b"b0"), 1)
    t.join(5)
    assert got["a"] == ((b"a0", b"b0"), 1)
    # a retried call of a closed round gets the same answer; the next round starts empty
    assert c.collective(a.job_id, a.worker_id, "loss", 0, b"a0", timeout=0) == ((b"a0", b"b0"), 1)
    assert c.collective(a.job_id, a.worker_id, "loss", 1, b"a1", timeout=0)[0] is None


def test_a_worker_learns_which_open_rounds_the_others_wait_in_for_it_until_it_contributes():
    c, a, b = two_workers()
    rounds = c.named("").rounds
    assert rounds.awaiting(b.worker_id) == []
    c.collective(a.job_id, a.worker_id, "add_param_group#2@5", 0, b"a", timeout=0)
    assert rounds.awaiting(b.worker_id) == ["add_param_group#2@5"]  # what b's heartbeat carries
    assert rounds.awaiting(a.worker_id) == []  # a is in it already
    c.collective(b.job_id, b.worker_id, "add_param_group#2@5", 0, b"b", timeout=0)
    assert rounds.awaiting(b.worker_id) == []  # closed


def test_oversized_payloads_outsiders_and_bad_names_are_refused_without_opening_a_round():
    c, a, b = two_workers()
    rounds = c.named("").rounds
    with pytest.raises(InvalidArgument, match="65536"):
        c.collective(a.job_id, a.worker_id, "big", 0, b"x" * (MAX_PAYLOAD + 1), timeout=0)
    with pytest.raises(InvalidArgument, match="name"):
        c.collective(a.job_id, a.worker_id, "", 0, b"", timeout=0)
    outsider = c.register_worker(job(), "late")  # registered, pending: not in the view yet
    with pytest.raises(UnknownWorker, match="membership"):
        c.collective(a.job_id, outsider.worker_id, "x", 0, b"", timeout=0)
    assert not rounds.open


def test_a_round_that_closed_and_was_forgotten_is_refused_not_reopened():
    c, a, b = two_workers()
    rounds = c.named("").rounds
    for r in range(3):
        c.collective(a.job_id, a.worker_id, "n", r, b"", timeout=0)
        c.collective(b.job_id, b.worker_id, "n", r, b"", timeout=0)
    rounds.done.clear()  # as if many later rounds had pushed it out
    with pytest.raises(FailedPrecondition, match="same order"):
        c.collective(a.job_id, a.worker_id, "n", 1, b"", timeout=0)


def test_a_round_closes_when_its_workers_outnumber_the_coordinators_wait_slots():
    """More workers than handler threads may park: the ones without a slot contribute without waiting."""
    from concurrent.futures import ThreadPoolExecutor

    from shardps.coordinator.service import CoordinatorServicer
    from shardps.proto.gen import shardps_pb2 as pb

    c = ready()
    regs = [c.register_worker(job(min_workers=3), n) for n in "abc"]
    servicer = CoordinatorServicer(c, threads=2)  # 2 wait slots for 3 workers
    assert servicer.watches.limit == 2

    def call(reg, timeout_ms):
        req = pb.CollectiveRequest(job_id=reg.job_id, worker_id=reg.worker_id, name="n", round=0,
                                   payload=reg.worker_id.to_bytes(1, "big"), timeout_ms=timeout_ms)
        return servicer.Collective(req, None)

    with ThreadPoolExecutor(2) as pool:
        parked = [pool.submit(call, r, 10_000) for r in regs[:2]]
        while servicer.watches.in_use < 2:  # both slots taken by waiting calls
            time.sleep(0.01)
        third = call(regs[2], 10_000)  # no slot: contributes and answers at once, closing the round
        answers = [f.result(timeout=10) for f in parked] + [third]
    assert all(a.done and list(a.payloads) == [b"\x00", b"\x01", b"\x02"] for a in answers)


@pytest.mark.parametrize("value", [3.5, 7, {"path": "ckpt/epoch=1.ckpt", "ok": True}, None,
                                   torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                   torch.tensor([1.5, -2.0], dtype=torch.bfloat16), torch.tensor(4)])
def test_payloads_round_trip_without_pickle(value):
    back = decode(encode(value))
    if isinstance(value, torch.Tensor):
        assert back.dtype == value.dtype and torch.equal(back, value)
    else:
        assert back == value


def test_objects_that_are_not_json_or_tensors_are_refused():
    with pytest.raises(TypeError, match="JSON"):
        encode(object())


@pytest.mark.slow
def test_workers_reduce_broadcast_and_wait_for_each_other_through_a_real_cluster():
    """Two ShardedOptimizers (one per thread) of a job on a LocalCluster (coordinator and servers as processes)."""
    from concurrent.futures import ThreadPoolExecutor

    from shardps import LocalCluster, ShardedOptimizer

    def worker(address):
        opt = ShardedOptimizer(torch.nn.Linear(2, 1), cluster=address, lr=0.1, min_workers=2)
        try:
            coll, rank = opt.collectives, opt.rank
            mean = coll.all_reduce(torch.tensor([1.0, 2.0]) * (rank + 1))
            total = coll.all_reduce(rank + 1, op="sum")
            path = coll.broadcast(f"ckpt-from-{rank}" if rank == 0 else None)
            coll.barrier()
            peak = coll.all_reduce(float(rank), op="max", name="peak")
            return rank, mean, total, path, peak
        finally:
            opt.close()

    with LocalCluster(servers=2) as cluster, ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(worker, [cluster.address] * 2), key=lambda r: r[0])
    assert [r[0] for r in results] == [0, 1]
    for _, mean, total, path, peak in results:
        assert torch.equal(mean, torch.tensor([1.5, 3.0])) and total == 3 and path == "ckpt-from-0" and peak == 1.0
