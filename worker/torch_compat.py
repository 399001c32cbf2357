"""What makes ShardedOptimizer behave like a torch.optim optimizer in a user's own loop.

- ``describe_params``: the names, groups and tied aliases of whatever a user passes
  (a module, parameters, (name, parameter) pairs, or param-group dicts, as torch does).
- ``persistent_buffers`` / ``load_buffers``: a module's state_dict buffers (BatchNorm's
  running statistics), which the job keeps and broadcasts as DDP does.
- ``grad_scaler_state``: fp16 ``GradScaler`` support. The optimizer declares
  ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` always calls ``opt.step()``
  with the local overflow verdict in ``opt.found_inf``; when the step was skipped
  because *another* worker overflowed, this worker's scaler must back off too (as
  DDP's all-reduce makes every rank see the overflow), so ``step`` marks the
  scaler's own per-optimizer record, found on the calling frame.
- ``warn_on_local_clipping``: ``torch.nn.utils.clip_grad_norm_`` on a sharded model
  clips this worker's own gradient, not the averaged one; the first such call per
  optimizer says so and names ``opt.clip_grad_norm_``.
"""
from __future__ import annotations

import functools
import sys
import warnings
import weakref
from typing import Any, Sequence

import torch

_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # ShardedOptimizers whose parameters the clip wrapper knows


def describe_params(param_groups: Sequence[dict[str, Any]], module: torch.nn.Module | None):
    """(params, names, group index of each, tied aliases of each) in the order of ``param_groups``."""
    names_by_id: dict[int, list[str]] = {}
    if module is not None:
        for name, p in module.named_parameters(remove_duplicate=False):
            names_by_id.setdefault(id(p), []).append(name)
    params, names, groups, aliases = [], [], [], []
    for g, group in enumerate(param_groups):
        given = group.get("param_names")
        for k, p in enumerate(group["params"]):
            known = names_by_id.get(id(p), [])
            name = given[k] if given else (known[0] if known else str(len(params)))
            params.append(p)
            names.append(name)
            groups.append(g)
            aliases.append(tuple(n for n in known if n != name))
    return params, names, groups, aliases


def persistent_buffers(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The buffers ``module.state_dict()`` holds (non-persistent ones, e.g. causal masks, are constants)."""
    if module is None:
        return {}
    keys = set(module.state_dict(keep_vars=True))
    out = {}
    for name, b in module.named_buffers(remove_duplicate=False):
        if name in keys and name not in out:
            out[name] = b
    return out


@torch.no_grad()
def load_buffers(buffers: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the module's own buffer tensors (their device and dtype kept)."""
    for name, b in buffers.items():
        if name in values:
            b.copy_(values[name])


def grad_scaler_state(max_depth: int = 8) -> dict | None:
    """The per-optimizer record of the ``GradScaler.step`` call that is calling us, if any."""
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        scaler = frame.f_locals.get("self")
        if isinstance(scaler, torch.amp.GradScaler) and isinstance(frame.f_locals.get("optimizer_state"), dict):
            return frame.f_locals["optimizer_state"]
        frame = frame.f_back
    return None


def mark_overflow(scaler_state: dict | None) -> bool:
    """Make the scaler's next ``update()`` see an overflow; False if no scaler state was found."""
    if not scaler_state or not scaler_state.get("found_inf_per_device"):
        return False
    for t in scaler_state["found_inf_per_device"].values():
        t.fill_(1.0)
    return True


def track(opt) -> None:
    """Register ``opt`` with the wrapper around torch's clip_grad_norm_ (installed once)."""
    _LIVE.add(opt)
    utils = torch.nn.utils
    if getattr(utils.clip_grad_norm_, "_shardps_wrapped", False):
        return
    original = utils.clip_grad_norm_

    @functools.wraps(original)
    def clip_grad_norm_(parameters, *args, **kwargs):
        params = [parameters] if torch.is_tensor(parameters) else list(parameters)
        ids = {id(p) for p in params}
        for opt_ in list(_LIVE):
            # DiLoCo's outer jobs (_moves_between_steps): its inner steps are local, so is their clipping.
            if not opt_._warned_local_clip and not opt_._moves_between_steps and ids & opt_._param_ids:
                opt_._warned_local_clip = True
                warnings.warn(
                    "torch.nn.utils.clip_grad_norm_ on a ShardedOptimizer's parameters clips this worker's own "
                    "gradient before the shards average them, so the run differs from single-process training; "
                    "call opt.clip_grad_norm_(max_norm) instead: it clips the averaged gradient by its norm over "
                    "every shard and returns that norm, as torch does on the union batch", stacklevel=2)
        return original(params, *args, **kwargs)

    clip_grad_norm_._shardps_wrapped = True
    utils.clip_grad_norm_ = clip_grad_norm_
    utils.clip_grad.clip_grad_norm_ = clip_grad_norm_
