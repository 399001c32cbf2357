"""Faults against a live sync job (real processes, real signals, real gRPC): nothing is applied
twice, nothing is lost, and the run still equals the fault-free one."""
import json
import sys
import time
from pathlib import Path

import grpc
import pytest

from shardps import LocalCluster
from shardps import chaos
from shardps.client.sdk import cluster_status
from shardps.coordinator.client import CoordinatorClient
from shardps.proto.errors import InvalidArgument, ShardpsError
from shardps.runtime.faults import FaultRule
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.gen import shardps_pb2_grpc as pb_grpc
from shardps.runtime.rpc import open_channel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from task import reference  # noqa: E402

STEPS, SIZES, KWARGS = 30, [24, 40], {"lr": 0.01}


def assert_equals_fault_free_run(results):
    ref_params, _ = reference(results[0]["initial"], "adam", KWARGS, SIZES, False, STEPS)
    for r in results:
        assert r["versions"] == [STEPS, STEPS]
        for key, value in ref_params.items():
            assert (r["final"][key] - value).abs().max().item() <= 1e-5, key


def applied_pushes(shard):
    return shard["pushes"] - shard["duplicates"] - shard["rejected"] - shard["dropped"]


def wait_for_version(cluster, version, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shards = cluster_status(cluster.address)["shards"]
        if all(s.get("version", 0) >= version for s in shards):
            return
        time.sleep(0.1)
    raise AssertionError(f"the job did not reach version {version} within {timeout}s")


@pytest.mark.slow
def test_retry_storm_applies_every_push_exactly_once(spawn_workers):
    """Push replies are lost after the shard applied the push; every retry is deduplicated."""
    with LocalCluster(servers=2) as cluster:
        chaos.set_rpc_faults(cluster, "servers", [
            FaultRule(kind="abort", method="Push", status="UNAVAILABLE", probability=0.4, after=True)])
        results = spawn_workers(cluster, 2, optimizer="adam", kwargs=json.dumps(KWARGS),
                                sizes=",".join(map(str, SIZES)), steps=STEPS).wait()
        status = cluster_status(cluster.address)
        shards = status["shards"]
        injected = chaos.get_rpc_faults(cluster, "servers")
    lost = sum(role["injected"].get("abort/Push", 0) for role in injected.values())
    assert sum(c.get("abort/Push", 0) for c in status["faults_injected"].values()) == lost  # status shows them too
    assert lost >= 5  # the storm happened (expected ~0.4 x 120 pushes)
    for shard in shards:
        assert shard["version"] == STEPS  # one update per step, no more
        assert applied_pushes(shard) == 2 * STEPS  # every worker's push applied exactly once
    assert sum(s["duplicates"] for s in shards) == lost  # each lost reply came back as one deduplicated retry
    assert sum(r["retries"]["by_code"].get("UNAVAILABLE", 0) for r in results) == lost
    assert_equals_fault_free_run(results)


@pytest.mark.slow
def test_a_server_paused_longer_than_the_client_deadline_recovers_without_help(spawn_workers):
    with LocalCluster(servers=2) as cluster:
        workers = spawn_workers(cluster, 2, optimizer="adam", kwargs=json.dumps(KWARGS),
                                sizes=",".join(map(str, SIZES)), steps=STEPS, step_timeout=2, retry_timeout=60,
                                sleep=0.05)
        wait_for_version(cluster, 5)
        cluster.pause("server-1")
        time.sleep(5)  # 2.5 client deadlines
        cluster.resume("server-1")
        results = workers.wait()
        shards = cluster_status(cluster.address)["shards"]
    assert sum(r["retries"]["timeouts"] for r in results) >= 2  # each worker timed out at least once
    for shard in shards:
        assert shard["version"] == STEPS and applied_pushes(shard) == 2 * STEPS
    assert_equals_fault_free_run(results)


@pytest.mark.slow
def test_rules_expire_after_max_count_delay_calls_and_are_counted_per_role():
    with LocalCluster(servers=1) as cluster, CoordinatorClient(cluster.address) as coord:
        rules = chaos.set_rpc_faults(cluster, "coordinator", [
            FaultRule(kind="abort", method="GetJob", status="RESOURCE_EXHAUSTED", max_count=2)])
        assert [r.kind for r in rules["coordinator"]] == ["abort"]
        for _ in range(2):
            with pytest.raises(ShardpsError, match="RESOURCE_EXHAUSTED"):
                coord.job()
        assert coord.job()[0] == ""  # the rule expired after 2 faults
        chaos.set_rpc_faults(cluster, "coordinator", [FaultRule(kind="delay", method="GetJob", delay_s=0.3)],
                             clear=True)
        start = time.monotonic()
        coord.job()
        assert time.monotonic() - start >= 0.3
        # A bad rule is refused with INVALID_ARGUMENT and changes nothing.
        with open_channel(cluster.address, cluster.admin_security) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.AdminServiceStub(channel).SetFaults(
                pb.SetFaultsRequest(add=[pb.FaultRule(kind="explode")], clear=True), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fault kind" in err.value.details()
        faults = chaos.get_rpc_faults(cluster, "coordinator")["coordinator"]
        assert [r.kind for r in faults["rules"]] == ["delay"]
        assert faults["injected"] == {"abort/GetJob": 2, "delay/GetJob": 1}
        assert chaos.get_rpc_faults(cluster, "server-0")["server-0"]["injected"] == {}


def test_fault_rules_are_checked():
    for bad in [dict(kind="explode"), dict(kind="abort", probability=0), dict(kind="abort", status="NOPE"),
                dict(kind="delay"), dict(kind="abort", max_count=-1)]:
        with pytest.raises(InvalidArgument):
            FaultRule(**bad)
