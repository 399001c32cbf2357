"""A worker process that unfreezes a layer part way and adds it with ``add_param_group`` (ULMFiT's
progressive unfreezing), on scikit-learn's digits; the fault tests of added param groups run it.

    python tests/helpers/group_worker.py --cluster ADDR --out result.pt --steps 30 --add-at 6

The model is ``frozen_mlp`` (layer 2 frozen and outside the optimizer until step ``--add-at``). The
loop picks each step's data by ``opt.steps_taken``, so after a rollback it replays the undone steps;
the group is added when the step reaches ``--add-at`` (once). Rank r trains on its half of every
global batch of ``UNION`` samples. Writes {"rank", "model", "rollbacks", "group_rollbacks", "steps"}
or, if joining the job fails, {"rank": -1, "error": "<type>: <message>"}.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "realworld"))
import models as M  # noqa: E402

from shardps import ShardedOptimizer  # noqa: E402

UNION = 32  # samples per global batch (the workers split it evenly)
GROUP = {"lr": 0.005, "weight_decay": 0.1}  # the added group's hyper-parameters


def frozen_mlp() -> torch.nn.Sequential:
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 10))
    model[2].requires_grad_(False)
    return model


def backbone_groups(model):
    return [{"params": [model[0].weight, model[4].weight], "weight_decay": 0.05},
            {"params": [model[0].bias, model[4].bias], "weight_decay": 0.0, "lr": 0.02}]


def add_group(model, opt) -> None:
    model[2].requires_grad_(True)
    opt.add_param_group({"params": list(model[2].parameters()), **GROUP})


def reference(steps: int, add_at: int) -> dict[int, dict[str, torch.Tensor]]:
    """The same training in one process with torch.optim.AdamW on the union batch: the model's state
    after each step (key: the number of steps taken)."""
    model = frozen_mlp()
    opt = torch.optim.AdamW(backbone_groups(model), lr=0.01)
    states = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    for step in range(steps):
        if step == add_at:
            add_group(model, opt)
        x, y = M.digits_batch(step, UNION)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        states[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}
    return states


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init-seed", type=int, default=0, help="unused: every worker builds the same model")
    ap.add_argument("--job", default="unfreezing")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--add-at", type=int, default=6)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds between steps (time for faults)")
    ap.add_argument("--min-workers", type=int, default=2)
    args = ap.parse_args()

    model = frozen_mlp()
    try:
        opt = ShardedOptimizer(backbone_groups(model), cluster=args.cluster, optimizer="adamw", model=model,
                               job=args.job, lr=0.01, min_workers=args.min_workers, connect_timeout=60,
                               step_timeout=60, retry_timeout=120)
    except Exception as exc:  # noqa: BLE001 - the test reads the refusal
        torch.save({"rank": -1, "error": f"{type(exc).__name__}: {exc}"}, args.out)
        return
    steps = []
    while opt.steps_taken < args.steps:
        step = opt.steps_taken
        if step == args.add_at and len(opt.param_groups) == 2:
            add_group(model, opt)
        x, y = M.digits_batch(step, UNION)
        n = UNION // opt.world_size
        x, y = x[opt.rank * n:(opt.rank + 1) * n], y[opt.rank * n:(opt.rank + 1) * n]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch_size=n)
        steps.append(step)
        time.sleep(args.sleep)
    torch.save({"rank": opt.rank, "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "rollbacks": opt.rollbacks, "group_rollbacks": [e.rollbacks for e in opt.extensions],
                "group_steps": [e.steps_taken for e in opt.extensions], "steps": steps}, args.out)
    opt.close()


if __name__ == "__main__":
    main()
