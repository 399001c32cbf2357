"""Failure reasons travel typed: every domain error crosses a real in-process gRPC server as its
class with its fields (a google.rpc.ErrorInfo in the status details), and the recovery that acts
on one (falling back from shared memory, a stale primary stepping down) keeps working when every
message is reworded: nothing reads the text."""
import ast
import threading
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from shardps.proto import errors
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, MemberInfo, ShardInfo, UpdateMode, View
from shardps.proto.plan import ShardRange
from shardps.runtime import rpc, status
from shardps.runtime.server import bind, thread_pool_server
from shardps.runtime.retry import Retrier
from shardps.runtime.shm import Segment
from shardps.server import replica as replicas
from shardps.server.node import ShardNode
from shardps.server.service import ReplicaSender, ShardServicer, add_to_server
from shardps.server.state import ShardState
from shardps.worker.flat import Staged
from shardps.worker.ps_client import PSClient

N = 64
PACKAGE = Path(errors.__file__).resolve().parents[1]


@pytest.fixture
def reworded(monkeypatch):
    """Every domain error's text, on the server and on the client, says nothing about what it is."""
    monkeypatch.setattr(errors.ShardpsError, "__str__", lambda self: "reworded")


def sample(cls: type[errors.ShardpsError]) -> errors.ShardpsError:
    """An instance with a distinct value in each field (and a message that names another reason's
    wording, which must not matter)."""
    values = {name: kind(7 + 4 * i) for i, (name, kind) in enumerate(cls.fields.items())}
    return cls(f"{cls.__name__}: the job rolled back to step 3 in epoch 2; no shared memory", **values)


class Failing:
    """A real gRPC service whose two methods raise the sample error of the reason the request names."""

    @status.translate_errors
    def unary(self, request: bytes, context):
        raise sample(errors.BY_REASON[request.decode()])

    @status.translate_errors
    def stream(self, request: bytes, context):
        yield b"first"
        raise sample(errors.BY_REASON[request.decode()])

    @staticmethod
    def bare(request: bytes, context):  # a status without a reason, as a fault or interceptor sends
        status.abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the job rolled back to step 3 in epoch 2")


@pytest.fixture(scope="module")
def failing():
    service = Failing()
    server = thread_pool_server(4)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Failing", {
        "Unary": grpc.unary_unary_rpc_method_handler(service.unary),
        "Stream": grpc.unary_stream_rpc_method_handler(service.stream),
        "Bare": grpc.unary_unary_rpc_method_handler(Failing.bare),
    })])
    port = bind(server, "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    server.stop(0)


def call(channel, method: str, reason: str = "") -> grpc.RpcError:
    try:
        if method == "Stream":
            list(channel.unary_stream(f"/test.Failing/{method}")(reason.encode(), timeout=10))
        else:
            channel.unary_unary(f"/test.Failing/{method}")(reason.encode(), timeout=10)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{method} did not fail")


@pytest.mark.parametrize("method", ["Unary", "Stream"])
@pytest.mark.parametrize("reason", sorted(errors.BY_REASON))
def test_each_reason_arrives_as_its_class_with_its_fields_and_the_servers_message(failing, reason, method):
    cls, sent = errors.BY_REASON[reason], sample(errors.BY_REASON[reason])
    exc = call(failing, method, reason)
    got = status.error_from_rpc(exc, "Fail")
    assert type(got) is cls and got.reason == reason
    assert got.values() == sent.values()
    assert got.code == cls.code == exc.code().name
    assert str(got) == f"Fail: {cls.code}: {sent}"  # the message for people, whole
    assert status.handler_ended(exc)  # the marker still travels beside the reason


def test_a_reworded_message_changes_nothing_a_receiver_acts_on(failing, reworded):
    for reason, cls in errors.BY_REASON.items():
        got = status.error_from_rpc(call(failing, "Unary", reason), "Fail")
        assert type(got) is cls and got.values() == sample(cls).values(), reason
        assert call(failing, "Unary", reason).details() == "reworded"


def test_a_status_without_a_reason_is_its_code_whatever_its_message_says(failing):
    exc = call(failing, "Bare")
    got = status.error_from_rpc(exc, "Bare")
    assert type(got) is errors.FailedPrecondition  # not RolledBack: its words are not read
    assert "rolled back to step 3" in str(got) and status.handler_ended(exc)


def test_a_port_that_refuses_is_told_by_its_errno_and_the_status_by_who_sent_it_never_by_words():
    import socket

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/shardps.v1.ShardService/GetShardStatus")(b"", timeout=10)
    got = status.error_from_rpc(caught.value, "GetShardStatus")
    assert type(got) is errors.Unavailable and got.from_transport  # retried like any unavailable server
    assert rpc.port_refuses(f"127.0.0.1:{port}", 1.0) and rpc.port_refuses(f"dns:///127.0.0.1:{port}", 1.0)
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        assert not rpc.port_refuses(f"127.0.0.1:{live.getsockname()[1]}", 1.0)  # a live port (maybe stuck)
    assert not rpc.port_refuses("unix:/tmp/nothing.sock", 1.0)  # no TCP port to ask


def test_an_error_a_shardps_handler_sent_is_not_from_the_transport():
    exc = errors.Unavailable("waiting for shard servers: 1/2 registered")
    assert not exc.from_transport


def test_every_reason_has_exactly_one_class_and_they_all_live_in_proto_errors():
    assert set(errors.BY_REASON) == errors.ALL_REASONS
    assert {cls.__module__ for cls in errors.BY_REASON.values()} == {errors.__name__}
    with pytest.raises(TypeError, match="belong in proto/errors.py"):
        type("Elsewhere", (errors.FailedPrecondition,), {"reason": errors.Reason.ROLLED_BACK, "__module__": __name__})
    with pytest.raises(TypeError, match="has no fields"):
        errors.RolledBack("x", stepp=1)


def test_no_code_in_the_package_decides_by_reading_an_error_message():
    """Whatever the behavioural tests do not reach: no ``... in str(x)`` / ``repr(x)`` / ``.args``,
    no regex over one, and no status text read (``.details()``) except where the message is kept."""
    found = []
    roles = [d for d in PACKAGE.iterdir() if (d / "__init__.py").exists() and d.name != "tests"]
    assert {"proto", "runtime", "server", "worker", "coordinator", "client"} <= {d.name for d in roles}
    for path in sorted(PACKAGE.glob("*.py")) + sorted(p for d in roles for p in d.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("proto/gen/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                found += [f"{rel}:{node.lineno}" for side in node.comparators if _is_text_of(side)]
            if isinstance(node, ast.Call) and _name(node.func) in {"re.search", "re.match", "re.fullmatch",
                                                                   "re.findall"} | _pattern_methods(node):
                found += [f"{rel}:{node.lineno}" for arg in node.args if _is_text_of(arg)]
            if isinstance(node, ast.Call) and _name(node.func).endswith(".details") and rel != "runtime/status.py":
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"decides on an error's words (use its reason and fields, proto/errors.py): {found}"


def _name(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _pattern_methods(node: ast.Call) -> set[str]:  # compiled_pattern.search(text) and the like
    return {_name(node.func)} if isinstance(node.func, ast.Attribute) and node.func.attr in {
        "search", "match", "fullmatch", "findall"} else set()


def _is_text_of(node) -> bool:
    """str(x), repr(x), x.args, x.details(), or a name such text is usually kept in: an error's words."""
    if isinstance(node, ast.Call) and _name(node.func) in {"str", "repr"}:
        return True
    if isinstance(node, ast.Name) and node.id in {"details", "message", "msg", "text"}:
        return True
    if isinstance(node, ast.Attribute) and node.attr == "args":
        return True
    return isinstance(node, ast.Call) and _name(node.func).endswith(".details")


# ---------------------------------------------------------------------- recovery, reworded

def sync_job(replicated: bool = False) -> JobConfig:
    return JobConfig(Layout.from_shapes([("w", (N,), "float32")]), "sgd", {"lr": 0.1}, UpdateMode.SYNC, 1,
                     replicas=2 if replicated else 1)


def serve(state: ShardState):
    """A real shard server (in-process) holding ``state``; returns (server, address)."""
    job = state.job
    node = ShardNode(0, lambda job_id: (job_id, job, []), lambda job_id, epoch: View(epoch, 0, (MemberInfo(0, 0),)))
    node.states[state.job_id] = state
    server = thread_pool_server(8)
    add_to_server(ShardServicer(node, 1 << 16, wait_timeout=10, threads=8), server)
    port = bind(server, "127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_a_push_a_server_cannot_read_from_shared_memory_goes_over_grpc_whatever_the_message_says(reworded):
    job = sync_job()
    state = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=10)
    state.initialize(torch.ones(N))
    server, address = serve(state)
    segment = Segment.create(N)
    segment.unlink()  # as if the server ran on another host: it cannot open the segment
    ps = PSClient([ShardInfo(state.shard, address)], "job", job.layout.fingerprint, 1 << 16, 10.0,
                  retry=Retrier(budget=0), worker_id=0, segment=segment)
    try:
        grad, values = torch.full((N,), 2.0), torch.zeros(N)
        staged = Staged(SimpleNamespace(wire=grad, grads=grad), 0, N, fp32=False)
        header = pb.PushHeader(worker_id=0, step=0, epoch=1,
                               options=pb.StepOptions(batch_size=1, hyperparams_json=job.hyper_json()))
        reply = ps.submit_push(ps.shards[0], staged, values, header, 0).result(30)
        assert ps.shm_ok == [False] and reply.version == 1  # refused by reason, then the same push over gRPC
        assert torch.allclose(values, torch.full((N,), 0.8)) and torch.equal(state.param, values)
        assert state.transport[0] == "grpc"
    finally:
        ps.close()
        segment.close()
        server.stop(0)


def test_a_primary_a_backup_calls_superseded_steps_down_whatever_the_message_says(reworded):
    job = sync_job(replicated=True)
    backup = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=10)
    backup.replica.assign(3, False, [], 30)  # it follows placement 3, made while the primary slept
    server, address = serve(backup)
    sender = ReplicaSender(1 << 16)
    primary = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=10)
    primary.send = sender.send
    primary.replica.assign(2, True, [], 30)
    primary.initialize(torch.ones(N))
    primary.replica.assign(2, True, [address], 30)
    outcome = []

    def ship():
        with primary.cond:
            try:
                replicas.ship(primary.replica, primary, None, primary.send, 10.0)
            except errors.ShardpsError as exc:
                outcome.append(exc)

    try:
        shipping = threading.Thread(target=ship)
        shipping.start()
        shipping.join(30)
        assert [type(e) for e in outcome] == [errors.NotPrimary]  # stepped down at once, no wait for a lease
        assert not primary.replica.primary and "follows placement epoch 3" in primary.replica.demoted
        assert not backup.initialized  # the stale copy was refused
    finally:
        for channel, _ in sender._stubs.values():
            channel.close()
        server.stop(0)



def test_a_backup_restarted_at_its_address_gets_the_next_copy_at_once_not_after_the_channels_backoff():
    """A primary keeps one channel per backup. Once the backup died, that channel waits out a reconnect
    backoff and fails calls with its last connect's error; the backup restarted at the same port must
    not look unreachable meanwhile (the coordinator would drop it as a backup, and a shard whose
    primary died next would have no in-sync copy to fail over to)."""
    import socket

    job = sync_job(replicated=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"

    def backup():
        state = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=10)
        state.replica.assign(2, False, [], 30)
        node = ShardNode(0, lambda job_id: (job_id, job, []), lambda job_id, e: View(e, 0, (MemberInfo(0, 0),)))
        node.states[state.job_id] = state
        server = thread_pool_server(8)
        add_to_server(ShardServicer(node, 1 << 16, wait_timeout=10, threads=8), server)
        assert bind(server, address) == port
        server.start()
        return state, server

    primary = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=10)
    primary.replica.assign(2, True, [], 30)
    primary.initialize(torch.linspace(0, 1, N))
    primary.replica.assign(2, True, [address], 30)
    sender = ReplicaSender(1 << 16)

    def copy():
        with primary.cond:
            replicas.send_copy(primary.replica, primary, address, sender.send)

    first, server = backup()
    try:
        copy()
        assert first.initialized
        server.stop(0).wait(10)
        with pytest.raises(errors.Unavailable):
            copy()  # the backup is gone: its kept channel now backs off before it dials again
        second, server = backup()  # restarted at the same address, a moment later
        copy()
        assert second.initialized and torch.equal(second.param, primary.param)
    finally:
        server.stop(0)
        for channel, _ in sender._stubs.values():
            channel.close()
