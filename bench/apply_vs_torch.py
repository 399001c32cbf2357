"""A shard server's apply vs torch.optim's fused kernel on a tensor of the slice's size.

    python bench/apply_vs_torch.py --numel 12600000     # half of the 25.2M MLP (2 shards)

shardps: ``ShardState.push`` in sync mode with one member, i.e. everything a push
costs once its bytes are decoded: validation (NaN/Inf check), the sample-weighted
accumulation and the optimizer step. Also ``ShardState.apply`` alone. torch: the
same optimizer class with ``fused=True`` stepping one Parameter of that size.
Alternating, --reps times each.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, stats  # noqa: E402

from shardps.proto.layout import Layout  # noqa: E402
from shardps.proto.messages import JobConfig, UpdateMode  # noqa: E402
from shardps.proto.optim import OPTIMIZERS  # noqa: E402
from shardps.proto.plan import ShardRange  # noqa: E402
from shardps.server.modes import Push  # noqa: E402
from shardps.server.state import ShardState  # noqa: E402

CONFIGS = {"adam": {"lr": 1e-3}, "adamw": {"lr": 1e-3, "weight_decay": 0.01},
           "sgd": {"lr": 0.01, "momentum": 0.9}}


def time_torch(name, numel, grad, steps):
    p = torch.nn.Parameter(torch.zeros(numel))
    opt = OPTIMIZERS[name]([p], **CONFIGS[name], fused=True)
    p.grad = grad
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t)
    return stats(out[2:])["median"]


def time_shardps(name, numel, grad, steps):
    job = JobConfig(Layout.from_shapes([("w", (numel,), "float32")]), name, CONFIGS[name], UpdateMode.SYNC, 1)
    state = ShardState(ShardRange(0, 0, numel), job, "bench")
    state.initialize(torch.zeros(numel))
    push_t, apply_t = [], []
    for step in range(steps):
        before = state.stats.apply_seconds
        t = time.perf_counter()
        state.push(Push(0, step, 1, step, 32, CONFIGS[name]["lr"], grad), frozenset({0}))
        push_t.append(time.perf_counter() - t)
        apply_t.append(state.stats.apply_seconds - before)
    return stats(push_t[2:])["median"], stats(apply_t[2:])["median"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=12_600_000)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grad = torch.randn(args.numel) * 1e-3
    results = {}
    for name in CONFIGS:
        tt, pp, aa = [], [], []
        for _ in range(args.reps):
            tt.append(time_torch(name, args.numel, grad, args.steps))
            p, a = time_shardps(name, args.numel, grad, args.steps)
            pp.append(p)
            aa.append(a)
        results[name] = {"torch_fused_s": stats(tt), "shardps_push_s": stats(pp), "shardps_apply_s": stats(aa),
                         "ratio_apply_over_torch": stats([a / t for a, t in zip(aa, tt)]),
                         "ratio_push_over_torch": stats([p / t for p, t in zip(pp, tt)])}
        print(f"{name}: torch fused {stats(tt)['median'] * 1e3:.1f} ms, shardps apply "
              f"{stats(aa)['median'] * 1e3:.1f} ms, whole push {stats(pp)['median'] * 1e3:.1f} ms", file=sys.stderr)
    emit("apply_vs_torch", {"config": vars(args), "results": results}, args.out)


if __name__ == "__main__":
    main()
