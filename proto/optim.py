"""The optimizers a job may name, their hyper-parameters, and how a shard builds one.

A job names torch's lower-case class name and that class's own keyword arguments.
Every optimizer here is *elementwise* (each element's update reads only that
element's gradient and state, plus per-parameter scalars such as the step count),
so cutting the flat vector into shards does not change the math: a server wraps
the stock ``torch.optim`` class over its pieces (ZeRO's approach), one param group
per group of the job, with the fused kernel where torch has one (~10x the default
for-loop on a 25M slice on CPU).

Hyper-parameters: every number (or tuple of numbers) in the class's defaults is
*schedulable*: it travels with each push, so any ``torch.optim.lr_scheduler``
(lr, and OneCycleLR's momentum/betas) reaches the shards. The rest (``amsgrad``,
``nesterov``, ...) is fixed for the job. ``fused``/``foreach``/``capturable``/
``differentiable`` choose *how* torch runs the update, not what it computes; they
are accepted and left to the servers, so workers on different hardware share a job.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
from typing import Any, Sequence

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adadelta": torch.optim.Adadelta,
    "asgd": torch.optim.ASGD,
    "rprop": torch.optim.Rprop,
}
# Not elementwise, so they cannot be cut into shards; named here so the error says why.
NOT_SHARDABLE = {
    "lbfgs": "LBFGS needs a closure and a line search over the whole parameter vector",
    "sparseadam": "SparseAdam needs sparse gradients; shardps pushes dense ones",
    "adafactor": "Adafactor factors second moments by rows and columns of whole matrices",
}
IMPLEMENTATION_KWARGS = frozenset({"fused", "foreach", "capturable", "differentiable"})
MAX_HYPER_JSON = 1 << 16  # bytes of a push's hyper-parameters (a few per group)


def name_of(cls_or_name) -> str:
    """The job's name for a torch optimizer class (or a name as given)."""
    if isinstance(cls_or_name, str):
        return cls_or_name.lower()
    for name, cls in OPTIMIZERS.items():
        if cls is cls_or_name:
            return name
    return getattr(cls_or_name, "__name__", str(cls_or_name)).lower()


def check_name(name: str) -> type[torch.optim.Optimizer]:
    if name in NOT_SHARDABLE:
        raise ValueError(f"optimizer {name!r} cannot be sharded: {NOT_SHARDABLE[name]}")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


def _plain(value: Any) -> Any:
    """JSON-able form of a hyper-parameter value (tuples become lists, 0-d tensors numbers)."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"hyper-parameter tensors must hold one number, got shape {list(value.shape)}")
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _schedulable(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def full_defaults(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The class's complete defaults with ``kwargs`` applied, validated by torch's own
    constructor, in JSON-able form without the implementation switches."""
    cls = check_name(name)
    clean = {k: _plain(v) for k, v in kwargs.items() if k not in IMPLEMENTATION_KWARGS}
    try:
        probe = cls([torch.nn.Parameter(torch.zeros(1))], **clean)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"torch.optim.{cls.__name__} rejects {clean}: {exc}") from None
    accepted = _constructor_keys(cls)
    out = {k: _plain(v) for k, v in probe.defaults.items() if k in accepted and k not in IMPLEMENTATION_KWARGS}
    for key in schedulable_keys(out):
        _check_value(-1, key, out[key], out[key])
    return json.loads(json.dumps(out, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _constructor_keys(cls) -> frozenset[str]:
    """The keyword arguments the class's constructor takes (its ``defaults`` may hold more:
    AdamW records ``decoupled_weight_decay``, which only Adam accepts)."""
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self", "params"}


def torch_defaults(name: str) -> dict[str, Any]:
    """The stock class's own ``defaults`` (implementation switches included), as torch saves
    them in a param group; a state_dict with these keys loads into the stock class."""
    probe = check_name(name)([torch.nn.Parameter(torch.zeros(1))])
    return dict(probe.defaults)


def group_kwargs(name: str, defaults: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    """One param group's hyper-parameters: ``defaults`` with the group's own keys applied
    (keys torch's class does not know, e.g. a scheduler's "initial_lr", are left out)."""
    merged = dict(defaults)
    merged.update({k: _plain(v) for k, v in group.items() if k in defaults})
    return full_defaults(name, merged)


def schedulable_keys(kwargs: dict[str, Any]) -> list[str]:
    """The hyper-parameters that travel with every push, sorted."""
    return sorted(k for k, v in kwargs.items() if _schedulable(v))


def hyper_of(groups: Sequence[dict[str, Any]], keys: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """The schedulable values of each param group (a worker's ``param_groups``), JSON-able."""
    return [{k: _plain(g[k]) for k in ks} for g, ks in zip(groups, keys)]


def parse_hyper(name: str, groups: Sequence[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Check a push's hyper-parameters against the job's ``groups``; returns each group's full
    kwargs with them applied. Raises ValueError naming the group and field at fault."""
    if len(text) > MAX_HYPER_JSON:
        raise ValueError(f"hyper-parameters are {len(text)} bytes; at most {MAX_HYPER_JSON}")
    try:
        values = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"hyper-parameters are not JSON: {exc}") from None
    if not isinstance(values, list) or len(values) != len(groups):
        raise ValueError(f"hyper-parameters must be a JSON list of {len(groups)} objects, one per param group")
    out = []
    for i, (given, base) in enumerate(zip(values, groups)):
        keys = schedulable_keys(base)
        if not isinstance(given, dict) or sorted(given) != keys:
            raise ValueError(f"param group {i}: hyper-parameters must be exactly {keys}, "
                             f"got {sorted(given) if isinstance(given, dict) else type(given).__name__}")
        for key in keys:
            _check_value(i, key, given[key], base[key])
        out.append({**base, **given})
    for i, kwargs in enumerate(out):
        if kwargs["lr"] < 0:
            raise ValueError(f"param group {i}: lr must be >= 0, got {kwargs['lr']}")
        try:
            OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(1))], **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"param group {i}: torch.optim.{OPTIMIZERS[name].__name__} rejects "
                             f"{values[i]}: {exc}") from None
    return out


def _check_value(group: int, key: str, value: Any, like: Any) -> None:
    """A finite number, or a list of finite numbers as long as the job's."""
    where = f"param group {group}: {key}" if group >= 0 else key
    if isinstance(like, list):
        if not isinstance(value, list) or len(value) != len(like):
            raise ValueError(f"{where} must be a list of {len(like)} numbers, got {value!r}")
        for v in value:
            _check_value(group, key, v, 0.0)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")


def build(name: str, groups: Sequence[tuple[list[torch.Tensor], dict[str, Any]]]) -> torch.optim.Optimizer:
    """A stock torch optimizer with one param group per (tensors, kwargs) (at least one), fused
    where torch has a kernel for this device and dtype, else its default implementation."""
    cls = OPTIMIZERS[name]
    param_groups = [{"params": params, **kwargs} for params, kwargs in groups]
    try:
        return cls(param_groups, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this class/device/dtype
        return cls(param_groups)
