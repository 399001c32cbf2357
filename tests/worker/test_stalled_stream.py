"""A push stream that stalls mid-call (a partition that heals late, a slow link) is cancelled by the
server's idle-stream watchdog (runtime/limits.py); the worker sees CANCELLED, a status it did not
cause, and sends the push again: the step closes once, as if nothing happened."""
import threading
import time

import pytest
import torch

from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, MemberInfo, ShardInfo, UpdateMode, View
from shardps.proto.plan import ShardRange
from shardps.runtime.retry import Retrier
from shardps.runtime.security import Security
from shardps.runtime.server import bind, role_server
from shardps.server.node import ShardNode
from shardps.server.service import ShardServicer, add_to_server
from shardps.server.state import ShardState
from shardps.worker.ps_client import PSClient

N = 1024


@pytest.fixture
def shard():
    """A real shard server whose request streams are cancelled after 0.5 s without a message."""
    cfg = JobConfig(Layout.from_shapes([("w", (N,), "float32")]), "sgd", {"lr": 0.1}, UpdateMode.SYNC, 1)
    state = ShardState(ShardRange(0, 0, N), cfg, "job", step_timeout=20)
    state.initialize(torch.ones(N))
    view = View(1, 0, (MemberInfo(0, 0),))
    node = ShardNode(0, lambda job_id: (job_id, cfg, []), lambda job_id, epoch: view)
    node.states[state.job_id] = state
    server, _ = role_server(16, security=Security(), idle_s=0.5, first_message_s=0.5)
    add_to_server(ShardServicer(node, 1 << 16, wait_timeout=10, threads=16), server)
    port = bind(server, "127.0.0.1:0", Security())
    server.start()
    yield state, f"127.0.0.1:{port}", cfg
    server.stop(0)


def test_a_push_the_server_cancels_for_stalling_is_sent_again_and_applied_once(shard):
    state, address, cfg = shard
    ps = PSClient([ShardInfo(state.shard, address)], "job", cfg.layout.fingerprint, 1 << 16, 10.0,
                  retry=Retrier(budget=20), worker_id=0)
    calls = []

    def commit():  # the step's options: late the first time (the stream stalls past the server's limit)
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(1.5)
        return pb.StepOptions(batch_size=1, hyperparams_json=cfg.hyper_json())

    try:
        out = torch.zeros(N)
        header = pb.PushHeader(worker_id=0, step=0, epoch=1, base_version=0)
        reply = ps.shards[0].push(header, torch.full((N,), 2.0), out, 10.0, commit=commit)
        assert len(calls) == 2 and ps.retry.stats.by_code["UNAVAILABLE"] == 1  # once cancelled, once sent again
        assert reply.version == 1 and not reply.duplicate
        assert torch.allclose(out, torch.full((N,), 0.8)) and torch.equal(out, state.param)
    finally:
        ps.close()


def test_a_call_cancelled_because_the_worker_closed_its_client_is_not_retried(shard):
    state, address, cfg = shard
    ps = PSClient([ShardInfo(state.shard, address)], "job", cfg.layout.fingerprint, 1 << 16, 10.0,
                  retry=Retrier(budget=20), worker_id=0)
    started = threading.Event()

    def commit():
        started.set()
        time.sleep(0.3)
        return pb.StepOptions(batch_size=1, hyperparams_json=cfg.hyper_json())

    errors: list[BaseException] = []

    def run():
        try:
            ps.shards[0].push(pb.PushHeader(worker_id=0, step=0, epoch=1, base_version=0), torch.ones(N),
                              torch.zeros(N), 10.0, commit=commit)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(10)
    ps.close()
    t.join(20)
    assert not t.is_alive() and len(errors) == 1 and "CANCELLED" in str(errors[0])
    assert ps.retry.stats.retries == 0 and state.version == 0
