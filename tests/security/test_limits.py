"""Bounded resources: long waits are capped so health checks and pushes always find a thread, a
request stream that stalls (or never starts) is cancelled, and no flood of health calls freezes a role."""
import random
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps import LocalCluster, ShardedOptimizer
from shardps.runtime.server import role_server
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.gen import shardps_pb2_grpc as pb_grpc
from shardps.runtime.limits import IdleStreamInterceptor, WaitSlots, Watchdog, peer_host
from shardps.runtime.rpc import check_health, open_channel
from shardps.runtime.security import Security


@pytest.mark.slow
def test_health_and_training_go_on_while_a_hundred_long_waits_are_pending():
    with LocalCluster(servers=1) as cluster:
        model = torch.nn.Linear(8, 2)
        opt = ShardedOptimizer(model, cluster=cluster.address, lr=0.1)
        shard = opt.plan[0]
        target = pb.ShardTarget(job_id=opt.job_id, fingerprint=opt.job.layout.fingerprint, shard_id=0,
                                start=shard.range.start, stop=shard.range.stop)
        codes, lock = [], threading.Lock()

        def wait_call(kind):
            address = cluster.address if kind == "watch" else shard.address
            with open_channel(address, cluster.admin_security) as channel:
                try:
                    if kind == "watch":
                        pb_grpc.CoordinatorServiceStub(channel).WatchMembership(pb.WatchMembershipRequest(
                            job_id=opt.job_id, after_epoch=10 ** 9, timeout_ms=15_000), timeout=20)
                    elif kind == "pull":
                        list(pb_grpc.ShardServiceStub(channel).Pull(pb.PullRequest(target=target,
                                                                                     min_version=10 ** 9), timeout=20))
                    else:
                        pb_grpc.ShardServiceStub(channel).Checkpoint(pb.CheckpointRequest(
                            at_version=10 ** 9, timeout_ms=15_000), timeout=20)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
            with lock:
                codes.append((kind, code))

        kinds = ["watch"] * 40 + ["pull"] * 30 + ["checkpoint"] * 30
        threads = [threading.Thread(target=wait_call, args=(k,), daemon=True) for k in kinds]
        for t in threads:
            t.start()
        time.sleep(2)  # let them all arrive and park
        assert check_health(cluster.address, timeout=3) and check_health(shard.address, timeout=3)
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()  # a push still finds a thread
        assert opt.versions == [1]
        for t in threads:
            t.join(timeout=60)
        opt.close()
    refused = [k for k, c in codes if c == "UNAVAILABLE"]
    assert len(codes) == 100 and len(refused) > 0  # the ones over the cap were answered at once
    assert {c for _, c in codes} <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION",
                                     "RESOURCE_EXHAUSTED"}  # never a crash


def test_wait_slots_refuse_one_more_than_their_limit_at_once():
    slots = WaitSlots(2, "things")
    with slots.slot(), slots.slot():
        with pytest.raises(Exception, match="2 things are pending"):
            with slots.slot():
                pass
    with slots.slot():  # freed again
        pass


def test_a_request_stream_that_stalls_is_cancelled_and_frees_its_thread():
    received, ended = [], threading.Event()

    def upload(request_iterator, context):
        try:
            for message in request_iterator:
                received.append(message)
        finally:  # a cancelled call's request iterator raises or just ends, as gRPC's threads meet
            ended.set()
        return b"done"

    handler = grpc.method_handlers_generic_handler("t.T", {"Up": grpc.stream_unary_rpc_method_handler(
        upload, request_deserializer=bytes, response_serializer=bytes)})
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[IdleStreamInterceptor(Watchdog(0.1), 1.0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stall = threading.Event()

    def requests():
        yield b"first"
        stall.wait(30)  # never sends the rest

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary("/t.T/Up", request_serializer=bytes, response_deserializer=bytes)
            with pytest.raises(grpc.RpcError) as err:
                call(requests(), timeout=20)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert ended.wait(10) and received == [b"first"]  # the handler's thread was let go
    finally:
        stall.set()
        server.stop(0)


def digits_step(opt, model, step: int) -> None:
    """One training step on a batch of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(step))[:32]
    x = torch.tensor(digits.data[idx.numpy()], dtype=torch.float32) / 16.0
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), torch.tensor(digits.target[idx.numpy()])).backward()
    opt.step()


def flood_health(address: str, watches: int, checks: int, callers: int = 8) -> dict:
    """``callers`` threads, each with its own channel, open ``watches`` Watch calls with a 50 ms deadline
    and make ``checks`` Check calls; returns the count of each status code they ended with."""
    codes, lock = {}, threading.Lock()

    def caller(i):
        calls = ["watch"] * watches + ["check"] * checks
        random.Random(i).shuffle(calls)
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for n, kind in enumerate(calls):
                try:
                    if kind == "watch":
                        for _ in stub.Watch(health_pb2.HealthCheckRequest(service="" if n % 2 else "x"), timeout=0.05):
                            pass
                    else:
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return codes


@pytest.mark.slow
def test_a_flood_of_short_health_watches_and_checks_freezes_no_role_and_training_goes_on():
    with LocalCluster(servers=1) as cluster:
        model = torch.nn.Linear(64, 10)
        opt = ShardedOptimizer(model, cluster=cluster.address, lr=0.1)
        digits_step(opt, model, 0)
        roles = [cluster.address, *cluster.server_addresses.values()]
        floods = {address: flood_health(address, watches=50, checks=25) for address in roles}
        for codes in floods.values():  # every call was answered: served, refused or out of time, never a crash
            assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "NOT_FOUND"}, codes
            assert sum(codes.values()) == 8 * 75
        assert all(check_health(address, timeout=10) for address in roles)
        digits_step(opt, model, 1)  # the roles still train
        assert opt.versions == [2]
        opt.close()


class IdleStreams:
    """``n`` Push streams to ``address`` that never send a first message. ``ends[i]`` becomes
    (code, details) when stream i's call ends; ``wait_for`` waits for a condition on them."""

    def __init__(self, address: str, n: int, security):
        self.ends: list = [None] * n
        self.changed, self.release = threading.Condition(), threading.Event()
        for i in range(n):
            threading.Thread(target=self._idle, args=(address, security, i), daemon=True).start()

    def _idle(self, address, security, i):
        def nothing():
            self.release.wait(120)
            return
            yield  # pragma: no cover - a generator that sends nothing

        with open_channel(address, security) as channel:
            push = channel.stream_stream("/shardps.v1.ShardService/Push")
            try:
                for _ in push(nothing(), timeout=120):
                    pass
                end = ("OK", "")
            except grpc.RpcError as exc:
                end = (exc.code().name, exc.details() or "")
        with self.changed:
            self.ends[i] = end
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float = 60) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.ends), timeout)


@pytest.mark.slow
def test_streams_that_send_nothing_are_cancelled_and_health_status_and_training_go_on_meanwhile(monkeypatch):
    # 16 handler threads: 8 for long calls, 8 kept for the rest; each idle stream is cancelled after 8 s.
    monkeypatch.setenv("SHARDPS_THREADS", "16")
    monkeypatch.setenv("SHARDPS_FIRST_MESSAGE_TIMEOUT", "8")
    with LocalCluster(servers=1) as cluster:
        model = torch.nn.Linear(64, 10)
        opt = ShardedOptimizer(model, cluster=cluster.address, lr=0.1)
        shard = cluster.server_addresses[0]
        streams = IdleStreams(shard, 24, cluster.security)  # more streams than the server has threads
        try:
            # the 8 admitted ones hold every long-call slot, so the other 16 are refused at once
            assert streams.wait_for(lambda ends: sum(e is not None and e[0] == "UNAVAILABLE" for e in ends) == 16)
            refused = [e for e in streams.ends if e is not None and e[0] == "UNAVAILABLE"]
            assert "long calls" in refused[0][1]
            # While they are held, health and status answer from the threads kept for them...
            assert check_health(shard, timeout=5)
            with open_channel(shard, cluster.security) as channel:
                status = pb_grpc.ShardServiceStub(channel).GetShardStatus(pb.GetShardStatusRequest(), timeout=5)
            assert status.shard_id == 0
            assert None in streams.ends  # (the answers came while streams were still held)
            # ...and a push is refused (UNAVAILABLE), retried, and lands once the idle streams are cancelled.
            digits_step(opt, model, 0)
            assert opt.versions == [1]
            assert streams.wait_for(lambda ends: None not in ends)
            # cancelled by the server (the first-message timeout), long before their 120 s deadline
            assert sorted(e[0] for e in streams.ends) == ["CANCELLED"] * 8 + ["UNAVAILABLE"] * 16
        finally:
            streams.release.set()
        opt.close()


def test_one_host_gets_at_most_its_stream_cap_and_the_extra_stream_is_refused_at_once():
    """In-process role server (the real interceptors) with a cap of 2 request streams per host."""
    entered, release = threading.Semaphore(0), threading.Event()

    def upload(request_iterator, context):
        for _ in request_iterator:
            entered.release()
            release.wait(30)
        return b"done"

    server, _ = role_server(16, security=Security(), streams_per_host=2)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "Up": grpc.stream_unary_rpc_method_handler(upload, request_deserializer=bytes, response_serializer=bytes)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    outcomes = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            up = channel.stream_unary("/t.T/Up", request_serializer=bytes, response_deserializer=bytes)
            held = [up.future(iter([b"x"]), timeout=60) for _ in range(2)]
            assert entered.acquire(timeout=30) and entered.acquire(timeout=30)  # both streams are being served
            with pytest.raises(grpc.RpcError) as err:
                up(iter([b"x"]), timeout=30)
            release.set()
            outcomes = [f.result(timeout=30) for f in held]
            assert up(iter([b"x"]), timeout=30) == b"done"  # slots are freed once the streams end
    finally:
        release.set()
        server.stop(0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # retried by workers (runtime.retry)
    assert "from 127.0.0.1" in err.value.details() and "SHARDPS_STREAMS_PER_HOST" in err.value.details()
    assert outcomes == [b"done", b"done"]


def test_the_caller_is_the_peers_host():
    assert peer_host("ipv4:10.0.0.5:41234") == "10.0.0.5"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"


@pytest.mark.slow
def test_a_sync_job_whose_pushes_fill_every_long_call_slot_still_trains(monkeypatch):
    # 12 handler threads keep 6 for quick calls and admit 6 long ones: six workers' pushes park at the
    # barrier together, so admission must take all of them, every step.
    monkeypatch.setenv("SHARDPS_THREADS", "12")
    workers, steps = 6, 3
    with LocalCluster(servers=1) as cluster:
        errors, versions = [], []

        def worker(rank):
            try:
                torch.manual_seed(0)
                model = torch.nn.Linear(64, 10)
                opt = ShardedOptimizer(model, cluster=cluster.address, lr=0.1, min_workers=workers)
                for step in range(steps):
                    digits_step(opt, model, 100 * rank + step)
                versions.append(opt.versions)
                opt.close()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(rank,), daemon=True) for rank in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=400)
    assert not errors, errors
    assert versions == [[steps]] * workers  # one update per step, each from all six pushes


def serve_health(**limits):
    from shardps.runtime.health import HealthService

    health = HealthService(**limits)
    server = grpc.server(futures.ThreadPoolExecutor(8))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, health, f"127.0.0.1:{port}"


def test_health_watch_sends_the_status_then_every_change_and_shutdown_is_final():
    server, health, address = serve_health()
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            health.set("svc", SERVING)
            assert next(watch).status == SERVING
            health.enter_graceful_shutdown()
            assert next(watch).status == NOT_SERVING
            health.set("svc", SERVING)  # ignored from now on
            assert stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=5).status == NOT_SERVING
            assert stub.List(health_pb2.HealthListRequest(), timeout=5).statuses["svc"].status == NOT_SERVING
            watch.cancel()
    finally:
        server.stop(0)


def test_health_watches_over_the_per_caller_cap_are_refused_at_once_and_their_slots_come_back():
    server, health, address = serve_health(max_watches=4, watches_per_caller=2)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            open_ = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(2)]
            assert [next(w).status for w in open_] == [health_pb2.HealthCheckResponse.SERVING] * 2
            with pytest.raises(grpc.RpcError) as err:
                next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per caller" in err.value.details()
            for w in open_:
                w.cancel()
            # a cancelled watch gives its slot back once its handler sees the caller gone (one poll)
            again = threading.Event()

            def reopen():
                for _ in range(200):
                    try:
                        next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=5))
                        again.set()
                        return
                    except grpc.RpcError:
                        time.sleep(0.05)

            threading.Thread(target=reopen, daemon=True).start()
            assert again.wait(30)
    finally:
        server.stop(0)
