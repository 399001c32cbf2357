"""SliceOptimizer: a stock torch optimizer over one shard's pieces, with torch's per-parameter semantics.

Each *piece* (the part of one model parameter inside the shard's range) is one
tensor of the torch optimizer, a view into the shard's flat fp32 slice; pieces
are grouped into one torch param group per param group of the job. So, exactly
as in one process:

- a piece whose gradient is None on every worker of a step is skipped (no moment
  update, no weight decay, no step count), as torch skips ``p.grad is None``;
- every param group has its own hyper-parameters, and every scheduled value (lr,
  betas, momentum, ...) is set from the step's push before stepping;
- per-parameter scalars (Adam's ``step``, NAdam's ``mu_product``) count per piece,
  and the two pieces of a parameter cut by a shard boundary count alike.

State travels by name, ``optim/<i>/<key>``: optimizer state ``key`` of layout
parameter ``i``'s piece here (elementwise tensors cover the piece; scalars are 0-d).

    opt = SliceOptimizer(job, ShardRange(0, 0, 128), torch.zeros(128))
    opt.set_hyper(optim.parse_hyper(job.optimizer, job.groups, job.hyper_json()))
    opt.step(grad, present=None)
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch

from ..proto import optim
from ..proto.messages import JobConfig
from ..proto.plan import ShardRange

STATE_PREFIX = "optim/"


def state_name(index: int, key: str) -> str:
    return f"{STATE_PREFIX}{index}/{key}"


def parse_state_name(name: str) -> tuple[int, str]:
    """(layout index, state key) of ``optim/<i>/<key>``; ValueError if malformed."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] + "/" != STATE_PREFIX or not parts[1].isdigit() or not parts[2]:
        raise ValueError(f"optimizer state names are optim/<parameter index>/<key>, got {name[:80]!r}")
    return int(parts[1]), parts[2]


class SliceOptimizer:
    def __init__(self, job: JobConfig, shard: ShardRange, param: torch.Tensor):
        self.job, self.shard = job, shard
        self.pieces = job.layout.pieces(shard.start, shard.stop)
        self.tensors = [param[p.start - shard.start:p.stop - shard.start] for p in self.pieces]
        self.position = {p.index: i for i, p in enumerate(self.pieces)}  # layout index -> piece number
        by_group: dict[int, list[int]] = {}
        for i, p in enumerate(self.pieces):
            by_group.setdefault(job.layout.params[p.index].group, []).append(i)
        self.group_ids = sorted(by_group)  # the job group of each torch param group
        groups = [([self.tensors[i] for i in by_group[g]], job.groups[g]) for g in self.group_ids]
        # A shard with no elements still holds an optimizer (over nothing that ever steps).
        self.optimizer = optim.build(job.optimizer, groups or [([torch.zeros(0)], job.groups[0])])
        self.hyper = [dict(g) for g in job.groups]  # every job group's current kwargs
        self._keys = job.schedulable()

    def set_hyper(self, groups: list[dict[str, Any]]) -> None:
        """The job groups' kwargs for the next steps (checked by ``optim.parse_hyper``)."""
        self.hyper = groups

    def boundaries(self) -> list[int]:
        """Offsets in the slice where one piece ends and the next begins (where ``step`` may be cut)."""
        return [p.stop - self.shard.start for p in self.pieces[:-1]]

    def step(self, grad: torch.Tensor, present: list[bool] | None, lr_scale: float = 1.0,
             lo: int = 0, hi: int | None = None) -> None:
        """One torch step with ``grad`` (the slice's gradient); pieces not ``present`` are skipped.
        With ``lo``/``hi`` (offsets in the slice, on ``boundaries``) only the pieces inside [lo, hi)
        step: a push in parts steps each part once all of it arrived (torch steps the other pieces
        not at all, as it skips a parameter whose ``.grad`` is None), and the parts of one step
        together are that step, to the bit."""
        hi = self.shard.numel if hi is None else hi
        for group, g in zip(self.optimizer.param_groups, self.group_ids):
            for key in self._keys[g]:
                value = self.hyper[g][key]
                group[key] = tuple(value) if isinstance(value, list) else value
            group["lr"] = self.hyper[g]["lr"] * lr_scale
        base = self.shard.start
        for i, (piece, tensor) in enumerate(zip(self.pieces, self.tensors)):
            inside = lo <= piece.start - base and piece.stop - base <= hi
            tensor.grad = grad[piece.start - base:piece.stop - base] if inside and (present is None or present[i]) \
                else None
        try:
            self.optimizer.step()
        finally:
            for tensor in self.tensors:
                tensor.grad = None

    def lr(self) -> float:
        """Group 0's lr (what replies report as the applied lr)."""
        return float(self.hyper[0]["lr"])

    def partial_norm(self, grad: torch.Tensor, present: list[bool] | None, norm_type: float) -> float:
        """Sum over present pieces of norm(piece)^p (the largest |value| for p = inf), in float64."""
        base, parts = self.shard.start, []
        for i, piece in enumerate(self.pieces):
            if present is None or present[i]:
                parts.append(grad[piece.start - base:piece.stop - base])
        if not parts:
            return 0.0
        norms = torch._foreach_norm(parts, norm_type)
        values = torch.stack(norms).double()
        if math.isinf(norm_type):
            return float(values.max())
        return float(values.pow(norm_type).sum())

    # ------------------------------------------------------------------ state by name

    def state_tensors(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """The optimizer state, by ``optim/<i>/<key>`` (pieces that never stepped have none): copies,
        or with ``copy=False`` the optimizer's own tensors, which the caller reads under the shard's
        lock and lets go of before releasing it (the next step changes them in place)."""
        out = {}
        for piece, tensor in zip(self.pieces, self.tensors):
            for key, value in self.optimizer.state.get(tensor, {}).items():
                if value is None:
                    continue
                if not torch.is_tensor(value):
                    value = torch.tensor(value)
                elif copy:
                    value = value.detach().clone()
                out[state_name(piece.index, key)] = value.detach()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take over optimizer state given by name (what ``state_tensors`` returns, or a torch
        state_dict cut into pieces). Checked completely before anything changes; pieces not
        named start without state, as parameters that never stepped do in torch."""
        elementwise, scalars = _state_keys(self.job.optimizer, json.dumps(self.job.groups[0], sort_keys=True))
        per_piece: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            index, key = parse_state_name(name)
            if index not in self.position:
                raise ValueError(f"{name}: parameter {index} has no piece in shard {self.shard.shard_id}")
            numel = self.pieces[self.position[index]].numel
            if key in elementwise:
                if value.numel() != numel:
                    raise ValueError(f"{name} has {value.numel()} elements; the piece here has {numel}")
            elif key in scalars:
                if value.numel() != 1:
                    raise ValueError(f"{name} must hold one number, got {value.numel()}")
            else:
                raise ValueError(f"{name}: torch.optim.{type(self.optimizer).__name__} keeps no state named {key!r} "
                                 f"(it keeps {sorted(elementwise | scalars)})")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be finite floating-point values")
            _check_state_range(name, key, value)
            per_piece.setdefault(self.position[index], {})[key] = value.reshape(-1) if key in elementwise \
                else value.reshape(())
        for values in per_piece.values():
            _check_centered(values)
        ids = {id(t): n for n, t in enumerate(t for g in self.optimizer.param_groups for t in g["params"])}
        state = {ids[id(self.tensors[i])]: values for i, values in per_piece.items()}
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


# What torch's optimizers keep that only some values can be: a running mean of squares (whose square
# root divides the step), a step count (Adam's bias correction divides by 1 - beta ** step), a product
# of momentum factors, a step size. Loaded outside these ranges, the next step writes NaN or Inf.
NON_NEGATIVE = {
    "step": "a count of the steps taken",
    "exp_avg_sq": "a running mean of squared gradients", "max_exp_avg_sq": "the largest running mean of squares",
    "square_avg": "a running mean of squared gradients", "sum": "a sum of squared gradients",
    "acc_delta": "a running mean of squared updates", "exp_inf": "a running maximum of |gradient|",
    "step_size": "a step size", "eta": "a learning rate", "mu_product": "a product of momentum factors",
}
AT_MOST_ONE = {"mu_product": "a product of momentum factors", "mu": "an averaging factor 1 / steps"}
POSITIVE = {"mu": "an averaging factor 1 / steps"}


def _check_state_range(name: str, key: str, value: torch.Tensor) -> None:
    """ValueError naming ``name`` when it holds a value torch's optimizer could never have produced."""
    low, high = (float(v) for v in torch.aminmax(value.reshape(-1).double())) if value.numel() else (0.0, 0.0)
    if key in NON_NEGATIVE and low < 0:
        raise ValueError(f"{name} is {NON_NEGATIVE[key]} and must be >= 0, got a smallest value of {low:g}")
    if key in AT_MOST_ONE and high > 1:
        raise ValueError(f"{name} is {AT_MOST_ONE[key]} and must be <= 1, got a largest value of {high:g}")
    if key in POSITIVE and low <= 0:
        raise ValueError(f"{name} is {POSITIVE[key]} and must be > 0, got a smallest value of {low:g}")


def _check_centered(values: dict[str, torch.Tensor]) -> None:
    """Centered RMSprop takes sqrt(square_avg - grad_avg ** 2): a mean of squares is never below the
    square of the mean, and loaded so, the next step's root is NaN."""
    if "grad_avg" in values and "square_avg" in values:
        square = values["square_avg"].double()
        gap = square - values["grad_avg"].double() ** 2 + 1e-5 * square.abs()  # float32 rounding of real state
        if bool((gap < 0).any()):
            raise ValueError("square_avg must be >= grad_avg ** 2 elementwise (a mean of squares is never below "
                             f"the square of the mean); {int((gap < 0).sum())} elements are not")


@functools.lru_cache(maxsize=64)
def _state_keys(name: str, kwargs_json: str) -> tuple[frozenset[str], frozenset[str]]:
    """(elementwise, scalar) state keys that torch's ``name`` keeps with these kwargs, found by
    stepping it once on a two-element tensor. Keys that only some kwargs create (amsgrad's
    ``max_exp_avg_sq``, SGD's ``momentum_buffer``, centered RMSprop's ``grad_avg``) are found
    by probing those switches on too."""
    probes = [json.loads(kwargs_json)]
    for switch in ("amsgrad", "centered"):
        if switch in probes[0]:
            probes.append({**probes[0], switch: True})
    if "momentum" in probes[0]:
        probes.append({**probes[0], "momentum": 0.9})
    elementwise, scalars = set(), set()
    for kw in probes:
        p = torch.zeros(2, requires_grad=True)
        opt = optim.OPTIMIZERS[name]([p], **kw)
        p.grad = torch.ones(2)
        opt.step()
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                (elementwise if value.dim() else scalars).add(key)
    return frozenset(elementwise), frozenset(scalars)
