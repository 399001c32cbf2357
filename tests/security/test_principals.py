"""Three principals: workers train; only the cluster's own roles and its operators change membership,
roll shards back, register servers, inject faults or write checkpoints. A local cluster guards those
calls by default (it makes up its own credential); a forged call is refused and changes nothing."""
import json

import grpc
import pytest
import torch

from shardps import LocalCluster, ShardedOptimizer
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.gen import shardps_pb2_grpc as pb_grpc
from shardps.runtime.rpc import open_channel
from shardps.runtime.security import Security


@pytest.fixture(scope="module")
def trained():
    with LocalCluster(servers=2) as cluster:
        model = torch.nn.Linear(16, 4)
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
        yield cluster, opt
        opt.close()


def snapshot(cluster, security):
    """Everything a forged call could change: the coordinator's view of the job and each shard's digest."""
    with open_channel(cluster.address, security) as channel:
        st = pb_grpc.CoordinatorServiceStub(channel).GetJobStatus(pb.GetJobStatusRequest(), timeout=10)
    digests = []
    for address in cluster.server_addresses.values():
        with open_channel(address, security) as channel:
            digests.append(pb_grpc.ShardServiceStub(channel).GetShardStatus(
                pb.GetShardStatusRequest(include_digest=True), timeout=10).state_digest)
    return st.job_id, json.dumps([(s.shard_id, s.address) for s in st.plan.shards]), st.view.SerializeToString(), digests


def forged_calls(cluster, opt):
    """(name, call) pairs of internal and admin calls, each made over ``channel_of(address)``."""
    view = pb.MembershipView(epoch=2 ** 40, start_step=0, members=[pb.Member(worker_id=999, rank=0)])
    shard = cluster.server_addresses[0]
    return [
        ("RegisterServer", cluster.address, lambda ch: pb_grpc.CoordinatorServiceStub(ch).RegisterServer(
            pb.RegisterServerRequest(address="evil.example:1", shard_id=0), timeout=10)),
        ("ReportRestore", cluster.address, lambda ch: pb_grpc.CoordinatorServiceStub(ch).ReportRestore(
            pb.ReportRestoreRequest(job_id=opt.job_id, shard_id=-1, version=0), timeout=10)),
        ("SetMembership", shard, lambda ch: pb_grpc.ShardServiceStub(ch).SetMembership(
            pb.SetMembershipRequest(job_id=opt.job_id, view=view), timeout=10)),
        ("Rollback", shard, lambda ch: pb_grpc.ShardServiceStub(ch).Rollback(
            pb.RollbackRequest(job_id=opt.job_id, version=12345, epoch=2 ** 62), timeout=10)),
        ("Checkpoint", shard, lambda ch: pb_grpc.ShardServiceStub(ch).Checkpoint(pb.CheckpointRequest(), timeout=10)),
        ("SetFaults", shard, lambda ch: pb_grpc.AdminServiceStub(ch).SetFaults(
            pb.SetFaultsRequest(add=[pb.FaultRule(kind="abort", status="UNAVAILABLE", probability=1.0)]),
            timeout=10)),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("who", ["anyone", "a worker"])
def test_internal_and_admin_calls_without_the_cluster_credential_are_refused_and_change_nothing(trained, who):
    cluster, opt = trained
    security = Security() if who == "anyone" else cluster.security  # what a worker of this cluster holds
    assert not security.cluster_token
    before = snapshot(cluster, cluster.admin_security)
    for name, address, call in forged_calls(cluster, opt):
        with open_channel(address, security) as channel, pytest.raises(grpc.RpcError) as err:
            call(channel)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert "SHARDPS_CLUSTER_TOKEN" in err.value.details()
    assert snapshot(cluster, cluster.admin_security) == before
    assert opt.pull() == [2, 2]  # training goes on as before


@pytest.mark.slow
def test_the_operator_credential_may_make_them_and_bad_values_are_still_refused(trained):
    cluster, opt = trained
    before = snapshot(cluster, cluster.admin_security)
    codes = {}
    for name, address, call in forged_calls(cluster, opt):
        if name in ("Checkpoint", "SetFaults"):
            continue  # legitimate operator actions; the other tests cover them
        with open_channel(address, cluster.admin_security) as channel:
            try:
                call(channel)
                codes[name] = "OK"
            except grpc.RpcError as exc:
                codes[name] = exc.code().name
    # Even with the credential: a shard id out of range and epochs of 2^40 and 2^62 are refused;
    # re-registering shard 0's address is a member's right (it is put back below).
    assert codes["ReportRestore"] == "INVALID_ARGUMENT"
    assert codes["Rollback"] == codes["SetMembership"] == "INVALID_ARGUMENT"
    assert codes["RegisterServer"] == "OK"
    with open_channel(cluster.address, cluster.admin_security) as channel:
        pb_grpc.CoordinatorServiceStub(channel).RegisterServer(
            pb.RegisterServerRequest(address=cluster.server_addresses[0], shard_id=0), timeout=10)
    after = snapshot(cluster, cluster.admin_security)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]


@pytest.mark.slow
@pytest.mark.parametrize("spec, words", [
    (dict(shape=[-3, 4]), "dimensions must be >= 0"),
    (dict(optimizer="evil"), "unknown optimizer"),
    (dict(kwargs='{"lr": "x", "fused": true}'), "rejects"),
    (dict(kwargs="[" * 5000 + "]" * 5000), "not JSON"),
    (dict(kwargs='{"lr": Infinity}'), "finite"),
    (dict(min_workers=-1), "min_workers"),
])
def test_a_bad_first_registration_is_refused_whole_and_a_real_worker_then_defines_the_job(spec, words):
    with LocalCluster(servers=1, durable=False) as cluster:
        layout = pb.Layout(params=[pb.ParamInfo(name="w", shape=spec.get("shape", [3, 4]), dtype=pb.DTYPE_FLOAT32)],
                           numel=12)
        from shardps.proto.layout import fingerprint_of

        layout.fingerprint = fingerprint_of([("w", tuple(spec.get("shape", [3, 4])))])
        job = pb.JobSpec(layout=layout, mode=pb.UPDATE_MODE_SYNC, min_workers=spec.get("min_workers", 1),
                         optimizer=pb.OptimizerSpec(name=spec.get("optimizer", "sgd"),
                                                    kwargs_json=spec.get("kwargs", '{"lr": 0.1}')))
        with open_channel(cluster.address) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.CoordinatorServiceStub(channel).RegisterWorker(pb.RegisterWorkerRequest(job=job), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        model = torch.nn.Linear(4, 3)
        with ShardedOptimizer(model, cluster=cluster.address, lr=0.1) as opt:  # the cluster is not poisoned
            assert opt.job.optimizer == "sgd" and opt.versions == [0]
