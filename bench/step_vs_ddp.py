"""Sync step time: shardps (W workers x S servers) vs PyTorch DDP over gloo (W ranks).

    python bench/step_vs_ddp.py                       # 25.2M-param MLP, batch 32/rank, Adam
    python bench/step_vs_ddp.py --model charlm        # the charlm transformer
    python bench/step_vs_ddp.py --wire-dtype bfloat16 # bf16 pushes
    python bench/step_vs_ddp.py --overlap             # push each shard as backward finishes it
    python bench/step_vs_ddp.py --transport tcp       # the byte link (raw TCP beside gRPC: as across hosts)
    python bench/step_vs_ddp.py --transport grpc      # every byte inside gRPC

Same model, same per-rank batch, same optimizer (DDP uses torch's fused Adam; the
shard servers use it on their slices). DDP and shardps alternate, --reps times
each; each repetition times --steps steps after --warmup steps. Prints median
step times and the ratio shardps / DDP.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, mlp, mlp_for_params, stats  # noqa: E402


def build(model_name: str):
    """(model, make_batch(rank, step), loss_fn) for ``model_name``."""
    if model_name.startswith("mlp"):
        # "mlp" is the 25.2M model; "mlp:N" a 3-layer MLP of about N parameters
        width, io = (4096, 1024) if model_name == "mlp" else mlp_for_params(int(float(model_name[4:])))
        model = mlp(width, io)

        def batch(rank, step, size):
            g = torch.Generator().manual_seed(rank * 1000 + step)
            return torch.randn(size, io, generator=g), torch.randn(size, io, generator=g)

        return model, batch, torch.nn.functional.mse_loss
    from shardps.worker.workloads import get_workload

    wl = get_workload(model_name)
    return wl.model(), (lambda rank, step, size: wl.global_batch(step * 64 + rank, size)), None


def _loss(model, loss_fn, x, y, model_name):
    if loss_fn is not None:
        return loss_fn(model(x), y)
    from shardps.worker.workloads import get_workload

    return get_workload(model_name).loss(model, x, y)


def ddp_rank(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, batch, loss_fn = build(args.model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-4, fused=True)
    times = []
    for step in range(args.warmup + args.steps):
        x, y = batch(rank, step, args.batch)
        dist.barrier()
        t = time.perf_counter()
        loss = _loss(ddp, loss_fn, x, y, args.model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    queue.put((rank, times[args.warmup:]))
    dist.destroy_process_group()


def shardps_worker(rank, address, args, queue):
    torch.set_num_threads(args.threads)
    from shardps import ShardedOptimizer

    model, batch, loss_fn = build(args.model)
    opt = ShardedOptimizer(model, cluster=address, optimizer="adam", lr=1e-4, min_workers=args.workers,
                           wire_dtype=args.wire_dtype, overlap=args.overlap, transport=args.transport)
    times, comm = [], []
    for step in range(args.warmup + args.steps):
        x, y = batch(opt.rank, step, args.batch)
        t = time.perf_counter()
        loss = _loss(model, loss_fn, x, y, args.model)
        opt.zero_grad()
        loss.backward()
        t1 = time.perf_counter()
        opt.step(batch_size=args.batch)
        t2 = time.perf_counter()
        times.append(t2 - t)
        comm.append(t2 - t1)
    opt.close()
    queue.put((rank, times[args.warmup:], comm[args.warmup:]))


def run_ddp(args) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=ddp_rank, args=(r, args.workers, port, args, queue)) for r in range(args.workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    per_step = [max(ts) for ts in zip(*[t for _, t in results])]  # a step ends when the slowest rank does
    return stats(per_step)["median"]


def run_shardps(args) -> tuple[float, float]:
    from shardps import LocalCluster

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with LocalCluster(servers=args.servers) as cluster:
        procs = [ctx.Process(target=shardps_worker, args=(r, cluster.address, args, queue))
                 for r in range(args.workers)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
    per_step = [max(ts) for ts in zip(*[t for _, t, _ in results])]
    comm = [c for _, _, cs in results for c in cs]
    return stats(per_step)["median"], stats(comm)["median"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", help="mlp (25.2M), mlp:N (about N params) or a workload (charlm)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--wire-dtype", default="float32")
    ap.add_argument("--overlap", action="store_true", help="push shards while backward runs")
    ap.add_argument("--transport", choices=("auto", "tcp", "grpc"), default="auto",
                    help="auto: shared memory with same-host servers (the default); tcp: the byte link, as across "
                         "hosts; grpc: every byte inside gRPC")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args()
    ddp, ps, comm = [], [], []
    for rep in range(args.reps):
        ddp.append(run_ddp(args))
        s, c = run_shardps(args)
        ps.append(s)
        comm.append(c)
        print(f"rep {rep}: ddp {ddp[-1] * 1e3:.1f} ms, shardps {ps[-1] * 1e3:.1f} ms "
              f"(push-pull {c * 1e3:.1f} ms)", file=sys.stderr, flush=True)
    ratios = [p / d for p, d in zip(ps, ddp)]
    emit("step_vs_ddp", {
        "config": vars(args), "ddp_step_s": stats(ddp), "shardps_step_s": stats(ps),
        "shardps_push_pull_s": stats(comm), "ratio_shardps_over_ddp": stats(ratios),
    }, args.out)


if __name__ == "__main__":
    main()
