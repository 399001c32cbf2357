"""Saving a shard's state (a digest, a checkpoint, an export) takes no copy of it in the server's
memory: a server sized by its memory formula must not be killed exactly when it saves."""
import pytest
import torch

from shardps import LocalCluster, ShardedOptimizer
from shardps.client.sdk import checkpoint_cluster, export_model, shard_status


def rss(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def grown_by(pid: int, action) -> int:
    """How far ``pid``'s peak RSS rose above its RSS while ``action`` ran (proc(5): clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = rss(pid, "VmRSS")
    action()
    return rss(pid, "VmHWM") - before


@pytest.mark.slow
def test_digest_checkpoint_and_export_of_a_real_server_take_no_copy_of_its_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4096, 6144)  # 25.2M parameters: Adam's state is 302 MB on the one server
    numel = sum(p.numel() for p in model.parameters())
    state_bytes = 12 * numel  # fp32 parameters, exp_avg, exp_avg_sq
    with LocalCluster(servers=1, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=0) as cluster:
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=1e-3, min_workers=1,
                               transport="grpc")
        try:
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(4, 4096)).square().mean().backward()
                opt.step(batch_size=4)
            pid, address = cluster.pid("server-0"), cluster.server_address(0)
            grown = {
                "digest": grown_by(pid, lambda: shard_status(address, digest=True, timeout=120)),
                "checkpoint": grown_by(pid, lambda: checkpoint_cluster(cluster.address,
                                                                       security=cluster.admin_security)),
                "export": grown_by(pid, lambda: export_model(cluster.address, tmp_path / "m.safetensors",
                                                             optimizer_state=True, security=cluster.security)),
            }
        finally:
            opt.close()
    # A copy of the state would add 100% (the old code: 130% for a digest); buffers of one
    # chunk at a time add a few MB. The bound is generous: a quarter of the state.
    for what, n in grown.items():
        assert n < state_bytes / 4, f"{what} grew the server by {n / 1e6:.0f} MB for a {state_bytes / 1e6:.0f} MB state"
