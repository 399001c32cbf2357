"""DiLoCo on 2 shard servers x 2 worker processes: H = 1 with inner SGD(eta) and outer SGD(1) is today's
sync SGD(eta); H = 4 with inner AdamW and outer Nesterov SGD equals DiLoCo written out in one process."""
import json
import sys
from pathlib import Path

import pytest
import torch

from shardps import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from task import global_batch, loss_fn, make_model  # noqa: E402

PLAIN_OUTER = {"outer_lr": 1.0, "outer_momentum": 0.0, "nesterov": False}


def diloco_reference(initial, sizes, steps, sync_every, inner_kwargs, outer_kwargs):
    """DiLoCo in one process: each worker's inner AdamW loop on its rows, from the same theta each round;
    the sample-weighted mean outer gradient; torch's SGD on the flat parameter vector."""
    theta = torch.nn.Parameter(torch.nn.utils.parameters_to_vector(_model(initial).parameters()).detach().clone())
    outer = torch.optim.SGD([theta], **outer_kwargs)
    workers = [_model(initial) for _ in sizes]
    inners = [torch.optim.AdamW(m.parameters(), **inner_kwargs) for m in workers]
    for start in range(0, steps, sync_every):
        deltas, samples = [], []
        for rank, (model, inner) in enumerate(zip(workers, inners)):
            _load_flat(model, theta.detach())
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            for step in range(start, min(start + sync_every, steps)):
                x, y = global_batch(step, sum(sizes))
                inner.zero_grad()
                loss_fn(model, x[lo:hi], y[lo:hi]).backward()
                inner.step()
            deltas.append(theta.detach() - torch.nn.utils.parameters_to_vector(model.parameters()).detach())
            samples.append((min(start + sync_every, steps) - start) * (hi - lo))
        theta.grad = sum(d * (n / sum(samples)) for d, n in zip(deltas, samples))
        outer.step()
    final = _model(initial)
    _load_flat(final, theta.detach())
    return final.state_dict()


@torch.no_grad()
def _load_flat(model, vector):
    """Copy ``vector`` into the parameters (torch's vector_to_parameters would make them views of it)."""
    offset = 0
    for p in model.parameters():
        p.copy_(vector[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def _model(state):
    model = make_model(0)
    model.load_state_dict(state)
    return model


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.slow
def test_diloco_with_one_inner_sgd_step_and_plain_outer_sgd_is_sync_sgd(run_workers):
    sizes, steps, eta = "24,40", 12, 0.1
    with LocalCluster(servers=2) as cluster:
        diloco = run_workers(cluster, 2, script="diloco_worker.py", inner="sgd", inner_kwargs=json.dumps({"lr": eta}),
                             sync_every=1, outer_kwargs=json.dumps(PLAIN_OUTER), sizes=sizes, steps=steps, init_seed=7)
    with LocalCluster(servers=2) as cluster:
        plain = run_workers(cluster, 2, optimizer="sgd", kwargs=json.dumps({"lr": eta}), sizes=sizes, steps=steps,
                            init_seed=7)
    assert max_diff(diloco[0]["initial"], plain[0]["initial"]) == 0.0
    moved = max_diff(plain[0]["final"], plain[0]["initial"])
    assert moved > 1e-2  # the runs trained: equal finals say something
    for d, p in zip(diloco, plain):
        assert len(d["rounds"]) == steps
        assert max_diff(d["final"], p["final"]) <= 1e-6


@pytest.mark.slow
def test_two_workers_diloco_with_adamw_and_nesterov_equals_one_process_diloco(run_workers):
    sizes, steps, sync_every = [24, 40], 18, 4  # 4 rounds of 4 and a last one of 2 inner steps
    inner_kwargs, outer_kwargs = {"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.7, "momentum": 0.9, "nesterov": True}
    with LocalCluster(servers=2) as cluster:
        results = run_workers(cluster, 2, script="diloco_worker.py", inner="adamw",
                              inner_kwargs=json.dumps(inner_kwargs), sync_every=sync_every,
                              sizes=",".join(map(str, sizes)), steps=steps)
    assert max_diff(results[0]["initial"], results[1]["initial"]) == 0.0
    expected = diloco_reference(results[0]["initial"], sizes, steps, sync_every, inner_kwargs, outer_kwargs)
    assert max_diff(expected, results[0]["initial"]) > 1e-2
    for r in results:
        assert [round_["versions"] for round_ in r["rounds"]] == [[v, v] for v in range(1, 6)]
        assert max_diff(r["final"], expected) <= 1e-5
