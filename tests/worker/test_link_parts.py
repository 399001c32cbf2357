"""Pushes in parts on the byte link, over real gRPC and real sockets (a shard server in this process):
two workers' sync steps applied part by part end exactly where whole pushes end; a link that breaks
in the middle of a push costs a retry that continues it, never a second apply; a client that lies
about its parts is refused and the next push works."""
import threading
import time
from types import SimpleNamespace

import pytest
import torch

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

SHAPES = [("a", (300_000,)), ("b", (290, 1000)), ("c", (310_000,)), ("d", (290_000,))]  # 1.19M: 4 parts
N = sum(torch.Size(s).numel() for _, s in SHAPES)


def job() -> JobConfig:
    return JobConfig(Layout.from_shapes([(n, s, "float32") for n, s in SHAPES]), "adam", {"lr": 0.01},
                     UpdateMode.SYNC, 2)


HYPER = job().hyper_json()


def serve(parts: int):
    """A shard server in this process with byte links, holding one sync Adam shard of 2 members."""
    cfg = job()
    state = ShardState(ShardRange(0, 0, N), cfg, "job", step_timeout=30)
    state.initialize(torch.linspace(-1, 1, N))
    view = View(1, 0, (MemberInfo(0, 0), MemberInfo(1, 1)))
    node = ShardNode(0, lambda job_id: (job_id, cfg, []), lambda job_id, epoch: view)
    node.states[state.job_id] = state
    hub = LinkHub("127.0.0.1", 0, handshake_timeout=2)
    server = thread_pool_server(16)
    add_to_server(ShardServicer(node, 1 << 16, wait_timeout=10, threads=16, links=hub, link_parts=parts), server)
    port = bind(server, "127.0.0.1:0")
    server.start()
    return SimpleNamespace(state=state, address=f"127.0.0.1:{port}", hub=hub, server=server)


@pytest.fixture
def shard(request):
    s = serve(getattr(request, "param", 4))
    yield s
    s.server.stop(0)
    s.hub.close()


def client(s, worker_id: int, budget: float = 30.0) -> PSClient:
    return PSClient([ShardInfo(s.state.shard, s.address)], "job", s.state.job.layout.fingerprint, 1 << 16, 20.0,
                    retry=Retrier(budget=budget), worker_id=worker_id, links=True, parts=True)


def grad_of(worker: int, step: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(100 * step + worker))


def push(ps: PSClient, worker_id: int, step: int, values: torch.Tensor, grad: torch.Tensor | None = None):
    grad = grad_of(worker_id, step) if grad is None else grad
    staged = Staged(SimpleNamespace(wire=grad, grads=grad), 0, N, fp32=False)
    header = pb.PushHeader(worker_id=worker_id, step=step, epoch=1,
                           options=pb.StepOptions(batch_size=1 + worker_id, hyperparams_json=HYPER))
    return ps.submit_push(ps.shards[0], staged, values, header, step).result(60)


def train(s, steps: int, hook=None) -> list[torch.Tensor]:
    """Both workers, ``steps`` sync steps; returns each worker's final values. ``hook(worker, step, ps)``
    runs before each push."""
    clients, values, failures = [client(s, 0), client(s, 1)], [torch.zeros(N), torch.zeros(N)], []

    def run(w):
        try:
            for step in range(steps):
                if hook is not None:
                    hook(w, step, clients[w])
                push(clients[w], w, step, values[w])
        except BaseException as exc:  # noqa: BLE001 - the test fails with it
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in clients:
        c.close()
    assert not failures, failures
    return values


def test_two_workers_pushing_in_parts_end_exactly_where_whole_pushes_end():
    runs = {}
    for parts in (1, 4):
        s = serve(parts)
        try:
            values = train(s, 3)
            assert torch.equal(values[0], s.state.param) and torch.equal(values[1], s.state.param)
            assert s.state.version == 3 and s.state.transport == {0: "tcp", 1: "tcp"}
            runs[parts] = (s.state.param.clone(), s.state.stats.parts_applied, s.state.stats.bytes_in)
        finally:
            s.server.stop(0)
            s.hub.close()
    assert torch.equal(runs[4][0], runs[1][0])  # bit for bit
    assert runs[1][1] == 0 and runs[4][1] == 3 * 3  # three of each step's four parts before it closed
    assert runs[4][2] == runs[1][2] == 3 * 2 * N * 4  # the same bytes in


def test_a_link_that_breaks_in_the_middle_of_a_push_in_parts_costs_a_retry_that_continues_it(shard):
    reference = serve(4)
    try:
        expected = train(reference, 2)[0]
    finally:
        reference.server.stop(0)
        reference.hub.close()
    broken = []

    def break_once(worker, step, ps):
        if worker == 1 and step == 1 and not broken:  # once worker 0's parts of step 1 are in, cut worker 1's link
            deadline = time.monotonic() + 30
            while shard.state.policy.waiting_pushes() < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            link = ps.shards[0].links._link
            real_send = link.send
            sent = []

            def send(nonce, tensor, deadline):
                if sent:  # the first part went out: the link dies before the second
                    link.close()
                sent.append(tensor.numel())
                return real_send(nonce, tensor, deadline)
            link.send = send
            broken.append(True)

    values = train(shard, 2, hook=break_once)
    state = shard.state
    assert broken and state.version == 2 and torch.equal(state.param, expected)  # applied once, as if unbroken
    assert torch.equal(values[1], state.param) and state.stats.pushes_duplicate >= 1  # the retry continued it


@pytest.mark.parametrize("lie", ["parts", "size", "dtype"])
def test_a_client_that_lies_about_its_parts_is_refused_changes_nothing_and_the_next_push_works(shard, lie):
    state = shard.state
    ps = client(shard, 0, budget=0)
    try:
        link = ps.shards[0].links.get(10.0, 1)
        assert ps.shards[0].links.stops is not None and len(ps.shards[0].links.stops) == 4
        header = pb.PushHeader(worker_id=0, step=0, epoch=1, base_version=0, target=ps.shards[0].target,
                               options=pb.StepOptions(batch_size=1, hyperparams_json=HYPER))
        header.link.nonce = 7
        header.link.parts = 3 if lie == "parts" else 4
        grad = grad_of(0, 0)

        def requests():
            yield pb.PushRequest(header=header)
            if lie != "parts":
                first = grad[:ps.shards[0].links.stops[0]]
                link.send(7, first, time.monotonic() + 10)
                link.send(7, grad[:10] if lie == "size" else first.to(torch.float16)
                          if lie == "dtype" else grad[:5], time.monotonic() + 10)

        with pytest.raises(errors.InvalidArgument, match="parts" if lie == "parts" else "part 1"):
            try:
                list(ps.shards[0]._push(requests(), timeout=10))
            except Exception as exc:  # grpc error -> our error
                from shardps.runtime.status import error_from_rpc
                raise error_from_rpc(exc, "push") from None
        assert state.version == 0 and state.stats.parts_applied == 0
        other = client(shard, 1)
        values = [torch.zeros(N), torch.zeros(N)]
        t = threading.Thread(target=push, args=(other, 1, 0, values[1]))
        t.start()
        ps.shards[0].links.drop()
        ps.retry = ps.shards[0].retry = Retrier(budget=30)
        assert push(ps, 0, 0, values[0]).version == 1  # (a lying first part, if any, left the step open for its rest)
        t.join(60)
        other.close()
        assert torch.equal(values[0], state.param)
    finally:
        ps.close()
