"""DiLoCo in one process, as ``trainers.py``'s workers run it in DiLoCo mode (``DILOCO``: H = 4, outer SGD):
each worker's own inner optimizer, schedule and clipping on its DistributedSampler's part of every epoch,
and after every H-th optimizer step the outer step, written out in torch on the flat parameter vector
(Lightning with ``--fragments F``: streaming, one outer step per fragment, staggered by H/F steps).

Lightning's loop is written out in torch (``lightning_reference``); the HF reference runs the stock
``Trainer`` of each worker in a thread, one at a time in lockstep (each runs to its next optimizer step
and hands over), and takes the outer step in a callback once every worker took the round's steps.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from shardps.worker.fragments import split
from trainers import (BATCH, DILOCO, HF_BATCH, TRAIN, VAL, WORKERS, Digits, M_sd, Windows, decay_groups,
                      hf_arguments, mlp)

H = DILOCO["sync_every"]
TURN_TIMEOUT_S = 300.0


class Outer:
    """theta (the job's parameters) and the outer SGD over the mean of the workers' outer gradients; with
    ``fragments`` F > 1 (streaming), one theta and SGD per fragment of the inner optimizers' parameters
    (``worker.fragments.split``: each fragment a job of its own), fragment k synced after the inner
    steps t with t = k*H/F (mod H)."""

    def __init__(self, models: list[torch.nn.Module], momentum: float, fragments: int = 1,
                 params=lambda m: list(m.parameters())):
        self.parts = [split(params(m), fragments) for m in models]  # [worker][fragment] -> its parameters
        self.thetas = [torch.nn.Parameter(self.flat(part).clone()) for part in self.parts[0]]
        self.opts = [torch.optim.SGD([t], lr=DILOCO["outer_lr"], momentum=momentum, nesterov=momentum > 0)
                     for t in self.thetas]
        self.since = [0] * fragments

    @staticmethod
    def flat(params) -> torch.Tensor:
        return torch.nn.utils.parameters_to_vector(params).detach()

    def stepped(self, steps: int) -> None:
        """Every worker took inner step ``steps`` (1, 2, ...): the outer steps that are due."""
        for k in range(len(self.thetas)):
            self.since[k] += 1
            if (steps - k * H // len(self.thetas)) % H == 0:
                self.step(k)

    def close_round(self) -> None:
        """The outer step of every fragment with inner steps since its last (a checkpoint, the end)."""
        for k in range(len(self.thetas)):
            if self.since[k]:
                self.step(k)

    @torch.no_grad()
    def step(self, k: int = 0) -> None:
        theta = self.thetas[k]
        theta.grad = sum(theta.detach() - self.flat(parts[k]) for parts in self.parts) / len(self.parts)
        self.opts[k].step()
        for parts in self.parts:
            offset = 0
            for p in parts[k]:
                p.copy_(theta[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self.since[k] = 0


def lightning_reference(out: Path, epochs: int, tag: str, momentum: float, fragments: int = 1) -> None:
    """``trainers.lightning_run``'s module, optimizer (AdamW, decay groups), per-step schedule and
    gradient_clip_val=1.0 (torch's, on each worker's own gradient), Lightning's shuffling
    DistributedSampler (seed 0, set to the epoch) per worker; the checkpoint at each epoch's end
    closes the round (of every fragment)."""
    train = Digits(0, TRAIN)
    models = [mlp() for _ in range(WORKERS)]
    inners = [torch.optim.AdamW(decay_groups(m, 0.05), lr=0.02) for m in models]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1.0 + 0.2 * s)) for o in inners]
    # DiLoCo cuts the fragments over the inner optimizer's parameters, in its groups' order
    outer = Outer(models, momentum, fragments, params=lambda m: [p for g in decay_groups(m, 0.0) for p in g["params"]])
    samplers = [torch.utils.data.DistributedSampler(train, num_replicas=WORKERS, rank=r, shuffle=True)
                for r in range(WORKERS)]
    seen, norms, steps = [[] for _ in models], [[] for _ in models], 0
    for epoch in range(epochs):
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
            outer.stepped(steps)
            for s in schedules:
                s.step()
        outer.close_round()  # ModelCheckpoint saves at the epoch's end
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


def hf_reference(out: Path, epochs: int, tag: str, momentum: float) -> None:
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
    steps = [0] * WORKERS
    last = WORKERS - 1

    class Lockstep(TrainerCallback):
        def __init__(self, rank: int):
            self.rank = rank

        def on_optimizer_step(self, args, state, control, **kwargs):
            steps[self.rank] += 1
            if self.rank == last:  # every worker took this step: the round may end
                outer.stepped(steps[last])
            turns.hand_over(self.rank)
            turns.wait(self.rank)

        def on_train_end(self, args, state, control, **kwargs):
            if len(turns.done) == WORKERS - 1:  # the last one: a last, shorter round
                outer.close_round()
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
