"""A GPU worker vs the one-process offload peer (ZeRO-Offload's shape), on a GPT-2-shaped model.

    python bench/offload.py                                  # 124M GPT-2 small, batch 16 x 256, bf16 autocast
    python bench/offload.py --servers 4 8                    # shardps with 4, then 8 servers
    python bench/offload.py --device cpu --layers 2 --embd 128 --vocab 512 --block 64 --batch 4   # smoke, no GPU

Three ways to train the same model with AdamW, one after the other, --reps times each:

* ``gpu``: one process, torch's fused AdamW on the device (the floor; for reference).
* ``offload``: one process, fp32 master weights and AdamW (fused, ``--offload-threads`` torch
  threads) on the host; every step copies the gradients into pinned host memory, steps
  the optimizer there and copies the parameters back: what ZeRO-Offload does on one GPU.
* ``shardps``: one GPU worker pushing to S shard servers on the same host (``LocalCluster``:
  the shared-memory byte path, each server using cores / S torch threads), fp32 and bf16 wire;
  and two worker processes sharing the GPU (``--pair``), whose tokens/s are compared with one's.

Targets (the data-path issue): shardps with 8 servers ≤ 1.0x the offload peer; bf16 wire ≤ fp32;
two workers ≥ 1.6x one worker's tokens/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, stats  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, embd: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(embd), torch.nn.LayerNorm(embd)
        self.qkv, self.proj = torch.nn.Linear(embd, 3 * embd), torch.nn.Linear(embd, embd)
        self.fc, self.out = torch.nn.Linear(embd, 4 * embd), torch.nn.Linear(4 * embd, embd)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(torch.nn.Module):
    """GPT-2's shape (tied embeddings); the defaults are GPT-2 small, 124M parameters."""

    def __init__(self, vocab=50257, block=1024, layers=12, heads=12, embd=768):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, embd), torch.nn.Embedding(block, embd)
        self.blocks = torch.nn.ModuleList(Block(embd, heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(embd)
        self.head = torch.nn.Linear(embd, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def make_model(args) -> GPT:
    torch.manual_seed(0)
    return GPT(args.vocab, args.block, args.layers, args.heads, args.embd).to(args.device)


def batch(args, step: int, rank: int = 0):
    g = torch.Generator().manual_seed(step * 131 + rank)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    return idx[:, :-1].to(args.device), idx[:, 1:].to(args.device)


def autocast(args):
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.amp)
    return torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None)


def sync(args):
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()


def timed(args, one_step) -> float:
    """Median seconds per step of ``one_step(step)`` after --warmup steps."""
    times = []
    for step in range(args.warmup + args.steps):
        sync(args)
        t = time.perf_counter()
        one_step(step)
        sync(args)
        times.append(time.perf_counter() - t)
    return stats(times[args.warmup:])["median"]


def backward(args, model, zero_grad, step: int, rank_hint: int = 0) -> None:
    """Forward (under autocast) and backward of one step's batch, after ``zero_grad()``: the part
    every contender shares, so the timings differ only in the optimizer step."""
    x, y = batch(args, step, rank_hint)
    with autocast(args):
        loss = model(x, y)
    zero_grad()
    loss.backward()


def run_gpu(args) -> float:
    model = make_model(args)
    fused = torch.device(args.device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def one_step(step):
        backward(args, model, opt.zero_grad, step)
        opt.step()

    return timed(args, one_step)


def run_offload(args) -> float:
    """ZeRO-Offload's shape in one process: fp32 masters and AdamW on the host, copies both ways."""
    model = make_model(args)
    params = list(model.parameters())
    on_gpu = torch.device(args.device).type == "cuda"
    pin = dict(pin_memory=True) if on_gpu else {}
    masters = [torch.empty(p.shape, dtype=torch.float32, **pin) for p in params]
    for m, p in zip(masters, params):
        m.copy_(p.detach())
        m.grad = torch.empty(p.shape, dtype=torch.float32, **pin)
    torch.set_num_threads(args.offload_threads)
    opt = torch.optim.AdamW(masters, lr=1e-4, fused=True)

    def one_step(step):
        backward(args, model, model.zero_grad, step)
        for m, p in zip(masters, params):
            m.grad.copy_(p.grad, non_blocking=True)
        sync(args)
        opt.step()
        with torch.no_grad():
            for m, p in zip(masters, params):
                p.copy_(m, non_blocking=True)

    return timed(args, one_step)


def shardps_steps(args, address: str, wire: str, job: str, workers: int = 1, rank_hint: int = 0):
    """One worker's (median s/step, median push-pull s) for a job of ``workers`` workers."""
    from shardps import ShardedOptimizer

    model = make_model(args)
    opt = ShardedOptimizer(model, cluster=address, optimizer="adamw", lr=1e-4, wire_dtype=wire, job=job,
                           min_workers=workers, overlap=args.overlap)
    comm = []

    def one_step(step):
        backward(args, model, opt.zero_grad, step, rank_hint)
        t = time.perf_counter()
        opt.step()
        comm.append(time.perf_counter() - t)

    try:
        return timed(args, one_step), stats(comm[args.warmup:])["median"], opt.ps.shm_ok
    finally:
        opt.close()


def pair_worker(rank, address, args, job, queue):
    s, c, _ = shardps_steps(args, address, args.pair_wire, job, workers=2, rank_hint=rank)
    queue.put((rank, s, c))


def run_pair(args, address: str, job: str) -> float:
    """Seconds per step of each of two worker processes sharing the device (the slower one)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=pair_worker, args=(r, address, args, job, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1200) for _ in procs]
    for p in procs:
        p.join(60)
    return max(s for _, s, _ in results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--amp", default="", help="autocast dtype (default: bfloat16 on CUDA, off elsewhere)")
    ap.add_argument("--servers", type=int, nargs="+", default=[8])
    ap.add_argument("--wire", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--overlap", action="store_true", help="push each shard as backward finishes it")
    ap.add_argument("--pair", action="store_true", help="also two worker processes sharing the device")
    ap.add_argument("--pair-wire", default="bfloat16")
    ap.add_argument("--offload-threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args()
    args.seq = min(args.seq, args.block)
    if not args.amp and torch.device(args.device).type == "cuda":
        args.amp = "bfloat16"
    numel = sum(p.numel() for p in make_model(args).parameters())
    print(f"model: {numel / 1e6:.1f}M parameters on {args.device}", file=sys.stderr, flush=True)

    from shardps import LocalCluster

    gpu, offload = [], []
    ps = {(s, w): [] for s in args.servers for w in args.wire}
    comm = {key: [] for key in ps}
    pair = {s: [] for s in args.servers} if args.pair else {}
    transport = {}
    for rep in range(args.reps):
        gpu.append(run_gpu(args))
        offload.append(run_offload(args))
        torch.set_num_threads(os.cpu_count() or 1)
        line = f"rep {rep}: gpu {gpu[-1] * 1e3:.1f} ms, offload {offload[-1] * 1e3:.1f} ms"
        for servers in args.servers:
            with LocalCluster(servers=servers, durable=False) as cluster:
                for wire in args.wire:
                    s, c, shm_ok = shardps_steps(args, cluster.address, wire, f"w-{wire}-{rep}")
                    ps[(servers, wire)].append(s)
                    comm[(servers, wire)].append(c)
                    transport[servers] = "shm" if all(shm_ok) else "grpc"
                    line += f", shardps {servers}x{wire} {s * 1e3:.1f} ms (push-pull {c * 1e3:.1f})"
                if args.pair:
                    pair[servers].append(run_pair(args, cluster.address, f"pair-{rep}"))
                    line += f", 2 workers {pair[servers][-1] * 1e3:.1f} ms/step each"
        print(line, file=sys.stderr, flush=True)

    tokens = args.batch * args.seq
    result = {"config": vars(args), "numel": numel, "gpu_step_s": stats(gpu), "offload_step_s": stats(offload),
              "transport": transport, "shardps": {}}
    for (servers, wire), times in ps.items():
        ratios = [t / o for t, o in zip(times, offload)]
        result["shardps"][f"{servers}x{wire}"] = {
            "step_s": stats(times), "push_pull_s": stats(comm[(servers, wire)]),
            "ratio_over_offload": stats(ratios), "ratio_over_gpu": stats([t / g for t, g in zip(times, gpu)])}
    for servers in args.servers:
        if "float32" in args.wire and "bfloat16" in args.wire:
            ratios = [b / f for b, f in zip(ps[(servers, "bfloat16")], ps[(servers, "float32")])]
            result["shardps"][f"{servers}_bf16_over_fp32"] = stats(ratios)
        if pair.get(servers):
            one = ps[(servers, args.pair_wire)] if (servers, args.pair_wire) in ps else None
            if one:
                # tokens/s of two workers together over one worker's
                speedups = [(2 * tokens / p) / (tokens / o) for p, o in zip(pair[servers], one)]
                result["shardps"][f"{servers}_two_workers_tokens_speedup"] = stats(speedups)
    for key, value in result["shardps"].items():
        if "ratio_over_offload" in value:
            print(f"shardps {key}: {value['ratio_over_offload']['median']:.2f}x the offload peer", file=sys.stderr)
    emit("offload", result, args.out)


if __name__ == "__main__":
    main()
