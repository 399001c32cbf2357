"""One worker process of the DiLoCo tests: trains the fixed task through DiLoCo.

    python tests/helpers/diloco_worker.py --cluster ADDR --inner adamw --inner-kwargs '{"lr":0.01}'
        --sync-every 4 --outer-kwargs '{"outer_lr":0.7}' --sizes 24,40 --steps 16 --out result.pt

Rank r trains on rows [sum(sizes[:r]), sum(sizes[:r+1])) of each global batch, as train_worker.py.
``--steps`` inner steps (a last round shorter than ``--sync-every`` is synced at the end), or ``--rounds``
outer steps (every worker of a sync job must take the same number: with ``--sync-every auto``).
Writes {"initial", "final", "rounds": [{"delta": raw outer gradient (flat), "samples", "steps", "versions"}],
"ranges": each shard's [start, stop) of the flat vector, "rank", "fragments": parameters per fragment}
(with --fragments, a round is a step that synced a fragment, and versions are every fragment's shards').
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task import global_batch, loss_fn, make_model  # noqa: E402

from shardps import DiLoCo  # noqa: E402

INNER = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--inner", default="sgd")
    ap.add_argument("--inner-kwargs", default='{"lr": 0.1}')
    ap.add_argument("--sync-every", default="4", help="inner steps per round, or auto (with --sync-seconds)")
    ap.add_argument("--sync-seconds", type=float, default=None)
    ap.add_argument("--fragments", type=int, default=1, help="streaming: fragments synced at staggered steps")
    ap.add_argument("--outer-kwargs", default="{}", help="DiLoCo's outer_* arguments as JSON")
    ap.add_argument("--mode", default="sync")
    ap.add_argument("--wire-dtype", default="float32")
    ap.add_argument("--transport", default="auto", help="auto (shared memory on this host) or grpc")
    ap.add_argument("--sizes", default="32,32")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=0, help="train this many outer steps instead of --steps")
    ap.add_argument("--init-seed", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep every inner step (a slower worker)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    torch.set_num_threads(1)
    model = make_model(a.init_seed)
    inner = INNER[a.inner](model.parameters(), **json.loads(a.inner_kwargs))
    sync_every = a.sync_every if a.sync_every == "auto" else int(a.sync_every)
    opt = DiLoCo(model, inner, a.cluster, sync_every=sync_every, sync_seconds=a.sync_seconds, fragments=a.fragments,
                 mode=a.mode, min_workers=len(sizes),
                 wire_dtype=a.wire_dtype, transport=a.transport, connect_timeout=120, **json.loads(a.outer_kwargs))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rounds, pending, batch = [], {}, [0]

    def note(*_) -> None:
        """After each inner step: the raw outer gradient DiLoCo pushes if this step ends the round."""
        pending.update(delta=flat(opt.anchor) - flat(opt.params), samples=opt.samples + batch[0],
                       steps=opt.since_sync + 1)

    inner.register_step_post_hook(note)
    while opt.outer.steps_taken < a.rounds if a.rounds else opt.steps_taken < a.steps:
        step = opt.steps_taken
        lo = sum(sizes[:opt.rank])
        hi = lo + sizes[opt.rank]
        x, y = global_batch(step, sum(sizes))
        opt.zero_grad()
        loss_fn(model, x[lo:hi], y[lo:hi]).backward()
        time.sleep(a.sleep)
        batch[0] = hi - lo
        opt.step(batch_size=hi - lo)
        if opt.since_sync == 0:  # the step ended the round
            rounds.append(dict(pending, versions=list(opt.versions)))
    if any(f.since_sync for f in opt.fragments):  # the last, shorter round (of a fragment)
        opt.sync()
        rounds.append(dict(pending, versions=list(opt.versions)))
    opt.outer.pull()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"rank": opt.rank, "initial": initial, "final": final, "rounds": rounds,
                "ranges": [(s.info.range.start, s.info.range.stop) for s in opt.outer.ps.shards],
                "rollbacks": opt.outer.rollbacks, "fragments": [len(f.params) for f in opt.fragments]}, a.out)
    opt.close()


if __name__ == "__main__":
    main()
