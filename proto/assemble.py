"""Flat shard slices -> a model's ``state_dict`` and a ``torch.optim`` ``state_dict``.

Both the worker (``ShardedOptimizer.state_dict``) and the exporter (``shardps export``)
reassemble what the shards hold, using only the job's layout: names, shapes and
the dtypes the model was built with.
"""
from __future__ import annotations

from typing import Any

import torch

from .codec import dtype_from_name
from .layout import Layout


def model_state_dict(layout: Layout, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named parameters in their original shapes and dtypes, cut from the flat fp32 vector."""
    if flat.numel() != layout.numel:
        raise ValueError(f"flat vector has {flat.numel()} elements, the layout {layout.numel}")
    return {
        e.name: flat[e.offset:e.stop].reshape(e.shape).to(dtype_from_name(e.dtype)).clone()
        for e in layout.params
    }


def concat_shards(shards: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    """One key across shards (in shard order): 0-d values like Adam's "step" are shared, slices concatenate."""
    parts = [tensors[key] for tensors in shards if key in tensors]
    if parts and parts[0].dim() == 0:
        return parts[0]
    return torch.cat([p.reshape(-1) for p in parts])


def optimizer_state_dict(layout: Layout, shards: list[dict[str, torch.Tensor]], group: dict[str, Any]) -> dict:
    """``{"state": {i: {...}}, "param_groups": [group + params]}`` as torch.optim saves it.

    ``i`` is the parameter's index in layout order, so the result loads into a stock
    optimizer built over ``model.parameters()`` (trainable ones, same order).
    """
    keys = [k for k in shards[0] if k != "param"] if shards else []
    flat = {k: concat_shards(shards, k) for k in keys}
    state = {}
    for i, e in enumerate(layout.params):
        state[i] = {k: v.clone() if v.dim() == 0 else v[e.offset:e.stop].reshape(e.shape).clone() for k, v in flat.items()}
    group = {k: v for k, v in group.items() if k != "params"}
    group["params"] = list(range(len(layout.params)))
    return {"state": state, "param_groups": [group]}
