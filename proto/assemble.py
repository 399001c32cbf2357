"""Shard slices <-> a model's ``state_dict`` and a ``torch.optim`` ``state_dict``.

The worker (``ShardedOptimizer.state_dict``/``load_state_dict``/``model_state_dict``),
the exporter (``shardps export``) and resuming from checkpoints all go through here,
using only the job: the layout (names, shapes, dtypes, param groups, tied names),
the buffers, and the optimizer's param groups. Optimizer state travels per piece as
``optim/<i>/<key>`` (``server.slice_optimizer``); parameter ``i`` of the layout is
the ``i``-th parameter of torch's param groups, in order, so its id in torch's
``state_dict`` is ``i`` too.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import torch

from . import optim
from .codec import dtype_from_name
from .layout import Layout
from .plan import ShardRange

STATE_PREFIX = "optim/"


def model_state_dict(layout: Layout, flat: torch.Tensor,
                     buffers: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Named parameters in their original shapes and dtypes (under every tied name), cut from the
    flat fp32 vector, and the job's buffers: what ``model.load_state_dict(strict=True)`` takes."""
    if flat.numel() != layout.numel:
        raise ValueError(f"flat vector has {flat.numel()} elements, the layout {layout.numel}")
    out = {}
    for e in layout.params:
        value = flat[e.offset:e.stop].reshape(e.shape).to(dtype_from_name(e.dtype))
        for name in (e.name, *e.aliases):
            out[name] = value.clone()  # one tensor per name: safetensors refuses shared memory
    out.update({k: v.clone() for k, v in (buffers or {}).items()})
    return out


def param_states(layout: Layout, shards: Sequence[dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """Each layout parameter's optimizer state, from its pieces on the shards (given in shard
    order): elementwise tensors are concatenated and shaped like the parameter; per-parameter
    scalars (0-d) are the same on every piece and taken once."""
    parts: dict[int, dict[str, list[torch.Tensor]]] = {}
    for tensors in shards:
        for name, value in tensors.items():
            if not name.startswith(STATE_PREFIX):
                continue
            _, index, key = name.split("/", 2)
            parts.setdefault(int(index), {}).setdefault(key, []).append(value)
    out = {}
    for index, keys in sorted(parts.items()):
        e = layout.params[index]
        state = {}
        for key, pieces in keys.items():
            if pieces[0].dim() == 0:
                state[key] = pieces[0].clone()
                continue
            have = sum(p.numel() for p in pieces)
            if have != e.numel:
                raise ValueError(f"optimizer state {key!r} of parameter {index} ({e.name}) is on the shards for "
                                 f"{have} of its {e.numel} elements: the shards hold parts of two states (is "
                                 f"another worker loading a state dict right now? load it on every worker "
                                 f"between the same two steps, and read it outside that window)")
            state[key] = torch.cat([p.reshape(-1) for p in pieces]).reshape(e.shape)
        out[index] = state
    return out


def optimizer_state_dict(job, shards: Sequence[dict[str, torch.Tensor]],
                         groups: Sequence[dict[str, Any]]) -> dict:
    """``{"state": {i: {...}}, "param_groups": [...]}`` as torch.optim saves it, for the job's
    optimizer: it loads into the stock class built over the same param groups. ``groups`` are
    the param groups' current hyper-parameters (a worker's ``param_groups``, or the job's)."""
    torch_defaults = optim.torch_defaults(job.optimizer)
    saved = []
    for g, group in enumerate(groups):
        packed = dict(torch_defaults)
        packed.update({k: v for k, v in group.items() if k not in ("params", "param_names")})
        packed = {k: tuple(v) if isinstance(torch_defaults.get(k), tuple) and isinstance(v, list) else v
                  for k, v in packed.items()}
        packed["params"] = [i for i, e in enumerate(job.layout.params) if e.group == g]
        saved.append(packed)
    return {"state": param_states(job.layout, shards), "param_groups": saved}


def merge_state(parts: list[dict]) -> dict:
    """One torch.optim state_dict from the job's and each added group's (each numbered from 0): ids
    and groups follow one another, as torch numbers the parameters of one optimizer."""
    state, groups, offset = {}, [], 0
    for part in parts:
        count = sum(len(g["params"]) for g in part["param_groups"])
        state.update({offset + int(i): entry for i, entry in part["state"].items()})
        groups += [{**g, "params": [offset + int(i) for i in g["params"]]} for g in part["param_groups"]]
        offset += count
    return {"state": state, "param_groups": groups}


def split_optimizer_state(job, state_dict: dict, ranges: Sequence[ShardRange]) -> list[dict[str, torch.Tensor]]:
    """A torch.optim state_dict cut into each shard's pieces (``optim/<i>/<key>``), in ``ranges``'
    order. Raises ValueError naming a tensor that does not fit its parameter."""
    state = state_dict.get("state", {})
    if not isinstance(state, dict):
        raise ValueError("the state dict's 'state' must map parameter ids to their state")
    out: list[dict[str, torch.Tensor]] = [{} for _ in ranges]
    for raw_id, entry in state.items():
        i = int(raw_id)
        if not 0 <= i < len(job.layout.params):
            raise ValueError(f"the state dict has state for parameter {i}; this optimizer has "
                             f"{len(job.layout.params)} parameters")
        e = job.layout.params[i]
        for key, value in entry.items():
            if value is None:
                continue
            t = value.detach().to("cpu", torch.float32) if torch.is_tensor(value) else torch.tensor(float(value))
            if t.numel() != e.numel and t.numel() != 1:
                raise ValueError(f"state {key!r} of parameter {i} ({e.name}) has {t.numel()} elements; "
                                 f"the parameter has {e.numel}")
            scalar = t.numel() == 1 and (t.dim() == 0 or e.numel != 1)
            for k, r in enumerate(ranges):
                lo, hi = max(e.offset, r.start), min(e.stop, r.stop)
                if lo < hi:
                    out[k][f"{STATE_PREFIX}{i}/{key}"] = (t.reshape(()) if scalar
                                                         else t.reshape(-1)[lo - e.offset:hi - e.offset])
    return out


def hyper_groups(job, hyper_json: str) -> list[dict[str, Any]]:
    """The job's param groups with a shard's current hyper-parameters (``hyperparams_json``) applied."""
    values = json.loads(hyper_json) if hyper_json else [{} for _ in job.groups]
    return [{**g, **v} for g, v in zip(job.groups, values)]
