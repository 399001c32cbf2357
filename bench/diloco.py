"""DiLoCo (local SGD) vs sync data parallel: held-out quality against bytes exchanged.

    python bench/diloco.py                                   # digits, 2 workers, 150 inner steps
    python bench/diloco.py --workload charlm --steps 200 --sync-every 1,10,50

Each configuration is a full ``shardps run`` (real processes, gradients over gRPC so the
bytes are what a network would carry). The peer is ``sync``: ShardedOptimizer with the
workload's optimizer, one exchange per step. ``diloco(H)`` keeps that optimizer on the
workers as the inner one and takes one Nesterov SGD outer step every H steps; the table
reports the final held-out metric, training wall time, the bytes pushed to the shards and
their ratio to the peer's.
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


def one(name, extra, args, out_dir):
    cfg = RunConfig(workers=args.workers, workload=args.workload, steps=args.steps, eval_every=0,
                    transport="grpc", out=str(out_dir / name), **extra)
    summary = run(cfg)
    records = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    start = min(r["time"] for r in records if r["kind"] == "start")
    return {"config": name, "final": summary["held_out"][summary["metric"]], "metric": summary["metric"],
            "outer_steps": summary["updates_per_shard"][0], "bytes_pushed": summary["bytes_in"],
            "train_wall_s": max(r["time"] for r in records) - start}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="digits")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--sync-every", default="5,20", help="comma-separated H values to run")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--out")
    args = ap.parse_args()
    configs = {"sync": dict(mode="sync")}
    for h in (int(v) for v in args.sync_every.split(",")):
        configs[f"diloco(H={h})"] = dict(mode="diloco", sync_every=h, outer_lr=args.outer_lr)
    h = int(args.sync_every.split(",")[0])
    configs[f"diloco-async(H={h})"] = dict(mode="diloco-async", sync_every=h, outer_lr=args.outer_lr)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, extra in configs.items():
            rows.append(one(name, extra, args, Path(tmp)))
            r = rows[-1]
            r["bytes_vs_sync"] = r["bytes_pushed"] / rows[0]["bytes_pushed"]
            print(f"{name:20s} final {r['metric']} {r['final']:.4f}, {r['outer_steps']} updates/shard, "
                  f"{r['bytes_pushed'] / 1e6:.1f} MB pushed ({r['bytes_vs_sync']:.3f} x sync), "
                  f"training {r['train_wall_s']:.1f} s", file=sys.stderr, flush=True)
    emit("diloco", {"config": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
