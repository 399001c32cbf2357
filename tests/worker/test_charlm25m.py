"""The charlm25m workload: charlm's data and metric at the 25M-parameter size bench/network.py uses."""
from __future__ import annotations

import torch

from shardps.worker.workloads import CharLM, get_workload


def test_charlm25m_has_25m_parameters_on_charlm_data_and_learns():
    wl, small = get_workload("charlm25m"), get_workload("charlm")
    model = wl.model()
    assert sum(p.numel() for p in model.parameters()) >= 25_000_000
    assert isinstance(wl, CharLM) and wl.metric == "bits_per_char"
    x, y = wl.global_batch(0, 4)
    sx, sy = small.global_batch(0, 4)
    assert torch.equal(x, sx) and torch.equal(y, sy), "same windows as charlm for the same step"
    opt = torch.optim.AdamW(model.parameters(), lr=wl.defaults.lr)
    before = wl.loss(model, x, y)
    before.backward()
    opt.step()
    with torch.no_grad():
        assert wl.loss(model, x, y) < before, "one step on a batch lowers its loss"
