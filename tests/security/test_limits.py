"""Bounded resources: long waits are capped so health checks and pushes always find a thread, and a
request stream that stalls is cancelled."""
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from shardps import LocalCluster, ShardedOptimizer
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.gen import shardps_pb2_grpc as pb_grpc
from shardps.proto.limits import IdleStreamInterceptor, WaitSlots, Watchdog
from shardps.proto.rpc import check_health, open_channel


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
