"""The optimizers a job may name, and how a shard builds one over its slice.

A job names torch's lower-case class name and that class's own keyword arguments.
Servers wrap the stock ``torch.optim`` class over their fp32 slice (ZeRO's
approach), with the fused kernel where torch has one (~10x faster than the
default for-loop on a 25M slice on CPU). Workers validate the same way before
they register, so a typo fails on the worker with torch's own message.
"""
from __future__ import annotations

import json
from typing import Any

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
# Keyword arguments about *how* torch runs the update, not *what* it computes;
# the server chooses them, so workers on different hardware can share a job.
_IMPLEMENTATION_KWARGS = {"fused", "foreach", "capturable", "differentiable"}


def normalize_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check ``kwargs`` against torch's own constructor; return them in canonical JSON-able form."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    bad = _IMPLEMENTATION_KWARGS & kwargs.keys()
    if bad:
        raise ValueError(f"{sorted(bad)} are chosen by the shard servers; leave them out")
    if "lr" not in kwargs:
        raise ValueError("give the optimizer a learning rate (lr=...)")
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    try:
        OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(1))], **clean)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"torch.optim.{OPTIMIZERS[name].__name__} rejects {clean}: {exc}") from None
    return json.loads(json.dumps(clean, sort_keys=True))


def kwargs_json(kwargs: dict[str, Any]) -> str:
    return json.dumps(kwargs, sort_keys=True, separators=(",", ":"))


def build(name: str, kwargs: dict[str, Any], param: torch.Tensor) -> torch.optim.Optimizer:
    """A stock torch optimizer over one flat fp32 parameter, fused where torch supports it."""
    cls = OPTIMIZERS[name]
    try:
        return cls([param], **kwargs, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype
        return cls([param], **kwargs)
