"""DiLoCo / local SGD: H inner steps on the worker, then one outer step on the shards.

    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = DiLoCo(model, inner, cluster="127.0.0.1:7070", sync_every=100, min_workers=2)
    for x, y in loader: opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(batch_size=len(x))

The inner optimizer is any torch optimizer, built as usual; it and its state stay on
this worker. ``step()`` runs it; every ``sync_every`` steps it also runs the outer
step: it pushes the outer gradient ``theta_at_last_sync - theta_now`` of every
parameter the inner optimizer trains to the shards, whose optimizer is the *outer*
one (DiLoCo's Nesterov SGD, lr 0.7, momentum 0.9, by default), and pulls the new
parameters, which become ``theta_at_last_sync``. That outer step is an ordinary
``ShardedOptimizer`` step (``self.outer``): exactly-once pushes, the sync / ssp /
async closing rules, sample-weighted means, replication, checkpoints, export and
failover all apply to it unchanged.

With ``sync_every=1``, inner ``SGD(lr=eta)`` and ``outer="sgd", outer_lr=1,
outer_momentum=0`` this is sync data-parallel ``SGD(lr=eta)`` (to fp32 rounding).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from ..proto import optim
from ..proto.defaults import OUTER_LR, OUTER_MOMENTUM
from ..proto.messages import UpdateMode
from .optimizer import ShardedOptimizer

DILOCO_OUTER = {"lr": OUTER_LR, "momentum": OUTER_MOMENTUM, "nesterov": True}  # Douillard et al. 2023


class DiLoCo:
    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, cluster: str | None = None,
                 *, sync_every: int | str = 100, sync_seconds: float | None = None, outer: str | type = "sgd", outer_lr: float = DILOCO_OUTER["lr"],
                 outer_momentum: float | None = None, nesterov: bool | None = None,
                 outer_kwargs: dict[str, Any] | None = None, batch_size: int | None = None, **sharded: Any):
        """
        Args:
            model: the module being trained (its parameters and buffers make the job).
            inner_optimizer: a torch optimizer over (some of) ``model``'s parameters; ``step()``
                runs it. Its state and LR scheduler stay on this worker.
            cluster: the coordinator's ``host:port`` (default ``SHARDPS_CLUSTER``).
            sync_every: H, inner steps between two outer steps; or "auto": each worker ends its round
                once it has spent ``sync_seconds`` in it (H from its own throughput, so in sync mode a slow
                worker takes fewer inner steps instead of keeping the others waiting; its outer gradient
                weighs less by its fewer samples). Not with ``mode="async"``, where nobody waits anyway.
            sync_seconds: with ``sync_every="auto"``: the target seconds of inner steps per round (the time
                between two ``step()`` calls counts, not the time the outer step takes).
            outer: the shards' optimizer, a name or torch class as ``ShardedOptimizer`` takes.
            outer_lr: its learning rate.
            outer_momentum, nesterov: SGD's (default 0.9 and True, DiLoCo's); only with ``outer="sgd"``.
            outer_kwargs: any other argument of the outer optimizer (weight_decay, betas, ...).
            batch_size: samples per inner step a worker nominally takes (the job's per-worker batch).
                Only async mode reads it: each outer gradient is applied weighted by the samples behind
                it / (``sync_every`` x ``batch_size``), so a round cut short moves the model less.
                Default: the first ``step``'s ``batch_size`` (1 when steps give none).
            **sharded: ``ShardedOptimizer``'s options (``mode``, ``min_workers``, ``wire_dtype``,
                ``replicas``, ``staleness``, ``job``, timeouts, ...). ``mode`` applies to outer steps.
                ``overlap`` and ``balance_every`` are per-step mechanisms and are refused.

        Construction blocks as ``ShardedOptimizer``'s does (registration, ``min_workers``) and
        loads the job's initial parameters into ``model``.
        """
        if sync_every == "auto":
            if sync_seconds is None or not sync_seconds > 0:
                raise ValueError(f"sync_every='auto' needs sync_seconds > 0 (seconds per round), got {sync_seconds!r}")
            if sharded.get("mode") == "async":
                raise ValueError("sync_every='auto' evens out waiting at sync outer steps; async outer steps "
                                 "wait for nobody: give async a number of inner steps")
        elif isinstance(sync_every, str) or int(sync_every) != sync_every or sync_every < 1:
            raise ValueError(f"sync_every is a number of inner steps >= 1 or 'auto', got {sync_every!r}")
        elif sync_seconds is not None:
            raise ValueError("sync_seconds goes with sync_every='auto'")
        for refused in ("overlap", "balance_every"):
            if sharded.get(refused):
                raise ValueError(f"{refused} works per inner step, which DiLoCo keeps on the worker; leave it off")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        kwargs = dict(outer_kwargs or {}, lr=outer_lr)
        if optim.name_of(outer) == "sgd":
            kwargs.setdefault("momentum", DILOCO_OUTER["momentum"] if outer_momentum is None else outer_momentum)
            kwargs.setdefault("nesterov", DILOCO_OUTER["nesterov"] if nesterov is None else nesterov)
        elif outer_momentum is not None or nesterov is not None:
            raise ValueError(f"outer_momentum and nesterov are SGD's; for outer={outer!r} pass its own arguments "
                             "in outer_kwargs")
        owned = {id(p) for p in model.parameters()}
        self.params = [p for g in inner_optimizer.param_groups for p in g["params"]]
        if any(id(p) not in owned for p in self.params):
            raise ValueError("the inner optimizer trains a parameter that is not model's: build it over "
                             "model.parameters()")
        self.inner, self.sync_every, self.sync_seconds = inner_optimizer, sync_every, sync_seconds
        self.outer = ShardedOptimizer(model, cluster, outer, **sharded, **kwargs)
        self.outer._moves_between_steps = True  # the inner steps move the model; that is no edit to warn about
        self._nominal = batch_size
        # "auto": inner steps before each outer step this worker took (by outer step), as a rollback needs them.
        self._base, self._history, self._rollbacks = 0, {self.outer.steps_taken: 0}, self.outer.rollbacks
        self._begin_round()

    @torch.no_grad()
    def _begin_round(self) -> None:
        """The model holds the shards' parameters: they are theta_at_last_sync."""
        self.anchor = [p.detach().clone() for p in self.params]
        self.since_sync, self.samples = 0, 0
        self._round_start = time.monotonic()

    @property
    def steps_taken(self) -> int:
        """Inner steps this worker took in the job (after a rollback, from the step it went back to):
        pick data by it, as with ``ShardedOptimizer.steps_taken``."""
        if self.sync_every == "auto":
            return self._base + self.since_sync
        return self.outer.steps_taken * self.sync_every + self.since_sync

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def step(self, closure=None, *, batch_size: int | None = None):
        """One inner step (``inner_optimizer.step``); every ``sync_every``-th (or, "auto", the first after
        ``sync_seconds`` in the round) also runs ``sync()``.
        ``batch_size``: the samples behind this step, summed over the round to weigh its outer
        gradient (default 1 per step). Blocks, raises and recovers as ``sync()`` when it syncs."""
        loss = self.inner.step(closure) if closure is not None else self.inner.step()
        if batch_size is not None and self._nominal is None:
            self._nominal = int(batch_size)
        self.since_sync += 1
        self.samples += 1 if batch_size is None else int(batch_size)
        if self.sync_every == "auto":
            if time.monotonic() - self._round_start >= self.sync_seconds:
                self.sync()
        elif self.since_sync >= self.sync_every:
            self.sync()
        return loss

    @torch.no_grad()
    def sync(self) -> None:
        """The outer step now, over the inner steps since the last one (``step`` calls it every
        ``sync_every`` steps; call it at the end of training for a last, shorter round). Blocks as
        ``ShardedOptimizer.step`` does (sync: until every worker pushed its outer gradient). If the
        job rolled back meanwhile, the round is void and the model holds the step the job went back
        to; the inner optimizer's state is kept. Does nothing when no inner step was taken."""
        if self.since_sync == 0:
            return
        weight = 1.0
        if self.outer.job.mode is UpdateMode.ASYNC:
            weight = self.samples / (self.sync_every * (self._nominal or 1))
        for p, anchor in zip(self.params, self.anchor):
            delta = anchor - p.detach()
            if weight != 1.0:
                delta.mul_(weight)
            p.grad = delta  # the outer step pushes .grad, as any ShardedOptimizer step does
        self.outer.step(batch_size=self.samples)
        self.outer.zero_grad(set_to_none=True)  # the outer gradient is no gradient of the model
        if self.outer.rollbacks != self._rollbacks:  # the round was void: go on from the step the job went back to
            self._rollbacks = self.outer.rollbacks
            self._base = max((b for s, b in self._history.items() if s <= self.outer.steps_taken), default=0)
        else:
            self._base += self.since_sync
        self._history[self.outer.steps_taken] = self._base
        self._begin_round()

    # ------------------------------------------------------------------ the outer optimizer's view of the job

    @property
    def rank(self) -> int:
        return self.outer.rank

    @property
    def world_size(self) -> int:
        return self.outer.world_size

    @property
    def versions(self) -> list[int]:
        return self.outer.versions

    def pull(self) -> list[int]:
        """Load the shards' current parameters into the model (they become theta_at_last_sync: the
        inner steps since the last sync are dropped)."""
        versions = self.outer.pull()
        self._begin_round()
        return versions

    def close(self) -> None:
        """Leave the job (without syncing: call ``sync()`` first to keep the last round)."""
        self.outer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
