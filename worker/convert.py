"""Turn a torch optimizer a trainer built (and its schedulers) into a ShardedOptimizer.

Lightning's ``configure_optimizers`` and the HF Trainer build a stock ``torch.optim``
optimizer; ``from_torch`` makes the ShardedOptimizer with the same class, param groups and
hyper-parameters (per group), and ``rebind_scheduler`` points a scheduler built on the stock
one at it, so the scheduled lr reaches the shards with every push. In DiLoCo mode
(``mode="diloco"`` or ``"diloco-async"``, ``for_trainer``) the stock optimizer stays as it is, the
inner optimizer of a ``DiLoCo``, and its schedulers keep driving it.

    sharded = from_torch(torch.optim.AdamW(groups, lr=1e-3), model=model, mode="sync")
    rebind_scheduler(scheduler, sharded)
    job = for_trainer(torch_opt, model, mode="diloco", sync_every=20)   # a DiLoCo over torch_opt
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ..proto import optim
from .diloco import DiLoCo
from .optimizer import ShardedOptimizer

# A trainer integration's mode -> the mode of DiLoCo's outer steps (as ``shardps run --mode``).
DILOCO_MODES = {"diloco": "sync", "diloco-async": "async"}
DILOCO_OPTIONS = ("sync_every", "sync_seconds", "fragments", "outer", "outer_lr", "outer_momentum", "nesterov",
                  "outer_kwargs", "batch_size")


def is_diloco(options: dict[str, Any]) -> bool:
    return options.get("mode") in DILOCO_MODES


def for_trainer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, **options: Any) -> ShardedOptimizer | DiLoCo:
    """The job a trainer's torch ``optimizer`` trains ``model`` in, joined (blocks as the constructors do):
    with ``mode="diloco"`` / ``"diloco-async"`` a ``DiLoCo`` whose inner optimizer is ``optimizer``
    itself (sync / async outer steps; ``options`` also takes DiLoCo's ``sync_every``, ``outer_lr``, ...);
    otherwise ``from_torch``'s ShardedOptimizer. ValueError for DiLoCo's options without its mode."""
    if is_diloco(options):
        return DiLoCo(model, optimizer, **{**options, "mode": DILOCO_MODES[options["mode"]]})
    stray = sorted(k for k in DILOCO_OPTIONS if k in options)
    if stray:
        raise ValueError(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} DiLoCo's: add mode='diloco' "
                         f"(or 'diloco-async'), or leave {'it' if len(stray) == 1 else 'them'} out")
    return from_torch(optimizer, model=model, **options)


def from_torch(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
               **sharded_kwargs: Any) -> ShardedOptimizer:
    """A ShardedOptimizer over ``optimizer``'s param groups (their own hyper-parameters and a
    scheduler's ``initial_lr`` kept), of its class, with its defaults; registers with the
    cluster (blocks as the constructor does). ``sharded_kwargs``: ShardedOptimizer's options
    (cluster, mode, min_workers, ...). A ShardedOptimizer is returned as it is. Refuses an
    optimizer that already stepped: its state would be lost."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if any(optimizer.state.values()):
        raise ValueError(f"{type(optimizer).__name__} already has state (it stepped): build the ShardedOptimizer "
                         "before training, or load the state with its load_state_dict afterwards")
    cls = type(optimizer)
    accepted = optim._constructor_keys(cls)
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [dict(g) for g in optimizer.param_groups]  # the same parameter lists; the group's numbers copied
    return ShardedOptimizer(groups, optimizer=cls, model=model, **{**defaults, **sharded_kwargs})


def rebind_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Make ``scheduler`` (built on the stock optimizer ``from_torch`` replaced) set ``optimizer``'s
    param groups from now on. Its counters are kept; ``optimizer.step`` is tracked as the scheduler's
    constructor tracks it (torch warns when a scheduler steps before its optimizer did)."""
    scheduler.optimizer = optimizer
    if not hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        step = optimizer.step

        @functools.wraps(step)
        def tracked(*args, **kwargs):
            optimizer._opt_called = True
            return step(*args, **kwargs)

        tracked._wrapped_by_lr_sched = True
        optimizer.step = tracked
