"""Narrow replies (``pull_dtype``, ``PushHeader.reply_dtype``): a step's reply brings the shard's
fp32 values rounded to bfloat16 / float16, half the bytes, on the byte link and inside gRPC; the
shards keep and update the exact fp32 values. Training with them is mixed precision with fp32
masters on the shards: it equals one torch process whose forward runs on the rounded masters."""
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shardps import LocalCluster, ShardedOptimizer
from shardps.client.sdk import export_model, load_model_file
from shardps.proto import errors
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, MemberInfo, ShardInfo, UpdateMode, View
from shardps.proto.plan import ShardRange
from shardps.runtime.retry import Retrier
from shardps.runtime.server import bind, thread_pool_server
from shardps.server.links import LinkHub
from shardps.server.node import ShardNode
from shardps.server.service import ShardServicer, add_to_server
from shardps.server.state import ShardState
from shardps.worker.flat import Staged
from shardps.worker.ps_client import PSClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from task import global_batch, loss_fn, make_model  # noqa: E402

N = 4096
CFG = JobConfig(Layout.from_shapes([("w", (N,), "float32")]), "sgd", {"lr": 0.1}, UpdateMode.SYNC, 1)


@pytest.fixture
def shard():
    """A real one-member SGD shard in this process, with byte links; its values are not bf16-exact."""
    state = ShardState(ShardRange(0, 0, N), CFG, "job", step_timeout=20)
    state.initialize(torch.linspace(-3.0, 3.0, N) + 1e-4)
    node = ShardNode(0, lambda job_id: (job_id, CFG, []), lambda job_id, epoch: View(1, 0, (MemberInfo(0, 0),)))
    node.states[state.job_id] = state
    hub = LinkHub("127.0.0.1", 0, handshake_timeout=0.5)
    server = thread_pool_server(16)
    add_to_server(ShardServicer(node, 1 << 16, wait_timeout=10, threads=16, links=hub), server)
    port = bind(server, "127.0.0.1:0")
    server.start()
    yield state, f"127.0.0.1:{port}"
    server.stop(0)
    hub.close()


def push(ps: PSClient, grad: torch.Tensor, values: torch.Tensor, step: int, reply_dtype: int):
    staged = Staged(SimpleNamespace(wire=grad, grads=grad), 0, N, fp32=False)
    header = pb.PushHeader(worker_id=0, step=step, epoch=1, reply_dtype=reply_dtype,
                           options=pb.StepOptions(batch_size=1, hyperparams_json=CFG.hyper_json()))
    return ps.submit_push(ps.shards[0], staged, values, header, step).result(60)


@pytest.mark.parametrize("links", [True, False], ids=["link", "grpc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_narrow_reply_is_the_exact_slice_rounded_in_half_the_bytes(shard, links, dtype):
    state, address = shard
    ps = PSClient([ShardInfo(state.shard, address)], "job", CFG.layout.fingerprint, 1 << 16, 10.0,
                  retry=Retrier(budget=0), worker_id=0, links=links)
    wire = {torch.bfloat16: pb.DTYPE_BFLOAT16, torch.float16: pb.DTYPE_FLOAT16}[dtype]
    try:
        values = torch.zeros(N)
        before = state.stats.bytes_out
        reply = push(ps, torch.full((N,), 0.3), values, 0, wire)
        assert reply.version == 1 and state.transport[0] == ("tcp" if links else "grpc")
        assert torch.equal(values, state.param.to(dtype).float())  # the exact values, rounded once
        assert not torch.equal(values, state.param)  # (the shard's are not representable in it)
        assert state.stats.bytes_out - before == N * 2
        # The exact values stay on the shard: the next step updates them, not the rounded ones.
        exact = state.param.clone()
        push(ps, torch.full((N,), 0.3), values, 1, wire)
        assert torch.equal(state.param, exact.add(torch.full((N,), 0.3), alpha=-0.1))  # as torch's SGD
    finally:
        ps.close()


def test_a_reply_dtype_that_is_no_float_is_refused_and_changes_nothing(shard):
    state, address = shard
    ps = PSClient([ShardInfo(state.shard, address)], "job", CFG.layout.fingerprint, 1 << 16, 10.0,
                  retry=Retrier(budget=0), worker_id=0)
    try:
        before = state.param.clone()
        with pytest.raises(errors.InvalidArgument, match="reply_dtype"):
            push(ps, torch.ones(N), torch.zeros(N), 0, pb.DTYPE_INT8)
        assert state.version == 0 and torch.equal(state.param, before)
    finally:
        ps.close()


def test_the_optimizer_refuses_a_pull_dtype_it_cannot_send():
    with pytest.raises(ValueError, match="pull_dtype must be one of"):
        ShardedOptimizer(make_model(0), cluster="127.0.0.1:1", pull_dtype="int8")


SIZES = [24, 40]
STEPS = 8


def reference(initial: dict) -> dict:
    """One process: fp32 masters with torch's Adam; each forward after the first on the masters rounded to
    bfloat16 (the first runs on the exact values a worker pulls when it joins)."""
    master, work = make_model(0), make_model(0)
    master.load_state_dict(initial)
    opt = torch.optim.Adam(master.parameters(), lr=0.01)
    for step in range(STEPS):
        with torch.no_grad():
            for w, m in zip(work.parameters(), master.parameters()):
                w.copy_(m.to(torch.bfloat16).float() if step else m)
        work.zero_grad()
        x, y = global_batch(step, sum(SIZES))
        loss_fn(work, x, y).backward()
        for w, m in zip(work.parameters(), master.parameters()):
            m.grad = w.grad.clone()
        opt.step()
    return {k: v.clone() for k, v in master.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_two_workers_pulling_bfloat16_train_as_one_process_on_rounded_fp32_masters(transport):
    models = [make_model(0) for _ in SIZES]
    initial = {k: v.clone() for k, v in models[0].state_dict().items()}
    finals, errors_ = {}, []

    def worker(model):
        try:
            opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=0.01, min_workers=2,
                                   transport=transport, pull_dtype="bfloat16")
            lo = sum(SIZES[:opt.rank])
            for step in range(STEPS):
                x, y = global_batch(step, sum(SIZES))
                opt.zero_grad()
                loss_fn(model, x[lo:lo + SIZES[opt.rank]], y[lo:lo + SIZES[opt.rank]]).backward()
                opt.step(batch_size=SIZES[opt.rank])
            finals[opt.rank] = {k: v.clone() for k, v in model.state_dict().items()}
            opt.close()
        except BaseException as exc:  # the test fails with it, not with a missing result
            errors_.append(exc)

    with LocalCluster(servers=2, durable=False) as cluster:
        threads = [threading.Thread(target=worker, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors_, errors_[0]
        exported = load_model_file(export_model(cluster.address, Path(cluster.log_dir) / "model.safetensors")["model"])
    want = reference(initial)
    for key, value in want.items():
        # The shards' masters are the one process's (to fp32 noise, through the same rounding) ...
        assert torch.allclose(exported[key], value, rtol=1e-4, atol=1e-6), key
        # ... and each worker holds them rounded to bfloat16, as the last reply brought them.
        for rank in (0, 1):
            assert torch.equal(finals[rank][key], exported[key].to(torch.bfloat16).float()), (rank, key)
