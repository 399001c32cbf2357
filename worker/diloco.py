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

Streaming (``fragments=F``, Douillard et al. 2025, "Streaming DiLoCo"): the parameters are cut
into F contiguous fragments of about equal size, each an outer job of its own on the shards
(``<job>.f<k>``), and fragment f has its outer step after the inner steps t = f*H/F + kH, so one
fragment's bytes are on the wire every H/F steps instead of the whole model's every H. A
fragment's sync loads only its own parameters; the others go on with their round.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from ..proto import optim
from ..proto.defaults import OUTER_LR, OUTER_MOMENTUM
from ..proto.messages import DEFAULT_JOB, UpdateMode, fragment_job
from .fragments import Fragment, split
from .optimizer import ShardedOptimizer

DILOCO_OUTER = {"lr": OUTER_LR, "momentum": OUTER_MOMENTUM, "nesterov": True}  # Douillard et al. 2023


class DiLoCo:
    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, cluster: str | None = None,
                 *, sync_every: int | str = 100, sync_seconds: float | None = None, fragments: int = 1,
                 outer: str | type = "sgd", outer_lr: float = DILOCO_OUTER["lr"],
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
            fragments: F >= 1 (streaming): cut the trained parameters into F contiguous fragments of about
                equal size, each with its own outer job on the shards (named ``<job>.f<k>``), fragment f
                synced after the inner steps t with t = f*H/F (mod H); 1: the whole model every H steps.
                Needs a number ``sync_every`` >= F and at least F trained parameters.
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

        Construction blocks as ``ShardedOptimizer``'s does (registration, ``min_workers``; with
        fragments, once per fragment) and loads the job's initial parameters into ``model``.
        """
        self._check(sync_every, sync_seconds, fragments, sharded, batch_size)
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
        if fragments > len(self.params):
            raise ValueError(f"fragments={fragments} needs at least as many trained parameters; the inner "
                             f"optimizer trains {len(self.params)}")
        self.inner, self.sync_every, self.sync_seconds = inner_optimizer, sync_every, sync_seconds
        self._owned = owned
        self._nominal = batch_size
        self.fragments: list[Fragment] = []
        try:
            if fragments == 1:
                self.fragments.append(Fragment(ShardedOptimizer(model, cluster, outer, **sharded, **kwargs),
                                                self.params, 0))
            else:
                names = {id(p): n for n, p in model.named_parameters()}
                job = sharded.pop("job", DEFAULT_JOB)
                for k, part in enumerate(split(self.params, fragments)):
                    named = [(names[id(p)], p) for p in part]  # the job's names are the model's
                    opt = ShardedOptimizer(named, cluster, outer, model=model if k == 0 else None,
                                           job=fragment_job(job, k), **sharded, **kwargs)  # buffers with fragment 0
                    self.fragments.append(Fragment(opt, part, k * sync_every // fragments))
        except BaseException:
            self.close()  # the fragments that registered leave
            raise
        self.outer = self.fragments[0].outer
        # A worker joining a running (or resumed) streaming job takes up the schedule where the job is:
        # fragment 0 syncs at multiples of H, so its outer steps tell the inner steps the job took.
        # (streaming: inner steps taken; a fragment's rollback voids its round only)
        self._inner_steps = self.outer.steps_taken * sync_every if fragments > 1 else 0
        self._hook = inner_optimizer.register_step_pre_hook(lambda *_: self._adopt_added_params())

    @staticmethod
    def _check(sync_every, sync_seconds, fragments, sharded, batch_size) -> None:
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
        if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
            raise ValueError(f"fragments is a number >= 1 (1: no streaming), got {fragments!r}")
        if fragments > 1 and (sync_every == "auto" or fragments > sync_every):
            raise ValueError(f"fragments={fragments} staggers the fragments' syncs over a fixed sync_every H "
                             f">= fragments, got sync_every={sync_every!r}")
        for refused in ("overlap", "balance_every"):
            if sharded.get(refused):
                raise ValueError(f"{refused} works per inner step, which DiLoCo keeps on the worker; leave it off")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    # ------------------------------------------------------------------ the round (fragment 0's, or every one's)

    @property
    def anchor(self) -> list[torch.Tensor]:
        """theta_at_last_sync of every trained parameter (each fragment's last sync), in ``params`` order."""
        return [a for f in self.fragments for a in f.anchor]

    @property
    def since_sync(self) -> int:
        """Inner steps since the last outer step (of any fragment)."""
        return min(f.since_sync for f in self.fragments)

    @property
    def samples(self) -> int:
        """Samples behind the open round (fragment 0's)."""
        return self.fragments[0].samples

    @property
    def steps_taken(self) -> int:
        """Inner steps this worker took in the job (after a rollback, from the step it went back to):
        pick data by it, as with ``ShardedOptimizer.steps_taken``. With fragments, every inner step
        taken (a fragment's rollback voids that fragment's round and training goes on)."""
        if len(self.fragments) > 1:
            return self._inner_steps
        f = self.fragments[0]
        if self.sync_every == "auto":
            return f.base + f.since_sync
        return f.outer.steps_taken * self.sync_every + f.since_sync

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    @torch.no_grad()
    def _adopt_added_params(self) -> None:
        """Before each inner step: parameters a param group added to the inner optimizer since the last
        step (a fine-tuning callback unfreezing a backbone) join the round. The job holds every parameter
        of the model, and they were not trained since the last sync, so their values now are
        theta_at_last_sync. With fragments the split is fixed: ValueError, nothing adopted."""
        if sum(len(g["params"]) for g in self.inner.param_groups) == len(self.params):
            return
        known = {id(p) for p in self.params}
        added = [p for g in self.inner.param_groups for p in g["params"] if id(p) not in known]
        if any(id(p) not in self._owned for p in added):
            raise ValueError("a param group added to the inner optimizer trains a parameter that is not the model's")
        if len(self.fragments) > 1:
            raise ValueError(f"a param group was added to the inner optimizer; with fragments={len(self.fragments)} "
                             "the model's split is fixed: build the inner optimizer over every parameter to train")
        f = self.fragments[0]
        f.params.extend(added)  # the same list as self.params
        f.anchor.extend(p.detach().clone() for p in added)

    def step(self, closure=None, *, batch_size: int | None = None):
        """One inner step (``inner_optimizer.step``); every ``sync_every``-th (or, "auto", the first after
        ``sync_seconds`` in the round) also runs the outer step (with fragments, of the fragments due).
        ``batch_size``: the samples behind this step, summed over the round to weigh its outer
        gradient (default 1 per step). Blocks, raises and recovers as ``sync()`` when it syncs."""
        loss = self.inner.step(closure) if closure is not None else self.inner.step()
        self.stepped(batch_size=batch_size)
        return loss

    def stepped(self, *, batch_size: int | None = None) -> None:
        """The inner optimizer took one step that ``step()`` did not run (a trainer stepped it: the
        Lightning and HF integrations): count it and run the outer step when one is due, as ``step()``
        does after its inner step."""
        if batch_size is not None and self._nominal is None:
            self._nominal = int(batch_size)
        self._inner_steps += 1
        for f in self.fragments:
            f.since_sync += 1
            f.samples += 1 if batch_size is None else int(batch_size)
        if self.sync_every == "auto":
            if time.monotonic() - self.fragments[0].round_start >= self.sync_seconds:
                self.sync()
            return
        streaming = len(self.fragments) > 1
        for f in self.fragments:
            if (self._inner_steps - f.offset) % self.sync_every == 0 if streaming else f.since_sync >= self.sync_every:
                f.sync(self._weight(f))

    @torch.no_grad()
    def sync(self) -> None:
        """The outer step now, over the inner steps since the last one (``step`` calls it every
        ``sync_every`` steps; call it at the end of training for a last, shorter round; with
        fragments, of every fragment with inner steps since its last). Blocks as
        ``ShardedOptimizer.step`` does (sync: until every worker pushed its outer gradient). If the
        job rolled back meanwhile, the round is void and the model holds the step the job went back
        to; the inner optimizer's state is kept. Does nothing when no inner step was taken."""
        for f in self.fragments:
            f.sync(self._weight(f))

    def _weight(self, f: "Fragment") -> float:
        """Async outer gradients weigh by their samples over a full round's (1 in sync mode)."""
        if f.outer.job.mode is not UpdateMode.ASYNC:
            return 1.0
        return f.samples / (self.sync_every * (self._nominal or 1))

    # ------------------------------------------------------------------ the outer optimizer's view of the job

    @property
    def rank(self) -> int:
        return self.outer.rank

    @property
    def world_size(self) -> int:
        return self.outer.world_size

    @property
    def versions(self) -> list[int]:
        """Each shard's version (with fragments: fragment 0's shards, then fragment 1's, ...)."""
        return [v for f in self.fragments for v in f.outer.versions]

    def pull(self) -> list[int]:
        """Load the shards' current parameters into the model (they become theta_at_last_sync: the
        inner steps since the last sync are dropped)."""
        for f in self.fragments:
            f.outer.pull()
            f.begin()
        return self.versions

    def upload_params(self) -> None:
        """Make this worker's parameters the job's (a loaded checkpoint: every worker loads the same
        one) and begin a new round from them; the inner steps since the last sync are dropped."""
        for f in self.fragments:
            f.outer.upload_params()
            f.begin()

    def outer_state_dict(self) -> dict[str, Any]:
        """The outer optimizer's state from the shards (each fragment's, in torch.optim's format):
        what a checkpoint keeps beside the model and the inner optimizer's state."""
        return {"fragments": [f.outer.state_dict() for f in self.fragments]}

    def load_outer_state_dict(self, state: dict[str, Any]) -> None:
        """Load ``outer_state_dict()``'s result onto the shards. Every worker may load the same state
        (loading it again changes nothing); raises ValueError, loading nothing, if its fragments differ."""
        parts = state.get("fragments") if isinstance(state, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.fragments):
            raise ValueError(f"the outer state holds {len(parts) if isinstance(parts, list) else 'no'} fragments; "
                             f"this DiLoCo has {len(self.fragments)}: resume with the fragments it was saved with")
        for f, part in zip(self.fragments, parts):
            f.outer.load_state_dict(part)

    def close(self) -> None:
        """Leave the job (without syncing: call ``sync()`` first to keep the last round)."""
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
        for f in self.fragments:
            f.outer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
