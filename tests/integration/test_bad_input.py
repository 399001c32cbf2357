"""Bad input over real gRPC: each class gets its status code and leaves the shard byte-identical."""
import json
import math

import grpc
import pytest
import torch

from shardps import LocalCluster, ShardedOptimizer
from shardps.coordinator.client import CoordinatorClient
from shardps.proto import codec
from shardps.proto.errors import FailedPrecondition
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.gen import shardps_pb2_grpc as pb_grpc
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, UpdateMode
from shardps.runtime.rpc import open_channel


@pytest.fixture(scope="module")
def job():
    with LocalCluster(servers=2) as cluster:
        model = torch.nn.Linear(40, 8)
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=0.01)
        model(torch.randn(4, 40)).sum().backward()
        opt.step(batch_size=4)  # one real step, so the optimizer state is non-trivial
        shard = opt.plan[1]
        channel = open_channel(shard.address)
        yield cluster, opt, shard, pb_grpc.ShardServiceStub(channel)
        channel.close()
        opt.close()


def good_header(opt, shard, options=None, **overrides):
    r = shard.range
    target = pb.ShardTarget(job_id=opt.job_id, fingerprint=opt.job.layout.fingerprint, shard_id=r.shard_id,
                            start=r.start, stop=r.stop)
    step_options = dict(batch_size=4, hyperparams_json=opt.job.hyper_json()) | (options or {})
    fields = dict(target=target, worker_id=opt.worker_id, step=opt.steps_taken, epoch=opt.epoch,
                  base_version=opt.versions[r.shard_id], options=pb.StepOptions(**step_options))
    if overrides.pop("without_options", False):
        del fields["options"]
    fields.update(overrides)
    return pb.PushHeader(**fields)


def hyper(opt, **change):
    values = json.loads(opt.job.hyper_json())
    return json.dumps([v | change for v in values])


def push(stub, header, chunks):
    reqs = [pb.PushRequest(header=header, grad=chunks[0])] + [pb.PushRequest(grad=c) for c in chunks[1:]]
    return list(stub.Push(iter(reqs), timeout=10))


def digest(stub):
    return stub.GetShardStatus(pb.GetShardStatusRequest(include_digest=True), timeout=10).state_digest


def target_with(opt, shard, **kw):
    r = shard.range
    base = dict(job_id=opt.job_id, fingerprint=opt.job.layout.fingerprint, shard_id=r.shard_id, start=r.start,
                stop=r.stop)
    return pb.ShardTarget(**(base | kw))


CASES = {
    "wrong fingerprint": (lambda o, s: dict(target=target_with(o, s, fingerprint="0" * 64)), None, "FAILED_PRECONDITION"),
    "wrong job": (lambda o, s: dict(target=target_with(o, s, job_id="nope")), None, "FAILED_PRECONDITION"),
    "range out of plan": (lambda o, s: dict(target=target_with(o, s, stop=s.range.stop + 64)), None, "FAILED_PRECONDITION"),
    "unknown worker": (lambda o, s: dict(worker_id=999), None, "NOT_FOUND"),
    "step from the future": (lambda o, s: dict(step=o.steps_taken + 5), None, "FAILED_PRECONDITION"),
    "unknown epoch": (lambda o, s: dict(epoch=42), None, "FAILED_PRECONDITION"),
    "zero batch": (lambda o, s: dict(options=dict(batch_size=0)), None, "INVALID_ARGUMENT"),
    "epoch zero": (lambda o, s: dict(epoch=0), None, "INVALID_ARGUMENT"),
    "negative epoch": (lambda o, s: dict(epoch=-3), None, "INVALID_ARGUMENT"),
    "huge epoch": (lambda o, s: dict(epoch=2**62), None, "FAILED_PRECONDITION"),
    "negative step": (lambda o, s: dict(step=-1), None, "INVALID_ARGUMENT"),
    "infinite lr": (lambda o, s: dict(options=dict(hyperparams_json=hyper(o, lr=math.inf))), None, "INVALID_ARGUMENT"),
    "negative lr": (lambda o, s: dict(options=dict(hyperparams_json=hyper(o, lr=-1.0))), None, "INVALID_ARGUMENT"),
    "beta of 1": (lambda o, s: dict(options=dict(hyperparams_json=hyper(o, betas=[1.0, 0.999]))), None,
                  "INVALID_ARGUMENT"),
    "unknown hyper-parameter": (lambda o, s: dict(options=dict(hyperparams_json=hyper(o, evil=1))), None,
                                "INVALID_ARGUMENT"),
    "hyper-parameters not JSON": (lambda o, s: dict(options=dict(hyperparams_json="[{")), None, "INVALID_ARGUMENT"),
    "deeply nested hyper-parameters": (lambda o, s: dict(options=dict(hyperparams_json="[" * 100000)), None,
                                       "INVALID_ARGUMENT"),
    "wrong mask length": (lambda o, s: dict(options=dict(grad_mask=b"\x01" * 9)), None, "INVALID_ARGUMENT"),
    "nan loss scale": (lambda o, s: dict(options=dict(grad_scale=math.nan)), None, "INVALID_ARGUMENT"),
    "denormal loss scale": (lambda o, s: dict(options=dict(grad_scale=1e-39)), None, "INVALID_ARGUMENT"),
    "loss scale past float32": (lambda o, s: dict(options=dict(grad_scale=1e39)), None, "INVALID_ARGUMENT"),
    "loss scale that overflows the unscaled gradient": (lambda o, s: dict(options=dict(grad_scale=1e-30)),
                                                        lambda n: torch.full((n,), 1e10), "INVALID_ARGUMENT"),
    "negative clip": (lambda o, s: dict(options=dict(clip_max_norm=-1.0)), None, "INVALID_ARGUMENT"),
    "no options": (lambda o, s: dict(without_options=True), None, "INVALID_ARGUMENT"),
    "nan gradient": (lambda o, s: {}, lambda n: torch.full((n,), math.nan), "INVALID_ARGUMENT"),
    "inf gradient": (lambda o, s: {}, lambda n: torch.full((n,), math.inf), "INVALID_ARGUMENT"),
    "short slice": (lambda o, s: {}, lambda n: torch.zeros(n - 1), "INVALID_ARGUMENT"),
    "long slice": (lambda o, s: {}, lambda n: torch.zeros(n + 1), "INVALID_ARGUMENT"),
    "integer dtype": (lambda o, s: {}, lambda n: torch.zeros(n, dtype=torch.int32), "INVALID_ARGUMENT"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_push_is_rejected_with_its_status_and_changes_nothing(job, case):
    cluster, opt, shard, stub = job
    header_change, grad_of, code = CASES[case]
    n = shard.range.numel
    grad = (grad_of or (lambda n: torch.ones(n)))(n)
    before = digest(stub)
    with pytest.raises(grpc.RpcError) as info:
        push(stub, good_header(opt, shard, **header_change(opt, shard)), list(codec.encode(grad, 64)))
    assert info.value.code().name == code, info.value.details()
    assert info.value.details()  # a message that names the problem
    assert digest(stub) == before


@pytest.mark.slow
def test_malformed_chunk_streams_are_rejected(job):
    cluster, opt, shard, stub = job
    before = digest(stub)
    chunks = list(codec.encode(torch.ones(shard.range.numel), 64))
    gap = [chunks[0], *chunks[2:]]
    with pytest.raises(grpc.RpcError) as info:
        push(stub, good_header(opt, shard), gap)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "offset" in info.value.details()
    oversized = pb.TensorChunk(dtype=pb.DTYPE_FLOAT32, shape=[shard.range.numel], offset=0, data=b"\0" * (9 << 20))
    with pytest.raises(grpc.RpcError) as info:
        push(stub, good_header(opt, shard), [oversized])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert digest(stub) == before


@pytest.mark.slow
def test_a_good_push_after_the_bad_ones_still_trains(job):
    cluster, opt, shard, stub = job
    before = digest(stub)
    version = opt.versions[shard.range.shard_id]
    opt.zero_grad(set_to_none=False)
    opt.step(batch_size=4)  # zero gradients (not None ones) still step Adam's state
    assert opt.versions[shard.range.shard_id] == version + 1
    assert digest(stub) != before


@pytest.mark.slow
def test_coordinator_refuses_a_worker_with_another_model(job):
    cluster, opt, shard, stub = job
    other = JobConfig(Layout.from_shapes([("weight", (8, 41), "float32"), ("bias", (8,), "float32")]), "adam",
                      {"lr": 0.01}, UpdateMode.SYNC, 1)
    with CoordinatorClient(cluster.address) as coord:
        with pytest.raises(FailedPrecondition, match="fingerprint"):
            coord.register_worker(other, "intruder", "cpu", wait=5)
        assert len(coord.status().view.members) == 1


@pytest.mark.slow
@pytest.mark.parametrize("positions, words", [([0, 10**9], "lie in"), ([3, 3], "unique"), ([-1, 2], "lie in")])
def test_bad_sparse_pushes_are_rejected_and_change_nothing(job, positions, words):
    cluster, opt, shard, stub = job
    before = digest(stub)
    idx = torch.tensor(positions, dtype=torch.int32)
    reqs = [pb.PushRequest(header=good_header(opt, shard))]
    reqs += [pb.PushRequest(indices=c) for c in codec.encode(idx)]
    reqs += [pb.PushRequest(grad=c) for c in codec.encode(torch.ones(len(positions)))]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Push(iter(reqs), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
    assert digest(stub) == before


def int8_push(values, scales, scales_first=True):
    parts = [[pb.PushRequest(scales=c) for c in codec.encode(scales)]] if scales is not None else []
    parts.insert(len(parts) if scales_first else 0, [pb.PushRequest(grad=c) for c in codec.encode(values)])
    return [r for part in parts for r in part]


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [("int8 without scales", "scales first"),
                                         ("float32 with scales", "int8 gradient values only"),
                                         ("scales that do not tile the slice", "overrun"),
                                         ("scales after the values", "before the grad")])
def test_bad_int8_pushes_are_rejected_and_change_nothing(job, case, words):
    cluster, opt, shard, stub = job
    n = shard.range.numel
    values, scales = torch.ones(n, dtype=torch.int8), torch.ones(1)
    body = {"int8 without scales": int8_push(values, None),
            "float32 with scales": int8_push(torch.ones(n), scales),
            "scales that do not tile the slice": int8_push(values, torch.ones(n - 1)),
            "scales after the values": int8_push(values, scales, scales_first=False)}[case]
    before = digest(stub)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Push(iter([pb.PushRequest(header=good_header(opt, shard))] + body), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
    assert digest(stub) == before
