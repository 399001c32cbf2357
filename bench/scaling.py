"""How the sync step grows with model size, servers and workers (shardps, with DDP beside it for size).

    python bench/scaling.py                 # sizes 1M..100M at 2x2; servers 1,2,4; workers 1,2,4

Writes JSON (--out) and a plot (--plot). On one 2-core machine every process shares
the same two cores, so the curves show CPU cost per byte, not what separate server
machines would do; see bench/RESULTS.md for how to read them.
"""
from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402
from step_vs_ddp import run_ddp, run_shardps  # noqa: E402


def point(model, servers, workers, steps, ddp):
    args = Namespace(model=model, workers=workers, servers=servers, batch=32, steps=steps, warmup=2, threads=1,
                     wire_dtype="float32", overlap=False)
    shardps_s, push_pull_s = run_shardps(args)
    row = {"model": model, "servers": servers, "workers": workers, "shardps_step_s": shardps_s,
           "push_pull_s": push_pull_s}
    if ddp and workers > 1:
        row["ddp_step_s"] = run_ddp(args)
    print(row, file=sys.stderr, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,5e6,25e6,50e6,100e6")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    by_size = [point(f"mlp:{n}", 2, 2, args.steps, ddp=True) | {"params": n} for n in sizes]
    by_servers = [point("mlp:25e6", s, 2, args.steps, ddp=False) for s in (1, 2, 4)]
    by_workers = [point("mlp:25e6", 2, w, args.steps, ddp=False) for w in (1, 2, 4)]
    emit("scaling", {"config": vars(args), "by_size": by_size, "by_servers": by_servers,
                     "by_workers": by_workers}, args.out)
    if args.plot:
        plot(by_size, by_servers, by_workers, args.plot)


def plot(by_size, by_servers, by_workers, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    n = [r["params"] / 1e6 for r in by_size]
    axes[0].plot(n, [r["shardps_step_s"] * 1e3 for r in by_size], "o-", label="shardps sync 2x2")
    axes[0].plot(n, [r["ddp_step_s"] * 1e3 for r in by_size], "s--", label="DDP/gloo 2 ranks")
    axes[0].set(xlabel="parameters (M)", ylabel="step time (ms)", title="model size (2 workers, 2 servers)")
    axes[0].legend()
    axes[1].plot([r["servers"] for r in by_servers], [r["shardps_step_s"] * 1e3 for r in by_servers], "o-")
    axes[1].set(xlabel="servers", ylabel="step time (ms)", title="servers (25M, 2 workers)", xticks=[1, 2, 4])
    axes[2].plot([r["workers"] for r in by_workers], [r["shardps_step_s"] * 1e3 for r in by_workers], "o-")
    axes[2].set(xlabel="workers", ylabel="step time (ms)", title="workers (25M, 2 servers)", xticks=[1, 2, 4])
    fig.suptitle("shardps scaling on one 2-core machine (all processes share the cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
