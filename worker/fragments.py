"""A DiLoCo worker's outer side, per fragment of the model (``worker/diloco.py``).

A ``Fragment`` is some of the trained parameters, the outer job (a ``ShardedOptimizer``) that holds
them on the shards, and their open round: theta_at_last_sync (``anchor``) and the inner steps and
samples since. Without streaming the one fragment is the whole model; with ``fragments=F`` the
trained parameters are ``split`` into F contiguous runs, each its own job.
"""
from __future__ import annotations

import time

import torch

from .optimizer import ShardedOptimizer


class Fragment:
    """Some of the trained parameters, the outer job (a ``ShardedOptimizer``) that holds them, and
    their open round. Fragment f of F syncs after the inner steps t with (t - offset) % H == 0."""

    def __init__(self, outer: ShardedOptimizer, params: list[torch.Tensor], offset: int):
        self.outer, self.params, self.offset = outer, params, offset
        outer._moves_between_steps = True  # the inner steps move the model; that is no edit to warn about
        # "auto": inner steps before each outer step this worker took (by outer step), as a rollback needs them.
        self.base, self._history, self._rollbacks = 0, {outer.steps_taken: 0}, outer.rollbacks
        self.begin()

    @torch.no_grad()
    def begin(self) -> None:
        """The fragment's parameters hold the shards' values: they are theta_at_last_sync."""
        self.anchor = [p.detach().clone() for p in self.params]
        self.since_sync, self.samples = 0, 0
        self.round_start = time.monotonic()

    @torch.no_grad()
    def sync(self, weight: float) -> None:
        """Push this fragment's outer gradient (x ``weight``), load the new values: ``DiLoCo.sync``."""
        if self.since_sync == 0:
            return
        mine = {id(p) for p in self.params}
        for p in self.outer.flat.params:  # the job's others (the model's, untrained by the inner optimizer): no
            if id(p) not in mine:         # outer gradient, whatever backward left in their .grad
                p.grad = None
        for p, anchor in zip(self.params, self.anchor):
            delta = anchor - p.detach()
            if weight != 1.0:
                delta.mul_(weight)
            p.grad = delta  # the outer step pushes .grad, as any ShardedOptimizer step does
        self.outer.step(batch_size=self.samples)
        self.outer.zero_grad(set_to_none=True)  # the outer gradient is no gradient of the model
        if self.outer.rollbacks != self._rollbacks:  # the round was void: go on from the step the job went back to
            self._rollbacks = self.outer.rollbacks
            self.base = max((b for s, b in self._history.items() if s <= self.outer.steps_taken), default=0)
        else:
            self.base += self.since_sync
        self._history[self.outer.steps_taken] = self.base
        self.begin()


def split(params: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """``params`` in order, cut into ``parts`` non-empty runs of about equal element counts."""
    out: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    total, acc, k = max(1, sum(p.numel() for p in params)), 0, 0
    for i, p in enumerate(params):
        # The run this parameter's middle element falls in by size, but never skipping a run (none is
        # empty) and leaving each later run at least one parameter.
        want = min(int((acc + p.numel() / 2) * parts / total), parts - 1)
        k = min(max(want, k, parts - (len(params) - i)), k + 1) if i else 0
        out[k].append(p)
        acc += p.numel()
    return out
