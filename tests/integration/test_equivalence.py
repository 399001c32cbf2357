"""Sync training on 2 shard servers x 2 worker processes equals one process with plain torch.optim
on the union batch (max abs difference <= 1e-5), for SGD with momentum, Adam and AdamW."""
import json
import sys
from pathlib import Path

import pytest
import torch

from shardps import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from task import reference  # noqa: E402

STEPS = 30
CASES = [  # (optimizer, kwargs, per-rank batch sizes, LR scheduler, mode, transport, overlap)
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, [32, 32], True, "sync", "auto", False),
    ("adam", {"lr": 0.01, "betas": [0.9, 0.99]}, [24, 40], False, "sync", "grpc", False),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}, [40, 17], False, "sync", "auto", True),
    ("adam", {"lr": 0.01}, [20, 44], False, "ssp", "grpc", True),  # bounded staleness with k = 0 is sync
]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, kwargs, sizes, scheduler, mode, transport, overlap", CASES,
                         ids=[f"{c[0]}-{c[4]}-{c[5]}" + ("-overlap" if c[6] else "") for c in CASES])
def test_sync_training_equals_single_process_torch_on_the_union_batch(run_workers, optimizer, kwargs, sizes, scheduler,
                                                                      mode, transport, overlap):
    with LocalCluster(servers=2) as cluster:
        results = run_workers(cluster, len(sizes), optimizer=optimizer, kwargs=json.dumps(kwargs),
                              sizes=",".join(map(str, sizes)), steps=STEPS, scheduler=scheduler, mode=mode,
                              staleness=0, transport=transport, overlap=overlap)
    # Workers were initialised differently; both started from the job's (initializer's) parameters.
    for key in results[0]["initial"]:
        assert torch.equal(results[0]["initial"][key], results[1]["initial"][key])
    ref_params, ref_state = reference(results[0]["initial"], optimizer, kwargs, sizes, scheduler, STEPS)
    for r in results:
        assert r["versions"] == [STEPS, STEPS]
        for key, value in ref_params.items():
            diff = (r["final"][key] - value).abs().max().item()
            assert diff <= 1e-5, f"{optimizer}: {key} differs by {diff}"
    # The optimizer state gathered from the shards matches torch's own, key by key.
    got = results[0]["optimizer_state"]["state"]
    for i, ref in ref_state["state"].items():
        for key, value in ref.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert (got[i][key] - value).abs().max().item() <= 1e-4, f"{optimizer}: state {i}.{key}"
