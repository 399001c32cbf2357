"""One slow worker: sync vs sync + backup workers vs SSP vs async, side by side.

    python bench/heterogeneous.py                         # charlm, 3 workers, worker-0 4x slower
    python bench/heterogeneous.py --workload digits --target 0.9

Each configuration is a full ``shardps run`` (real processes) with
``--slow-worker 0:FACTOR``: worker-0 sleeps (FACTOR - 1) x its compute time every
step, a documented simulation of a slower machine. Rank 0 evaluates on held-out
data every --eval-every steps; the table reports wall time to reach --target, the
final held-out metric, steps, and dropped pushes. Writes JSON and a plot.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from shardps.client.run import RunConfig, run  # noqa: E402
from shardps.worker.workloads import get_workload  # noqa: E402

CONFIGS = {
    "sync": dict(mode="sync"),
    "sync+backup1": dict(mode="sync", backup_workers=1),
    "sync+balance5": dict(mode="sync", balance_every=5),
    "ssp(k=2)": dict(mode="ssp", staleness=2),
    "ssp(k=2)+staleness-lr": dict(mode="ssp", staleness=2, staleness_lr=True),
    "async": dict(mode="async"),
}


def one(name, extra, args, out_dir):
    cfg = RunConfig(workers=args.workers, workload=args.workload, steps=args.steps, batch_size=args.batch_size,
                    eval_every=args.eval_every, slow_workers={0: args.factor}, out=str(out_dir / name), **extra)
    summary = run(cfg)
    records = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    start = min(r["time"] for r in records if r["kind"] == "start")
    metric, better = summary["metric"], get_workload(args.workload).higher_is_better
    curve = [(r["time"] - start, r[metric]) for r in records if r["kind"] == "eval"]
    reached = [t for t, v in curve if (v >= args.target if better else v <= args.target)]
    return {"config": name, "time_to_target_s": reached[0] if reached else None, "final": summary["held_out"][metric],
            "metric": metric, "steps": summary["steps"], "train_wall_s": max(r["time"] for r in records) - start,
            "dropped_pushes": summary["dropped_pushes"], "curve": curve}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="charlm")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--factor", type=float, default=4.0, help="worker-0's slowdown")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--target", type=float, default=4.3, help="held-out metric to reach (bits/char for charlm)")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, extra in CONFIGS.items():
            rows.append(one(name, extra, args, Path(tmp)))
            r = rows[-1]
            print(f"{name:14s} time-to-target {r['time_to_target_s']} s, final {r['metric']} {r['final']:.4f}, "
                  f"training {r['train_wall_s']:.1f} s, dropped {r['dropped_pushes']}", file=sys.stderr, flush=True)
    emit("heterogeneous", {"config": vars(args), "rows": rows}, args.out)
    if args.plot:
        plot(rows, args, args.plot)


def plot(rows, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        ax.plot([t for t, _ in r["curve"]], [v for _, v in r["curve"]], "o-", label=r["config"])
    ax.axhline(args.target, color="grey", linestyle=":", label=f"target {args.target}")
    ax.set(xlabel="wall time since start (s)", ylabel=f"held-out {rows[0]['metric']}",
           title=f"{args.workload}: {args.workers} workers, worker-0 {args.factor:g}x slower")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
