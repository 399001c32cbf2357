"""The byte link: a push's gradient and its reply's slice on raw TCP beside gRPC (runtime/link.py).

Same training as over gRPC; falls back to gRPC by itself where a server offers no link; a link
that breaks at any point costs a retry, never a second apply; a client that lies on its link or
floods the link port changes nothing and stops nobody."""
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shardps import LocalCluster
from shardps.proto import errors
from shardps.runtime.server import bind, thread_pool_server
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, MemberInfo, ShardInfo, UpdateMode, View
from shardps.proto.plan import ShardRange
from shardps.runtime.retry import Retrier
from shardps.server.links import LinkHub
from shardps.server.node import ShardNode
from shardps.server.service import ShardServicer, add_to_server
from shardps.server.state import ShardState
from shardps.worker.flat import Staged
from shardps.worker.ps_client import PSClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from shm_pair import train_pair  # noqa: E402

N = 4096


def job(workers: int = 1) -> JobConfig:
    return JobConfig(Layout.from_shapes([("w", (N,), "float32")]), "sgd", {"lr": 0.1}, UpdateMode.SYNC, workers)


@pytest.fixture
def shard(request):
    """A real shard server in this process (gRPC and, unless the test says links=False, its byte
    links) holding one sync SGD shard of ``workers`` members; yields (state, address, hub)."""
    workers, links = getattr(request, "param", (1, True))
    cfg = job(workers)
    state = ShardState(ShardRange(0, 0, N), cfg, "job", step_timeout=20)
    state.initialize(torch.ones(N))
    view = View(1, 0, tuple(MemberInfo(w, w) for w in range(workers)))
    node = ShardNode(0, lambda job_id: (job_id, cfg, []), lambda job_id, epoch: view)
    node.states[state.job_id] = state
    hub = LinkHub("127.0.0.1", 0, handshake_timeout=0.5) if links else None
    server = thread_pool_server(16)
    add_to_server(ShardServicer(node, 1 << 16, wait_timeout=10, threads=16, links=hub), server)
    port = bind(server, "127.0.0.1:0")
    server.start()
    yield state, f"127.0.0.1:{port}", hub
    server.stop(0)
    if hub is not None:
        hub.close()


def client(state: ShardState, address: str, worker_id: int, budget: float = 0.0) -> PSClient:
    return PSClient([ShardInfo(state.shard, address)], "job", state.job.layout.fingerprint, 1 << 16, 10.0,
                    retry=Retrier(budget=budget), worker_id=worker_id, links=True)


def push(ps: PSClient, worker_id: int, grad: torch.Tensor, values: torch.Tensor, step: int = 0):
    staged = Staged(SimpleNamespace(wire=grad, grads=grad), 0, N, fp32=False)
    header = pb.PushHeader(worker_id=worker_id, step=step, epoch=1,
                           options=pb.StepOptions(batch_size=1, hyperparams_json=ps_job_hyper))
    return ps.submit_push(ps.shards[0], staged, values, header, step).result(60)


ps_job_hyper = job().hyper_json()


def test_a_push_goes_on_the_byte_link_and_its_reply_comes_back_on_it(shard):
    state, address, hub = shard
    ps = client(state, address, 0)
    try:
        values = torch.zeros(N)
        reply = push(ps, 0, torch.full((N,), 2.0), values)
        assert reply.version == 1 and torch.allclose(values, torch.full((N,), 0.8))
        assert torch.equal(values, state.param)
        assert state.transport[0] == "tcp" and ps.shards[0].links.on_link and hub.links() == 1
        assert state.stats.bytes_in == N * 4 and state.stats.bytes_out == N * 4  # the link's bytes count
    finally:
        ps.close()


@pytest.mark.parametrize("shard", [(1, False)], indirect=True)
def test_a_server_that_offers_no_link_takes_the_same_push_inside_grpc_and_is_not_asked_again(shard):
    state, address, _ = shard
    ps = client(state, address, 0)
    try:
        values = torch.zeros(N)
        assert push(ps, 0, torch.full((N,), 2.0), values).version == 1
        assert torch.allclose(values, torch.full((N,), 0.8)) and state.transport[0] == "grpc"
        assert not ps.shards[0].links.on_link and ps.shards[0].links.refused
    finally:
        ps.close()


def test_a_gradient_frame_of_the_wrong_size_is_refused_changes_nothing_and_the_next_push_works(shard):
    state, address, hub = shard
    ps = client(state, address, 0)
    try:
        values = torch.zeros(N)
        header = pb.PushHeader(worker_id=0, step=0, epoch=1, base_version=0,
                               options=pb.StepOptions(batch_size=1, hyperparams_json=ps_job_hyper))
        with pytest.raises(errors.InvalidArgument, match="holds 16404 bytes"):  # a client that lies on its link
            ps.shards[0].push(header, torch.ones(N + 5), values, 10.0)
        assert state.version == 0 and torch.equal(state.param, torch.ones(N))
        assert state.stats.rejections["bad_size"] == 1 and hub.links() == 0  # the link was closed
        assert push(ps, 0, torch.full((N,), 2.0), values).version == 1  # on a new link
        assert state.transport[0] == "tcp" and hub.links() == 1
    finally:
        ps.close()


@pytest.mark.parametrize("shard", [(2, True)], indirect=True)
def test_a_link_that_breaks_while_its_push_waits_for_the_step_costs_a_retry_never_a_second_apply(shard):
    state, address, hub = shard
    first, second = client(state, address, 0, budget=30), client(state, address, 1)
    try:
        values0, values1, replies = torch.zeros(N), torch.zeros(N), []
        waiting = threading.Thread(target=lambda: replies.append(push(first, 0, torch.full((N,), 2.0), values0)))
        waiting.start()
        deadline = time.monotonic() + 30
        while state.policy.waiting_pushes() < 1:  # worker 0's gradient is in; its reply waits for worker 1
            assert time.monotonic() < deadline and waiting.is_alive()
            time.sleep(0.01)
        first.shards[0].links._link.close()  # its link resets: the reply cannot come back on it
        push(second, 1, torch.full((N,), 4.0), values1)
        waiting.join(60)
        assert replies and replies[0].duplicate  # sent again on a new link, answered as the retry it is
        assert state.version == 1 and torch.allclose(state.param, torch.full((N,), 0.7))  # one apply of the mean
        assert torch.equal(values0, state.param) and torch.equal(values1, state.param)
        assert first.shards[0].links.on_link and state.transport[0] == "tcp"
    finally:
        first.close()
        second.close()


def test_a_flood_of_silent_or_lying_connections_on_the_link_port_stops_no_push(shard):
    state, address, hub = shard
    ps = client(state, address, 0)
    flood = []
    try:
        values = torch.zeros(N)
        push(ps, 0, torch.full((N,), 2.0), values, step=0)
        for i in range(60):  # more than the handshake slots; silent, forged tickets, HTTP
            s = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
            if i % 3 == 1:
                s.sendall(b"SPSLINK1" + b"\x01" * 16)
            elif i % 3 == 2:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            flood.append(s)
        assert push(ps, 0, torch.full((N,), 2.0), values, step=1).version == 2  # on the link it has
        assert hub.links() == 1 and hub.refused > 0
        ps.shards[0].links._link.close()  # a new link is opened once the handshakes time out, or gRPC takes the push
        assert push(ps, 0, torch.full((N,), 2.0), values, step=2).version == 3
        assert torch.equal(values, state.param)
    finally:
        for s in flood:
            s.close()
        ps.close()


@pytest.mark.slow
def test_workers_on_byte_links_train_exactly_as_inside_grpc_and_fall_back_where_a_server_offers_none(monkeypatch):
    runs = {}
    for transport in ("tcp", "grpc"):
        with LocalCluster(servers=2, durable=False) as cluster:
            runs[transport] = train_pair(cluster, transport)
    monkeypatch.setenv("SHARDPS_DATA_PORT", "-1")
    with LocalCluster(servers=2, durable=False) as cluster:
        runs["off"] = train_pair(cluster, "tcp")
    (tcp_results, tcp_paths), (grpc_results, grpc_paths), (off_results, off_paths) = \
        runs["tcp"], runs["grpc"], runs["off"]
    assert all(set(t.values()) == {"tcp"} for t in tcp_paths)  # every push of both workers on both shards
    assert all(set(t.values()) == {"grpc"} for t in grpc_paths + off_paths)
    for key, value in grpc_results[0][0].items():
        assert torch.equal(tcp_results[0][0][key], value), key  # bit for bit the same training
        assert torch.equal(off_results[0][0][key], value), key
