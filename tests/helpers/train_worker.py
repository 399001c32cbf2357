"""One worker process of the integration tests: trains the fixed task through ShardedOptimizer.

    python tests/helpers/train_worker.py --cluster ADDR --optimizer adam --kwargs '{"lr":0.01}'
        --sizes 24,40 --steps 30 --init-seed 7 --out result.pt

Rank r trains on rows [sum(sizes[:r]), sum(sizes[:r+1])) of each global batch.
Writes {"initial": params after joining, "final": params, "losses": [...], "staleness": [...]}.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task import global_batch, loss_fn, make_model, make_scheduler  # noqa: E402

from shardps import ShardedOptimizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--kwargs", default='{"lr": 0.1}')
    ap.add_argument("--mode", default="sync")
    ap.add_argument("--staleness", type=int, default=0)
    ap.add_argument("--sizes", default="32,32")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--init-seed", type=int, default=0)
    ap.add_argument("--scheduler", action="store_true")
    ap.add_argument("--wire-dtype", default="float32")
    ap.add_argument("--transport", default="auto", help="auto (shared memory on this host) or grpc")
    ap.add_argument("--overlap", action="store_true", help="push each shard as backward finishes it")
    ap.add_argument("--step-timeout", type=float, default=330.0)
    ap.add_argument("--retry-timeout", type=float, default=600.0)
    ap.add_argument("--min-workers", type=int, default=0, help="default: one per --sizes entry")
    ap.add_argument("--replicas", type=int, default=1, help="copies of each shard (>= 2: failover)")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep every step (a slower worker)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    torch.set_num_threads(1)
    model = make_model(a.init_seed)
    opt = ShardedOptimizer(model, cluster=a.cluster, optimizer=a.optimizer, mode=a.mode, min_workers=a.min_workers or len(sizes),
                           staleness=a.staleness, wire_dtype=a.wire_dtype, connect_timeout=120,
                           transport=a.transport, overlap=a.overlap, replicas=a.replicas,
                           step_timeout=a.step_timeout, retry_timeout=a.retry_timeout,
                           **json.loads(a.kwargs))
    sched = make_scheduler(opt, a.scheduler)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses, staleness = [], []
    while opt.steps_taken < a.steps:  # the shards number the steps (a rollback moves back)
        step = opt.steps_taken
        lo = sum(sizes[:opt.rank])  # the rank can change when the membership does
        hi = lo + sizes[opt.rank]
        x, y = global_batch(step, sum(sizes))
        loss = loss_fn(model, x[lo:hi], y[lo:hi])
        opt.zero_grad()
        loss.backward()
        time.sleep(a.sleep)
        opt.step(batch_size=hi - lo)
        if sched:
            sched.step()
        losses.append(loss.item())
        staleness.append([r.staleness for r in opt.last_replies])
    opt.pull()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"rank": opt.rank, "initial": initial, "final": final, "losses": losses, "staleness": staleness,
                "versions": opt.versions, "optimizer_state": opt.state_dict(), "retries": opt.retry.stats.as_dict(),
                "rollbacks": opt.rollbacks},
               a.out)
    opt.close()


if __name__ == "__main__":
    main()
