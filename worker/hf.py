"""The Hugging Face Trainer on shardps: ``ShardpsTrainer`` where you had ``Trainer``.

    trainer = ShardpsTrainer(model=model, args=TrainingArguments(...), train_dataset=train)
    trainer.train()                           # shardps launch --nproc 4 train.py

It is the stock Trainer with these changes, made when ``train()`` starts (joining the job,
which waits for ``min_workers``):

* the optimizer the Trainer builds (its decay / no-decay AdamW groups, or the one passed in
  ``optimizers=(opt, scheduler)``) becomes a ShardedOptimizer with the same groups, and the
  scheduler sets its lr;
* the job's rank and world size are the Trainer's (``args.process_index``, ``args.world_size``):
  each worker trains on its DistributedSampler's part of every epoch, and only rank 0 logs,
  saves checkpoints and calls ``save_pretrained``;
* ``max_grad_norm`` clips the job's averaged gradient on the shards, as one process on the union
  batch would (not each worker's own);
* a checkpoint resumed from loads on every worker and its weights are uploaded to the shards;
* the logged training loss is the mean over the workers (through the job's collectives).

Import this module before building the TrainingArguments (it makes accelerate see one process).
Gradient accumulation works as the Trainer does it (the step pushes the accumulated gradient).
Workers average their gradients with equal weights (as DDP does): give them equal batches.
Evaluation is not split: every worker evaluates the whole eval set (the same model gives the
same result).

DiLoCo mode (``sharded_kwargs={"mode": "diloco", "sync_every": 20, "outer_lr": 0.7}``, or
``"diloco-async"``): the optimizer the Trainer builds (or is given) stays on the worker as DiLoCo's
inner optimizer, driven by its scheduler as usual, and every ``sync_every``-th optimizer step also
runs the outer step on the shards (``worker.diloco``). ``max_grad_norm`` clips this worker's own
gradient (the Trainer's own clipping: inner steps are local). A checkpoint closes the round first
(the outer step over the steps so far), so it holds the job's model; beside rank 0's inner
optimizer state (``optimizer.pt``) it holds the shards' outer state (``outer_optimizer.pt``) and
every other worker's own inner state (``inner_optimizer_rank<r>.pt``, ``worker/inner_state.py``):
each worker resumes with its own. ``train()`` ends with a last outer step over the steps left.
Between two outer steps each worker holds its own model: evaluate at multiples of ``sync_every``.
"""
from __future__ import annotations

import atexit
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .convert import for_trainer, is_diloco, rebind_scheduler
from .diloco import DiLoCo
from .inner_state import inner_state_path, load_inner_state, save_inner_state
from .optimizer import ShardedOptimizer

OUTER_NAME = "outer_optimizer.pt"  # a DiLoCo checkpoint's outer state (the shards'), beside optimizer.pt


def _not_torchrun() -> None:
    """``shardps launch`` sets LOCAL_RANK (to pick a GPU), and accelerate (whose state TrainingArguments
    builds) reads LOCAL_RANK as "torchrun started me" and opens a torch.distributed group nobody else
    joins. A shardps worker is one process of its own: drop it and pin this process's GPU instead."""
    local = os.environ.get("SHARDPS_LOCAL_RANK")
    if local is None or os.environ.get("LOCAL_RANK") != local or "MASTER_ADDR" in os.environ:
        return
    del os.environ["LOCAL_RANK"]
    if torch.cuda.is_available():
        torch.cuda.set_device(int(local) % torch.cuda.device_count())


_not_torchrun()  # before the script builds its TrainingArguments (they read the environment once)


class ShardpsTrainer(Trainer):
    def __init__(self, *args, cluster: str | None = None, job: str = "default",
                 sharded_kwargs: dict[str, Any] | None = None, **kwargs):
        """``cluster``: the coordinator (default ``SHARDPS_CLUSTER``, which ``shardps launch`` sets);
        ``sharded_kwargs``: ShardedOptimizer's options (mode, min_workers, wire_dtype, step_timeout, ...);
        with ``"mode": "diloco"`` (or ``"diloco-async"``) also DiLoCo's (``sync_every``, ``outer_lr``, ...).
        Everything else is the Trainer's."""
        super().__init__(*args, **kwargs)
        self.shardps_options = dict(cluster=cluster, job=job, **(sharded_kwargs or {}))
        self.sharded: ShardedOptimizer | None = None  # the job (in DiLoCo mode: the outer steps')
        self.diloco: DiLoCo | None = None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        stock = self.accelerator.prepare_optimizer

        def prepare_optimizer(optimizer, device_placement=None):
            # accelerate "places" an optimizer by reading its state_dict and loading it back. A
            # ShardedOptimizer's state is on the shards, where no device move applies, and the
            # round trip races the other workers: one that reads while another loads a resumed
            # checkpoint sees half of it, and one that writes back later undoes the load.
            if isinstance(optimizer, ShardedOptimizer):
                device_placement = False
            return stock(optimizer, device_placement=device_placement)

        self.accelerator.prepare_optimizer = prepare_optimizer

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.sharded is None:
            torch_opt = super().create_optimizer(model)
            job = for_trainer(torch_opt, self.model, **self.shardps_options)
            if is_diloco(self.shardps_options):  # the Trainer's optimizer and scheduler stay: the inner ones
                self.diloco, self.sharded = job, job.outer
                self.add_callback(_OuterSteps(job))
            else:
                self.sharded = self.optimizer = job
                if self.lr_scheduler is not None:  # passed in optimizers=(opt, scheduler), built on the stock one
                    rebind_scheduler(self.lr_scheduler, self.sharded)
            state = self.args.distributed_state
            self.args.distributed_state = JobState(state.inner if isinstance(state, JobState) else state, self.sharded)
            atexit.register(self.close)
        return self.optimizer

    def train(self, *args, **kwargs):
        self.create_optimizer()  # the rank picks the data, before the Trainer builds its DataLoader
        out = super().train(*args, **kwargs)
        if self.diloco is not None:  # a last, shorter round: every worker ends with the job's model
            self.diloco.sync()
        return out

    def _clip_grad_norm(self, model):
        if self.diloco is not None:  # an inner step is this worker's own: so is its gradient's norm
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # under fp16 the shards must see the true gradient
        return self.sharded.clip_grad_norm_(self.args.max_grad_norm)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.sharded is None or dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        # The Trainer shuffles (RandomSampler); this worker takes its part of each epoch's permutation.
        return torch.utils.data.DistributedSampler(dataset, num_replicas=self.args.world_size,
                                                   rank=self.args.process_index, shuffle=True, seed=self.args.seed)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # The Trainer logs its own process's training loss where DDP's all-gather would give the mean
        # over processes; every worker logs at the same steps, so the job's mean is one all-reduce.
        if self.sharded is not None:
            for key in ("loss", "train_loss"):
                if isinstance(logs.get(key), (int, float)):
                    logs[key] = float(self.sharded.collectives.all_reduce(float(logs[key]), name=f"hf.{key}"))
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.sharded is not None:  # every worker loaded the same weights: they become the job's
            (self.diloco or self.sharded).upload_params()

    def _save_checkpoint(self, model, trial) -> None:
        # Every worker saves (rank 0 writes): the round closes first, so the checkpoint holds the job's
        # model, not rank 0's own inner steps since the last outer step.
        if self.diloco is not None:
            self.diloco.sync()
        super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)  # optimizer.pt: the inner optimizer's, rank 0's
        if self.diloco is None:
            return
        if self.args.should_save:
            torch.save(self.diloco.outer_state_dict(), os.path.join(output_dir, OUTER_NAME))
        # Every other worker's own inner state goes into the folder rank 0 writes (which a resume names).
        shared = self.sharded.collectives.broadcast(output_dir, 0, name="hf.checkpoint_dir")
        if not self.args.should_save:
            save_inner_state(self.optimizer.state_dict(), inner_state_path(shared, self.args.process_index, True))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        outer = os.path.join(checkpoint, OUTER_NAME) if checkpoint else None
        if outer is not None and (self.diloco is not None) != os.path.isfile(outer):
            raise ValueError(f"{checkpoint} was saved {'without' if self.diloco else 'in'} DiLoCo mode and its "
                             "optimizer.pt is another optimizer's state: resume with the mode it was saved with, or "
                             "start from its weights (from_pretrained) without resume_from_checkpoint")
        super()._load_optimizer_and_scheduler(checkpoint)  # the inner optimizer: rank 0's state, on every worker
        if outer is not None and self.diloco is not None:
            self.diloco.load_outer_state_dict(torch.load(outer, weights_only=True))
            rank = self.args.process_index
            own = load_inner_state(inner_state_path(checkpoint, rank, True), rank) if rank else None
            if own is not None:  # this worker's own inner state, as it was at the checkpoint
                self.optimizer.load_state_dict(own)

    def close(self) -> None:
        """Leave the job (also at exit; in DiLoCo mode with fragments, every fragment's job)."""
        if self.sharded is not None:
            (self.diloco or self.sharded).close()


class _OuterSteps(TrainerCallback):
    """After each optimizer step of the Trainer (DiLoCo's inner step): the outer step when one is due."""

    def __init__(self, diloco: DiLoCo):
        self.diloco = diloco

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.diloco.stepped()


class JobState:
    """``args.distributed_state`` for a shardps worker: the job's rank and size, and a barrier through
    the job's collectives; everything else is accelerate's own (one process, no torch.distributed)."""

    def __init__(self, inner, opt: ShardedOptimizer):
        self.inner, self.opt = inner, opt

    @property
    def num_processes(self) -> int:
        return self.opt.world_size

    @property
    def process_index(self) -> int:
        return self.opt.rank

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("SHARDPS_LOCAL_RANK", "0"))

    @property
    def is_main_process(self) -> bool:
        return self.opt.rank == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    def wait_for_everyone(self) -> None:
        self.opt.collectives.barrier(name="hf.wait_for_everyone")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __reduce__(self):  # TrainingArguments are saved with checkpoints: save accelerate's state, not the job
        return _unwrap, (self.inner,)


def _unwrap(inner):
    return inner
