"""Who may talk to the cluster: calls without the token, with a wrong one, or in plaintext to a TLS
cluster are refused with the right status and change nothing; with the right credentials training works."""
import glob
import os
import subprocess
from pathlib import Path

import grpc
import pytest
import torch

from shardps import LocalCluster, ShardedOptimizer
from shardps.coordinator.client import CoordinatorClient
from shardps.proto.errors import Unauthenticated, Unavailable
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.gen import shardps_pb2_grpc as pb_grpc
from shardps.runtime.rpc import check_health, open_channel
from shardps.runtime import shm
from shardps.runtime.security import Security, SecurityError

ROOT = Path(__file__).resolve().parents[2]


def train_two_steps(cluster, **kw):
    model = torch.nn.Linear(4, 2)
    with ShardedOptimizer(model, cluster=cluster.address, lr=0.1, connect_timeout=20, **kw) as opt:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step(batch_size=8)
        return opt.versions


def call_status(address, security):
    with open_channel(address, security) as channel:
        return pb_grpc.CoordinatorServiceStub(channel).GetJobStatus(pb.GetJobStatusRequest(), timeout=5)


@pytest.mark.slow
def test_a_token_protects_every_role_and_the_right_token_trains():
    with LocalCluster(servers=2, auth_token="s3cret") as cluster:
        for security in (Security(), Security(token="wrong")):
            with pytest.raises(grpc.RpcError) as err:
                call_status(cluster.address, security)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "SHARDPS_AUTH_TOKEN" in err.value.details()
            for shard in cluster.server_addresses.values():  # servers and their admin service too
                with open_channel(shard, security) as channel, pytest.raises(grpc.RpcError) as err:
                    pb_grpc.AdminServiceStub(channel).SetFaults(pb.SetFaultsRequest(clear=True), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert check_health(cluster.address, security=Security())  # probes stay open
        with pytest.raises(Unauthenticated, match="wrong auth token"):
            train_two_steps(cluster, auth_token="wrong")
        assert not call_status(cluster.address, cluster.security).job_id  # the refused worker changed nothing
        assert not [p for p in glob.glob(f"{shm.SHM_DIR}/shardps-*") if shm.creator(p)[0] == os.getpid()]  # nor left memory
        assert train_two_steps(cluster, auth_token="s3cret") == [2, 2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    res = subprocess.run([str(ROOT / "scripts" / "dev-certs.sh"), str(out)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot make certificates: {res.stderr.strip()}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls_refuses_plaintext_and_unsigned_clients_and_trains_with_certificates(certs, mutual, monkeypatch):
    with LocalCluster(servers=1, tls_dir=certs, mutual_tls=mutual, auth_token="t") as cluster:
        with CoordinatorClient(cluster.address, security=Security(token="t")) as plain:
            with pytest.raises(Unavailable):  # plaintext to a TLS server: the handshake fails
                plain.status()
        if mutual:  # TLS, but no client certificate
            with CoordinatorClient(cluster.address, security=Security(token="t", tls_ca=str(certs / "ca.pem"))) as c:
                with pytest.raises(Unavailable):
                    c.status()
        assert call_status(cluster.address, cluster.security).num_servers == 1
        for key, value in cluster.security.env().items():  # a worker configured from the environment
            monkeypatch.setenv(key, value)
        assert train_two_steps(cluster) == [2]


def test_half_configured_credentials_are_refused_with_the_fix():
    with pytest.raises(SecurityError, match="both SHARDPS_TLS_CERT and SHARDPS_TLS_KEY"):
        Security(tls_cert="a.pem")
    with pytest.raises(SecurityError, match="needs SHARDPS_TLS_CA"):
        Security(tls_cert="a.pem", tls_key="k.pem", client_auth=True)
    with pytest.raises(SecurityError, match="dev-certs.sh"):
        Security(tls_ca="/nonexistent/ca.pem").channel_credentials()
