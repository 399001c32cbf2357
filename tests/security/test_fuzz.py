"""A bounded fuzz campaign against a live cluster: hostile structured requests and raw bytes to every
RPC of every role. No call may crash a handler (UNKNOWN), nothing a worker's credential allows may
change the training state, and afterwards every role is healthy and training goes on.

Seeded, so a failure reproduces; SHARDPS_FUZZ_CALLS scales the campaign (default 2,500 calls).
"""
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2_grpc

from shardps import LocalCluster, ShardedOptimizer
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.gen import shardps_pb2_grpc as pb_grpc
from shardps.runtime.rpc import check_health, open_channel

from fuzzing import SERVICES, Fuzzer

CALLS = int(os.environ.get("SHARDPS_FUZZ_CALLS", "2500"))


def state_of(cluster, opt):
    with open_channel(cluster.address, cluster.admin_security) as channel:
        st = pb_grpc.CoordinatorServiceStub(channel).GetJobStatus(pb.GetJobStatusRequest(), timeout=10)
    digests = []
    for address in cluster.server_addresses.values():
        with open_channel(address, cluster.admin_security) as channel:
            digests.append(pb_grpc.ShardServiceStub(channel).GetShardStatus(
                pb.GetShardStatusRequest(include_digest=True), timeout=10).state_digest)
    return (st.job_id, st.view.SerializeToString(), st.plan.SerializeToString(), st.job_names, digests)


def one_call(channel, path, method, payload, raw):
    def identity(b):
        return b

    serialize = identity if raw else (lambda m: m.SerializeToString())
    kinds = (method.client_streaming, method.server_streaming)
    make = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[kinds]
    fn = make(path, request_serializer=serialize, response_deserializer=identity)
    try:
        reply = fn(iter(payload) if method.client_streaming else payload, timeout=1.5)
        if method.server_streaming:
            list(reply)
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


@pytest.mark.slow
def test_a_fuzz_campaign_crashes_nothing_changes_nothing_and_leaves_every_role_healthy():
    with LocalCluster(servers=2) as cluster:
        # Worker id 0 goes to a job that ends at once: unset fields default to 0, and the live worker's
        # own calls (leave, heartbeat) are its right, so the fuzzer must never speak for it.
        ShardedOptimizer(torch.nn.Linear(2, 2), cluster=cluster.address, job="warmup", lr=0.1).close()
        model = torch.nn.Linear(40, 8)
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 40)).sum().backward()
            opt.step()
        before = state_of(cluster, opt)
        targets = [pb.ShardTarget(job_id=opt.job_id, fingerprint=opt.job.layout.fingerprint, shard_id=s.range.shard_id,
                                  start=s.range.start, stop=s.range.stop) for s in opt.plan]
        # Never the live worker's id, and no real target for LoadState: those calls are a worker's right.
        fuzz = Fuzzer(seed=12345, known_strings=[opt.job_id, opt.job.layout.fingerprint],
                      avoid_ints=[opt.worker_id], targets=targets, no_targets=["LoadStateRequest"])
        targets = {"shardps.v1.CoordinatorService": [cluster.address],
                   "shardps.v1.ShardService": list(cluster.server_addresses.values()),
                   "shardps.v1.AdminService": [cluster.address, *cluster.server_addresses.values()]}
        calls = []
        for i in range(CALLS):
            service = fuzz.rng.choice(list(SERVICES))
            method = fuzz.rng.choice(list(SERVICES[service].methods))
            raw = i % 5 == 0
            if raw:
                payload = [fuzz.raw() for _ in range(2)] if method.client_streaming else fuzz.raw()
            else:
                payload = fuzz.stream(method) if method.client_streaming else fuzz.request(method)
            calls.append((fuzz.rng.choice(targets[service]), f"/{service}/{method.name}", method, payload, raw))
        channels = {a: open_channel(a, cluster.security) for a in {c[0] for c in calls}}  # a worker's credential
        try:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda c: (c[1],) + one_call(channels[c[0]], *c[1:]), calls))
        finally:
            for channel in channels.values():
                channel.close()
        codes = Counter(code for _, code, _ in answers)
        crashes = [(path, code, details[:200]) for path, code, details in answers
                   if code == "UNKNOWN" or (code == "INTERNAL" and "deserializ" not in details.lower())]
        assert not crashes, crashes[:10]
        assert codes["INVALID_ARGUMENT"] > 0 and codes["PERMISSION_DENIED"] > 0  # the campaign reached the checks
        assert state_of(cluster, opt) == before  # nothing changed
        assert all(check_health(a, timeout=5) for a in [cluster.address, *cluster.server_addresses.values()])
        opt.zero_grad()
        model(torch.randn(4, 40)).sum().backward()
        opt.step()  # and training goes on
        assert opt.versions == [3, 3]
        opt.close()


@pytest.mark.slow
def test_internal_calls_with_the_clusters_own_credential_and_hostile_values_crash_nothing():
    with LocalCluster(servers=2) as cluster:
        model = torch.nn.Linear(40, 8)
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=0.01)
        fuzz = Fuzzer(seed=777, avoid_ints=[opt.worker_id, 0, 1])  # random job ids: no real rollback happens
        internal = [("shardps.v1.CoordinatorService", n) for n in ("RegisterServer", "ReportRestore")] + \
                   [("shardps.v1.ShardService", n) for n in ("SetMembership", "Rollback", "Checkpoint", "ListCheckpoints")]
        answers = []
        with ThreadPoolExecutor(4) as pool:
            jobs = []
            for i in range(min(CALLS // 5, 500)):
                service, name = internal[i % len(internal)]
                method = SERVICES[service].methods_by_name[name]
                address = cluster.address if "Coordinator" in service else cluster.server_addresses[i % 2]
                channel = open_channel(address, cluster.admin_security)
                jobs.append((channel, pool.submit(one_call, channel, f"/{service}/{name}", method,
                                                  fuzz.request(method), False)))
            for channel, job in jobs:
                answers.append(job.result())
                channel.close()
        assert not [a for a in answers if a[0] in ("UNKNOWN", "INTERNAL")], answers[:5]
        # a RegisterServer that named a valid id may have moved a server's address: put them back
        with open_channel(cluster.address, cluster.admin_security) as channel:
            for shard_id, address in cluster.server_addresses.items():
                pb_grpc.CoordinatorServiceStub(channel).RegisterServer(
                    pb.RegisterServerRequest(address=address, shard_id=shard_id), timeout=10)
        assert all(check_health(a, timeout=5) for a in [cluster.address, *cluster.server_addresses.values()])
        opt.zero_grad()
        model(torch.randn(4, 40)).sum().backward()
        opt.step()
        opt.close()


@pytest.mark.slow
def test_hostile_health_floods_and_stalled_streams_freeze_no_role_and_training_goes_on():
    """Seeded: hundreds of health calls (mostly Watches with deadlines of 1 ms..1 s, hostile service names)
    from several threads, while request streams to every streaming RPC stall after zero or one message."""
    with LocalCluster(servers=2) as cluster:
        model = torch.nn.Linear(40, 8)
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=0.01)
        roles = [cluster.address, *cluster.server_addresses.values()]
        fuzz = Fuzzer(seed=4242)
        health_calls = [(fuzz.rng.choice(roles), *fuzz.health_call()) for _ in range(min(CALLS // 5, 500))]
        streaming = [m for m in SERVICES["shardps.v1.ShardService"].methods if m.client_streaming]
        stalls = [(fuzz.rng.choice(list(cluster.server_addresses.values())), method, fuzz.stalled_stream(method))
                  for method in (fuzz.rng.choice(streaming) for _ in range(24))]
        release, stalled = threading.Event(), []

        def stall(address, method, sent):
            def requests():
                yield from sent
                release.wait(120)

            with open_channel(address, cluster.security) as channel:
                fn = (channel.stream_stream if method.server_streaming else channel.stream_unary)(
                    f"/shardps.v1.ShardService/{method.name}", request_serializer=lambda m: m.SerializeToString())
                try:
                    reply = fn(requests(), timeout=120)
                    if method.server_streaming:
                        list(reply)
                    stalled.append("OK")
                except grpc.RpcError as exc:
                    stalled.append(exc.code().name)

        def health(address, method, request, deadline):
            with grpc.insecure_channel(address) as channel:  # health needs no credential
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    reply = getattr(stub, method)(request, timeout=deadline)
                    if method == "Watch":
                        list(reply)
                    return "OK"
                except grpc.RpcError as exc:
                    return exc.code().name

        stallers = [threading.Thread(target=stall, args=s, daemon=True) for s in stalls]
        for t in stallers:
            t.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                codes = Counter(pool.map(lambda c: health(*c), health_calls))
            assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "NOT_FOUND"}, codes
            assert all(check_health(a, timeout=5) for a in roles)  # while the streams may still stall
            opt.zero_grad()
            model(torch.randn(4, 40)).sum().backward()
            opt.step()
            assert opt.versions == [1, 1]
        finally:
            release.set()
            for t in stallers:
                t.join(timeout=150)
        assert len(stalled) == len(stalls) and "UNKNOWN" not in stalled, Counter(stalled)
        opt.close()
