"""Lightning on shardps: ``Trainer(strategy=ShardpsStrategy())`` under ``shardps launch``.

    trainer = L.Trainer(strategy=ShardpsStrategy(), max_epochs=3, gradient_clip_val=1.0)
    trainer.fit(model, train_loader)          # shardps launch --nproc 4 train.py

What ``configure_optimizers`` returns (a torch optimizer with its param groups, and its
schedulers) becomes ShardedOptimizers, one job per optimizer (``job``, ``job-1``, ...), and
the schedulers set their lr. The job's rank and world size are Lightning's, so its
DistributedSampler gives every worker its own part of each epoch. ``gradient_clip_val``
clips the job's averaged gradient by its norm on the shards (``ShardedOptimizer.clip_grad_norm_``),
as one process on the union batch would; ``self.log(..., sync_dist=True)``, barriers and
broadcasts go through the job's collectives (``worker.collectives``); only rank 0 writes
checkpoints and logs. A loaded checkpoint's weights are uploaded to the shards.

The optimizers are built (and the job joined, which waits for ``min_workers``) when the
Trainer sets up its environment, before the ``setup`` hooks: Lightning needs the rank that
early (who logs, the checkpoint directory rank 0 broadcasts). So the model's layers must
exist by then: build them in ``__init__``, not in ``configure_model``. Training data must
come in a DataLoader Lightning can give a DistributedSampler (``use_distributed_sampler``).
Fine-tuning callbacks (``BackboneFinetuning``, any ``BaseFinetuning``) freeze before the
optimizers are built, as Lightning promises, and the group they add at an epoch's start is
added to the job on every worker (``ShardedOptimizer.add_param_group``).

DiLoCo mode (``ShardpsStrategy(mode="diloco", sync_every=20, outer_lr=0.7)``, or
``"diloco-async"``): the optimizer ``configure_optimizers`` returns stays on the worker as DiLoCo's
inner optimizer (its state and schedulers are as without shardps), and every ``sync_every``-th
optimizer step also runs the outer step on the shards (``worker.diloco``). Gradient clipping is
torch's own, on this worker's gradient (its inner steps are its own). A checkpoint closes the
round first (the outer step over the inner steps so far), so it holds the job's model; it also
holds the shards' outer state (``"shardps_diloco"``) and rank 0's inner optimizer state, and every
other worker writes its own beside it (``<ckpt>.rank<r>.inner.pt``, ``worker/inner_state.py``):
each worker resumes with its own. Fit ends with a last outer step over the steps left.
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.core.optimizer import LightningOptimizer, _init_optimizers_and_lr_schedulers
from lightning.pytorch.strategies import ParallelStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden

from .collectives import Collectives
from .convert import for_trainer, is_diloco, rebind_scheduler
from .diloco import DiLoCo
from .inner_state import inner_state_path, load_inner_state, save_inner_state
from .optimizer import ShardedOptimizer

DILOCO_KEY = "shardps_diloco"  # a DiLoCo checkpoint's outer state (the shards' optimizer), beside Lightning's keys

REDUCE_OPS = {"sum": "sum", "mean": "mean", "avg": "mean", "max": "max", "min": "min"}


class ShardpsStrategy(ParallelStrategy):
    strategy_name = "shardps"

    def __init__(self, cluster: str | None = None, *, job: str = "default", accelerator=None, checkpoint_io=None,
                 precision_plugin=None, **sharded_kwargs: Any):
        """``cluster``: the coordinator (default ``SHARDPS_CLUSTER``, which ``shardps launch`` sets);
        ``job``: the first optimizer's job name; ``sharded_kwargs``: ShardedOptimizer's options (mode,
        min_workers, wire_dtype, step_timeout, ...) for every optimizer. ``mode="diloco"`` (outer steps
        sync) or ``"diloco-async"``: DiLoCo, with its options (``sync_every``, ``outer_lr``,
        ``outer_momentum``, ``fragments``, ...) beside ShardedOptimizer's."""
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        self.cluster, self.job, self.sharded_kwargs = cluster, job, sharded_kwargs
        self.sharded: list[ShardedOptimizer] = []  # the jobs (in DiLoCo mode: the outer steps')
        self.diloco: list[DiLoCo] = []

    # ------------------------------------------------------------------ who is who

    @property
    def is_distributed(self) -> bool:  # Lightning gives DataLoaders a DistributedSampler
        return True

    @property
    def root_device(self) -> torch.device:
        devices = self.parallel_devices or [torch.device("cpu")]
        return devices[self.local_rank % len(devices)]

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("SHARDPS_LOCAL_RANK", "0"))  # the process index on this host (shardps launch)

    @property
    def node_rank(self) -> int:
        return 0

    @property
    def global_rank(self) -> int:
        return self.sharded[0].rank if self.sharded else 0

    @property
    def world_size(self) -> int:
        if self.sharded:
            return self.sharded[0].world_size
        return int(self.sharded_kwargs.get("min_workers") or os.environ.get("SHARDPS_MIN_WORKERS", "1"))

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @property
    def collectives(self) -> Collectives:
        if not self.sharded:
            raise RuntimeError("the shardps job is joined when the Trainer sets up (fit, validate, test, predict); "
                               "collectives exist from then on")
        return self.sharded[0].collectives

    # ------------------------------------------------------------------ optimizers

    def setup_environment(self) -> None:
        super().setup_environment()
        if not self.sharded:
            self._join()
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank  # who logs and prints

    def _join(self) -> None:
        module = self.lightning_module
        if is_overridden("configure_model", module):
            raise RuntimeError("ShardpsStrategy joins the job (and needs every parameter) before configure_model "
                               "runs: build the model's layers in __init__")
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        trainer = module._trainer
        # Lightning calls a fine-tuning callback's freeze_before_training before configure_optimizers (in its
        # setup hook); the job is defined earlier than that here, so it is called first (freezing twice is
        # harmless): a backbone it freezes stays out of the optimizer until the callback adds its group.
        for callback in getattr(trainer, "callbacks", None) or ():
            if isinstance(callback, BaseFinetuning):
                callback.freeze_before_training(module)
        optimizers, schedulers = _init_optimizers_and_lr_schedulers(module)
        if not optimizers:
            raise RuntimeError("configure_optimizers returned no optimizer: a shardps job trains with one")
        if is_diloco(self.sharded_kwargs) and len(optimizers) > 1:
            raise RuntimeError(f"configure_optimizers returned {len(optimizers)} optimizers; DiLoCo mode syncs the "
                               "whole model after one inner optimizer's steps: return one (or use mode='sync')")
        cluster = self.cluster or os.environ.get("SHARDPS_CLUSTER")
        jobs = []
        try:
            for i, opt in enumerate(optimizers):
                job = self.job if i == 0 else f"{self.job}-{i}"
                jobs.append(for_trainer(opt, module, cluster=cluster, job=job, **self.sharded_kwargs))
        except BaseException:
            for opt in jobs:
                opt.close()
            raise
        if is_diloco(self.sharded_kwargs):  # the user's optimizers and schedulers stay: they are the inner ones
            self.diloco, self.sharded, self.optimizers = jobs, [d.outer for d in jobs], optimizers
        else:
            for config in schedulers:
                rebind_scheduler(config.scheduler, jobs[optimizers.index(config.scheduler.optimizer)])
            self.sharded, self.optimizers = jobs, jobs
        self.lr_scheduler_configs = schedulers
        atexit.register(self.close)
        if trainer is not None and getattr(trainer.fit_loop, "_combined_loader", None) is not None:
            trainer.fit_loop._combined_loader = None  # set up by configure_optimizers before the rank was known

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def setup_optimizers(self, trainer) -> None:
        """Built when the environment was set up (``_join``): they hold the job's shards."""

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if self.diloco:  # inner steps are this worker's own: torch's clipping of its own gradient is exact
            return
        plugin = self.precision_plugin
        plugin.clip_grad_by_norm = _clip_by_norm  # the job's averaged gradient, on the shards
        plugin.clip_grad_by_value = _refuse_value_clipping

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        for opt in self.diloco or self.sharded:  # every worker loads the same checkpoint: the job takes its weights
            opt.upload_params()

    def close(self) -> None:
        """Leave the job (at exit, or when you are done with the Trainer)."""
        for opt in self.diloco or self.sharded:
            opt.close()

    # ------------------------------------------------------------------ DiLoCo mode

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        out = super().optimizer_step(optimizer, closure, model, **kwargs)  # the inner step, clipping and all
        for d in self.diloco:
            d.stepped()  # every sync_every-th: the outer step
        return out

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Lightning dumps a checkpoint on every rank, the model first: the round closes here, so the
        # checkpoint holds the job's model (every worker's), not rank 0's own inner steps since the last sync.
        for d in self.diloco:
            d.sync()
        return super().lightning_module_state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self.diloco and self.is_global_zero:
            checkpoint[DILOCO_KEY] = {"outer": [d.outer_state_dict() for d in self.diloco]}
        elif self.diloco:  # every worker keeps its own inner state: beside rank 0's file (all ranks get its path)
            save_inner_state({"optimizer_states": checkpoint["optimizer_states"]},
                             inner_state_path(filepath, self.global_rank))
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)  # rank 0's file
        if self.diloco and not self.is_global_zero:
            inner_state_path(filepath, self.global_rank).unlink(missing_ok=True)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.diloco and self.global_rank != 0 and DILOCO_KEY in checkpoint:
            own = load_inner_state(inner_state_path(checkpoint_path, self.global_rank), self.global_rank)
            if own is not None:  # this worker's own inner optimizer state, as it was at the checkpoint
                checkpoint["optimizer_states"] = own["optimizer_states"]
        return checkpoint

    def load_optimizer_state_dict(self, checkpoint) -> None:
        saved = checkpoint.get(DILOCO_KEY)
        if bool(self.diloco) != (saved is not None):
            raise ValueError(f"the checkpoint was saved {'without' if self.diloco else 'in'} DiLoCo mode and its "
                             "optimizer state is another optimizer's: resume with the mode it was saved with, or "
                             "load only its weights (Model.load_from_checkpoint(path)) and fit without ckpt_path")
        super().load_optimizer_state_dict(checkpoint)  # the inner optimizers: this worker's own (load_checkpoint)
        for d, outer in zip(self.diloco, saved["outer"] if self.diloco else ()):
            d.load_outer_state_dict(outer)

    def on_train_end(self) -> None:
        for d in self.diloco:  # a last, shorter round: every worker ends with the job's model
            d.sync()
        super().on_train_end()

    def teardown(self) -> None:
        # The job stays joined: trainer.validate/test after fit go on with it (close() leaves it).
        Strategy.teardown(self)

    # ------------------------------------------------------------------ collectives

    def reduce(self, tensor, group: Any | None = None, reduce_op: Any = "mean"):
        if not isinstance(tensor, torch.Tensor):
            return tensor
        op = REDUCE_OPS.get(str(getattr(reduce_op, "name", reduce_op) or "mean").lower().removeprefix("reduceop."))
        if op is None:
            raise ValueError(f"reduce_op {reduce_op!r} is not one of {sorted(REDUCE_OPS)}")
        return self.collectives.all_reduce(tensor, op=op, name="lightning.reduce")

    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        if sync_grads:
            raise ValueError("all_gather(sync_grads=True) needs autograd across workers; shardps gathers values")
        parts = self.collectives.all_gather(tensor, name="lightning.all_gather")
        return torch.stack(parts).to(tensor.device)

    def barrier(self, name: str | None = None) -> None:
        if self.sharded:  # before the job is joined, joining it is the barrier (it waits for min_workers)
            self.collectives.barrier(name="lightning.barrier")

    def broadcast(self, obj, src: int = 0):
        if not self.sharded:
            return obj
        if isinstance(obj, Path):
            return type(obj)(self.collectives.broadcast(str(obj), src, name="lightning.broadcast"))
        return self.collectives.broadcast(obj, src, name="lightning.broadcast")


def _unwrap(optimizer):
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _clip_by_norm(optimizer, clip_val) -> None:
    opt = _unwrap(optimizer)
    if not isinstance(opt, ShardedOptimizer):
        raise TypeError(f"ShardpsStrategy clips ShardedOptimizers; got {type(opt).__name__}")
    opt.clip_grad_norm_(float(clip_val))


def _refuse_value_clipping(optimizer, clip_val) -> None:
    raise ValueError("gradient_clip_algorithm='value' would clamp each worker's own gradient, not the job's "
                     "averaged one (which is what the shards step with): use gradient_clip_algorithm='norm'")
