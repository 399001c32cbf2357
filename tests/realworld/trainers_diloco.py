"""DiLoCo in one process, as ``trainers.py``'s workers run it in DiLoCo mode (``DILOCO``: H = 4, outer SGD):
each worker's own inner optimizer, schedule and clipping on its DistributedSampler's part of every epoch,
and after every H-th optimizer step the outer step, written out in torch on the flat parameter vector.

Lightning's loop is written out in torch (``lightning_reference``); the HF reference runs the stock
``Trainer`` of each worker in a thread, one at a time in lockstep (each runs to its next optimizer step
and hands over), and takes the outer step in a callback once every worker took the round's steps.
``inner_from_rank0``: where a resumed run starts (epoch, Lightning; optimizer step, HF), every worker
takes rank 0's inner optimizer state, as resuming from rank 0's checkpoint makes them.
"""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from trainers import (BATCH, DILOCO, HF_BATCH, TRAIN, VAL, WORKERS, Digits, M_sd, Windows, decay_groups,
                      hf_arguments, mlp)

H = DILOCO["sync_every"]
TURN_TIMEOUT_S = 300.0


class Outer:
    """theta (the job's parameters) and the outer SGD over the mean of the workers' outer gradients."""

    def __init__(self, models: list[torch.nn.Module], momentum: float):
        self.models = models
        self.theta = torch.nn.Parameter(self.flat(models[0]).clone())
        self.opt = torch.optim.SGD([self.theta], lr=DILOCO["outer_lr"], momentum=momentum, nesterov=momentum > 0)

    @staticmethod
    def flat(model) -> torch.Tensor:
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    @torch.no_grad()
    def step(self) -> None:
        self.theta.grad = sum(self.theta.detach() - self.flat(m) for m in self.models) / len(self.models)
        self.opt.step()
        for m in self.models:
            offset = 0
            for p in m.parameters():
                p.copy_(self.theta[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


def take_rank0_state(inners: list[torch.optim.Optimizer]) -> None:
    for inner in inners[1:]:
        inner.load_state_dict(copy.deepcopy(inners[0].state_dict()))


def lightning_reference(out: Path, epochs: int, tag: str, inner_from_rank0: int | None, momentum: float) -> None:
    """``trainers.lightning_run``'s module, optimizer (AdamW, decay groups), per-step schedule and
    gradient_clip_val=1.0 (torch's, on each worker's own gradient), Lightning's shuffling
    DistributedSampler (seed 0, set to the epoch) per worker."""
    train = Digits(0, TRAIN)
    models = [mlp() for _ in range(WORKERS)]
    inners = [torch.optim.AdamW(decay_groups(m, 0.05), lr=0.02) for m in models]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1.0 + 0.2 * s)) for o in inners]
    outer = Outer(models, momentum)
    samplers = [torch.utils.data.DistributedSampler(train, num_replicas=WORKERS, rank=r, shuffle=True)
                for r in range(WORKERS)]
    seen, norms, steps = [[] for _ in models], [[] for _ in models], 0
    for epoch in range(epochs):
        if epoch == inner_from_rank0:
            take_rank0_state(inners)
        losses = []
        for s in samplers:
            s.set_epoch(epoch)
        loaders = [torch.utils.data.DataLoader(train, batch_size=BATCH, sampler=s) for s in samplers]
        for batches in zip(*loaders):
            for r, (x, y, ids) in enumerate(batches):
                seen[r] += ids.tolist()
                inners[r].zero_grad()
                loss = F.cross_entropy(models[r](x), y)
                loss.backward()
                norms[r].append(float(torch.nn.utils.clip_grad_norm_(models[r].parameters(), 1.0)))
                inners[r].step()
                losses.append(float(loss.detach()))
            steps += 1
            if steps % H == 0:
                outer.step()
            for s in schedules:
                s.step()
    if steps % H:
        outer.step()
    held_out = Digits(TRAIN, TRAIN + VAL)
    with torch.no_grad():
        val = float(F.cross_entropy(models[0](held_out.x), held_out.y))
    torch.save({"model": M_sd(models[0]), "seen": seen, "norms": norms,
                "metrics": {"train_loss": sum(losses) / len(losses), "val_loss": val}},
               out / f"lightning{tag}-ref.pt")


class Turns:
    """One thread runs at a time: rank r waits for its turn and hands it to the next rank still training."""

    def __init__(self, n: int):
        self.cond, self.turn, self.done = threading.Condition(), 0, set()
        self.n = n

    def wait(self, rank: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.turn == rank, timeout=TURN_TIMEOUT_S):
                raise TimeoutError(f"rank {rank} waited {TURN_TIMEOUT_S} s for its turn")

    def hand_over(self, rank: int, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(rank)
            for k in range(1, self.n + 1):
                if (rank + k) % self.n not in self.done:
                    self.turn = (rank + k) % self.n
                    break
            self.cond.notify_all()


def hf_reference(out: Path, epochs: int, tag: str, inner_from_rank0: int | None, momentum: float) -> None:
    """``trainers.hf_run``'s GPT-2, TrainingArguments and data, one stock Trainer per worker on its
    DistributedSampler's part (the seed HF's sampler takes); the Trainers' own AdamW, schedule,
    accumulation and clipping are the inner side."""
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback

    from scenarios import hf_config

    models = []
    for _ in range(WORKERS):
        torch.manual_seed(9)
        models.append(GPT2LMHeadModel(hf_config()))
    outer, turns = Outer(models, momentum), Turns(WORKERS)
    seen: list[list[int]] = [[] for _ in models]
    inners: list = [None] * WORKERS
    steps = [0] * WORKERS
    last = WORKERS - 1

    class Lockstep(TrainerCallback):
        def __init__(self, rank: int):
            self.rank = rank

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            inners[self.rank] = optimizer.optimizer  # accelerate's wrapper around the Trainer's AdamW
            steps[self.rank] += 1
            if self.rank == last:  # every worker took this step: the round may end
                if steps[last] % H == 0:
                    outer.step()
                if steps[last] == inner_from_rank0:
                    take_rank0_state(inners)
            turns.hand_over(self.rank)
            turns.wait(self.rank)

        def on_train_end(self, args, state, control, **kwargs):
            if len(turns.done) == WORKERS - 1 and steps[self.rank] % H:  # the last one: a last, shorter round
                outer.step()
            turns.hand_over(self.rank, finished=True)

    def collate_for(rank):
        def collate(rows):
            seen[rank].extend(r["idx"] for r in rows)
            return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}
        return collate

    def sampler_for(rank):
        class Worker(Trainer):
            def _get_train_sampler(self, train_dataset=None):
                return torch.utils.data.DistributedSampler(self.train_dataset, num_replicas=WORKERS, rank=rank,
                                                           shuffle=True, seed=self.args.seed)
        return Worker

    trainers = []
    for r, model in enumerate(models):
        args = hf_arguments(out / f"hf{tag}-ref-root-{r}", epochs, HF_BATCH)
        args.save_strategy = "no"
        trainers.append(sampler_for(r)(model=model, args=args, train_dataset=Windows(), data_collator=collate_for(r),
                                       callbacks=[Lockstep(r)]))
    errors: list[BaseException] = []

    def run(trainer):
        try:
            turns.wait(trainers.index(trainer))  # from its setup on: accelerate's state is one per process
            trainer.train()
        except BaseException as exc:  # noqa: BLE001 - reported below; the other thread must not wait forever
            errors.append(exc)
            turns.hand_over(trainers.index(trainer), finished=True)

    threads = [threading.Thread(target=run, args=(t,)) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TURN_TIMEOUT_S * 2)
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"a reference worker failed: {errors!r}")
    logs = [[e for e in t.state.log_history if "loss" in e] for t in trainers]
    losses = [[(e["step"], sum(w[i]["loss"] for w in logs) / WORKERS, e["grad_norm"], e["learning_rate"])
               for i, e in enumerate(mine)] for mine in logs]
    torch.save({"model": M_sd(models[0]), "seen": seen, "losses": losses}, out / f"hf{tag}-ref.pt")
