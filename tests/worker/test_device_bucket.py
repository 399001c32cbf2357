"""Models whose parameters are not fp32 CPU tensors: a bf16 replica (here) and a CUDA model (on a
GPU machine) keep their parameters and gradients as views into one flat bucket on their own
device; the push casts and copies a shard at a time, each reply is copied back as it lands.

What a user expects of it: a bf16 replica trained by shardps is exactly the loop torch users
write by hand for it (fp32 master weights, the optimizer on them, the replica rounded from
them after every step), over every transport, wire dtype and with pushes overlapped with
backward."""
import pytest
import torch

from shardps import LocalCluster, ShardedOptimizer
from shardps.worker.workloads import get_workload

STEPS, BATCH = 6, 32


def bf16_reference(workload, initial):
    """Mixed precision by hand: fp32 master weights, AdamW on them, a bf16 replica for forward/backward."""
    torch.manual_seed(0)
    replica = workload.model().to(torch.bfloat16)
    master = workload.model()  # starts from the replica's values: the fp32 originals never reached shardps
    master.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in initial.items()})
    opt = torch.optim.AdamW(master.parameters(), lr=0.01)
    for step in range(STEPS):
        with torch.no_grad():
            for r, m in zip(replica.parameters(), master.parameters()):
                r.copy_(m)
        replica.zero_grad()
        x, y = workload.global_batch(step, BATCH)
        workload.loss(replica, x.to(torch.bfloat16), y).backward()
        for r, m in zip(replica.parameters(), master.parameters()):
            m.grad = r.grad.float()
        opt.step()
    with torch.no_grad():
        for r, m in zip(replica.parameters(), master.parameters()):
            r.copy_(m)
    return replica, master


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(servers=2, durable=False) as c:
        yield c


@pytest.mark.slow
@pytest.mark.parametrize("transport,wire,overlap", [("auto", "float32", False), ("grpc", "float32", False),
                                                    ("grpc", "bfloat16", True), ("auto", "bfloat16", True)])
def test_a_bf16_replica_trains_exactly_like_fp32_master_weights_by_hand(cluster, transport, wire, overlap):
    workload = get_workload("digits", 0)
    model = workload.model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to(torch.bfloat16)
    job = f"bf16-{transport}-{wire}-{overlap}"
    opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adamw", lr=0.01, transport=transport,
                           wire_dtype=wire, overlap=overlap, job=job)
    try:
        assert opt.flat.kind == "device" and opt.flat.bucket_grads.dtype == torch.bfloat16
        for step in range(STEPS):
            opt.zero_grad()
            x, y = workload.global_batch(step, BATCH)
            workload.loss(model, x.to(torch.bfloat16), y).backward()
            opt.step()
        assert all(opt.ps.shm_ok) == (transport == "auto")
        opt.flat.quiesce()
        masters = opt.flat.values.clone()  # the shards' fp32 master weights, as the last replies wrote them
        state = opt.model_state_dict()  # in the model's own dtype
    finally:
        opt.close()
    replica, master = bf16_reference(workload, initial)
    # The shards' fp32 masters follow the hand-written loop's to float rounding (the shards run
    # torch's fused AdamW, the loop its single-tensor one: a few ulps apart).
    ref = torch.cat([p.detach().reshape(-1) for p in master.parameters()])
    torch.testing.assert_close(masters, ref, rtol=1e-6, atol=1e-7)
    # The replica is exactly the masters rounded to bf16, as the hand-written loop's replica is its masters'.
    for (name, p), e in zip(model.named_parameters(), opt.flat.layout.params):
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach().reshape(-1), masters[e.offset:e.stop].to(torch.bfloat16))
        assert torch.equal(state[name], p.detach()), name
    for r, m in zip(replica.parameters(), master.parameters()):
        assert torch.equal(r, m.to(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.slow
@pytest.mark.parametrize("wire,overlap", [("float32", False), ("bfloat16", True)])
def test_a_cuda_worker_trains_like_the_cpu_one(cluster, wire, overlap):
    """The GPU path end to end: buckets on the device, copies on their own stream into pinned (or
    registered shared) memory. Same steps on the CPU give the same model, to float tolerance
    (CUDA kernels round differently from CPU ones)."""
    workload = get_workload("digits", 0)
    results = {}
    for device in ("cpu", "cuda"):
        model = workload.model().to(device)
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adamw", lr=0.01, wire_dtype=wire,
                               overlap=overlap, job=f"cuda-{device}-{wire}-{overlap}")
        try:
            assert opt.flat.kind == ("host" if device == "cpu" else "device")
            for step in range(STEPS):
                opt.zero_grad()
                x, y = workload.global_batch(step, BATCH)
                workload.loss(model, x.to(device), y.to(device)).backward()
                opt.step()
            results[device] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        finally:
            opt.close()
    for name, p in results["cpu"].items():
        tol = 1e-5 if wire == "float32" else 1e-4  # a bf16 rounding may flip on slightly different grads
        torch.testing.assert_close(results["cuda"][name], p, rtol=10 * tol, atol=tol)
