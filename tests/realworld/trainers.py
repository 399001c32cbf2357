"""Lightning and HF Trainer runs as their users write them, for ``test_trainers.py``.

    shardps launch --nproc 2 trainers.py lightning OUT     # each worker: OUT/lightning-rank<r>.pt
    python trainers.py lightning OUT --reference           # one process on the union batch: OUT/lightning-ref.pt
    shardps launch --nproc 2 trainers.py hf OUT --diloco   # DiLoCo mode (H = 4, outer SGD lr 1): OUT/hf-rank<r>.pt
    python trainers.py hf OUT --diloco --reference         # the same DiLoCo in one process (``trainers_diloco.py``)

A worker trains on its DistributedSampler's part of every epoch with ``BATCH`` rows a step;
the reference trains on ``2 * BATCH`` rows a step in one process, in the order the two
samplers' union takes, so each of its steps sees the union of the workers' steps. Each run records its weights, the sample ids its
training steps saw, what it logged, and where it wrote files (``root-<launch index>``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models as M  # noqa: E402

TRAIN, VAL = 256, 64  # digits rows: the first TRAIN train, the next VAL validate
BATCH = 16  # rows per worker step (the reference takes WORKERS * BATCH)
WORKERS = 2
DILOCO = dict(mode="diloco", sync_every=4, outer_lr=1.0, outer_momentum=0.0, nesterov=False)  # outer: SGD(lr=1)


def diloco_options(outer_momentum: float, mode: str = "diloco", fragments: int = 1) -> dict:
    """``DILOCO``, with Nesterov momentum on the shards' outer SGD when ``outer_momentum`` > 0, outer steps
    sync or async (``mode``), and the model in ``fragments`` streaming fragments."""
    return dict(DILOCO, outer_momentum=outer_momentum, nesterov=outer_momentum > 0, mode=mode, fragments=fragments)


class Digits(torch.utils.data.Dataset):
    def __init__(self, start: int, stop: int):
        x, y = M._digits()
        self.x, self.y, self.start = x[start:stop], y[start:stop], start

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.start + i


def mlp():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 10))


def decay_groups(model, weight_decay: float):
    """HF's and nanoGPT's split: weight matrices decay, biases and norms do not."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    plain = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


# ------------------------------------------------------------------ Lightning


def lightning_run(out: Path, reference: bool, epochs: int, resume: str, tag: str, finetune: bool = False,
                  diloco: dict | None = None) -> None:
    """``finetune``: ``BackboneFinetuning`` freezes the first layer and its norm before the optimizer is
    built over what trains, and adds them as a param group of their own when epoch 1 starts."""
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.backbone = self.net[0:2]  # what BackboneFinetuning freezes (the same modules as net's)
            self.seen: list[int] = []
            self.norms: list[float] = []  # of the gradient before clipping (this process's own)
            self.start: dict = {}  # the weights training starts from (a resumed checkpoint's)

        def on_train_start(self):
            self.start = M_sd(self.net)

        def training_step(self, batch, _):
            x, y, ids = batch
            self.seen += ids.tolist()
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
            return loss

        def on_before_optimizer_step(self, optimizer):
            self.norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()
                                                                             if p.grad is not None])))

        def validation_step(self, batch, _):
            x, y, _ = batch
            self.log("val_loss", F.cross_entropy(self.net(x), y), sync_dist=True)

        def configure_optimizers(self):
            if finetune:  # what BackboneFinetuning's users write: only what trains now
                opt = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=0.02)
                return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.8)}
            opt = torch.optim.AdamW(decay_groups(self.net, 0.05), lr=0.02)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.2 * s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    index = "ref" if reference else os.environ["SHARDPS_LOCAL_RANK"]
    root = out / f"root{tag}-{index}"
    batch = BATCH * WORKERS if reference else BATCH
    train = Digits(0, TRAIN)
    # Lightning gives each worker a shuffling DistributedSampler (seed 0, reseeded every epoch); with the
    # whole permutation in one process, each reference step takes the union of the workers' steps.
    sampler = torch.utils.data.DistributedSampler(train, num_replicas=1, rank=0, shuffle=True) if reference else None
    loader = torch.utils.data.DataLoader(train, batch_size=batch, sampler=sampler)
    val = torch.utils.data.DataLoader(Digits(TRAIN, TRAIN + VAL), batch_size=batch)
    kwargs = dict(max_epochs=epochs, gradient_clip_val=1.0, logger=L.pytorch.loggers.CSVLogger(root),
                  default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu", devices=1)
    if finetune:
        kwargs["callbacks"] = [L.pytorch.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1,
                                                                      backbone_initial_ratio_lr=0.1)]
    if not reference:
        from shardps.worker.lightning import ShardpsStrategy

        kwargs["strategy"] = ShardpsStrategy(job=f"lightning{tag}", step_timeout=120, **(diloco or {}))
    trainer = L.Trainer(**kwargs)
    model = Classifier()
    trainer.fit(model, loader, val, ckpt_path=resume or None)
    rank = trainer.global_rank
    torch.save({"rank": rank, "world_size": trainer.world_size, "model": M_sd(model.net), "seen": model.seen,
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}, "norms": model.norms,
                "root": str(root), "index": index, "start": model.start,
                "outer_steps": [d.outer.steps_taken for d in getattr(trainer.strategy, "diloco", ())],
                "fragment_steps": [[f.outer.steps_taken for f in d.fragments]
                                   for d in getattr(trainer.strategy, "diloco", ())]},
               out / f"lightning{tag}-{'ref' if reference else f'rank{rank}'}.pt")


# ------------------------------------------------------------------ Hugging Face Trainer

HF_WINDOWS, HF_BATCH, HF_ACCUMULATE = 64, 4, 2  # text windows; rows per worker micro-batch; micro-batches a step


class Windows(torch.utils.data.Dataset):
    """Fixed windows of the project's text (the Python standard library's sources, as charlm trains on)."""

    def __len__(self):
        return HF_WINDOWS

    def __getitem__(self, i):
        x = M._text()[i * M.CONTEXT:(i + 1) * M.CONTEXT]
        return {"input_ids": x, "labels": x, "idx": i}


def hf_arguments(root: Path, epochs: int, batch: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(root), num_train_epochs=epochs, learning_rate=5e-3, weight_decay=0.01, adam_epsilon=1e-6,
        lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=1.0,  # the defaults' clipping, at 1.0
        per_device_train_batch_size=batch, gradient_accumulation_steps=HF_ACCUMULATE, logging_steps=1,
        save_strategy="steps", save_steps=4, report_to="none", use_cpu=True, remove_unused_columns=False, seed=5,
        disable_tqdm=True, dataloader_num_workers=0)


def hf_run(out: Path, reference: bool, epochs: int, resume: str, tag: str, diloco: dict | None = None) -> None:
    if not reference:
        from shardps.worker.hf import ShardpsTrainer  # first: the TrainingArguments below see one process
    from transformers import GPT2LMHeadModel, Trainer

    from scenarios import hf_config

    index = "ref" if reference else os.environ["SHARDPS_LOCAL_RANK"]
    root = out / f"hf{tag}-root-{index}"
    seen: list[int] = []
    saves: list[str] = []
    loads: list[int] = []  # ShardedOptimizer.load_state_dict calls: the state entries each one loaded

    def collate(rows):
        seen.extend(r["idx"] for r in rows)
        return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}

    torch.manual_seed(9)
    model = GPT2LMHeadModel(hf_config())
    plain_save = model.save_pretrained
    model.save_pretrained = lambda path, *a, **k: (saves.append(str(path)), plain_save(path, *a, **k))[1]
    args = hf_arguments(root, epochs, HF_BATCH * (WORKERS if reference else 1))
    if reference:
        class OneProcess(Trainer):
            def _get_train_sampler(self, train_dataset=None):  # the permutation the workers' samplers split
                return torch.utils.data.DistributedSampler(self.train_dataset, num_replicas=1, rank=0, shuffle=True,
                                                           seed=self.args.seed)

        trainer = OneProcess(model=model, args=args, train_dataset=Windows(), data_collator=collate)
    else:
        from shardps.worker.optimizer import ShardedOptimizer

        stock_load = ShardedOptimizer.load_state_dict

        def load_state_dict(self, state_dict):  # counted: the shards' state is written only by a resume
            loads.append(len(state_dict.get("state", {})))
            return stock_load(self, state_dict)

        ShardedOptimizer.load_state_dict = load_state_dict
        trainer = ShardpsTrainer(model=model, args=args, train_dataset=Windows(), data_collator=collate,
                                 job=f"hf{tag}", sharded_kwargs={"step_timeout": 120, **(diloco or {})})
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(str(root / "final"))
    rank = trainer.args.process_index
    losses = [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in trainer.state.log_history
              if "loss" in e]
    torch.save({"rank": rank, "world_size": trainer.args.world_size, "model": M_sd(model), "seen": seen,
                "saves": saves, "loads": loads, "losses": losses, "root": str(root), "index": index,
                "outer_steps": trainer.diloco.outer.steps_taken if getattr(trainer, "diloco", None) else None,
                "versions": trainer.diloco.versions if getattr(trainer, "diloco", None) else None},
               out / f"hf{tag}-{'ref' if reference else f'rank{rank}'}.pt")


def M_sd(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trainer", choices=["lightning", "hf"])
    ap.add_argument("out")
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--resume", default="", help="a checkpoint to resume from")
    ap.add_argument("--tag", default="", help="names this run's files and job")
    ap.add_argument("--finetune", action="store_true", help="lightning: BackboneFinetuning adds a group at epoch 1")
    ap.add_argument("--diloco", action="store_true", help="DiLoCo mode (DILOCO); with --reference: written out")
    ap.add_argument("--outer-momentum", type=float, default=0.0, help="DiLoCo: the outer SGD's (Nesterov) momentum")
    ap.add_argument("--diloco-mode", default="diloco", choices=["diloco", "diloco-async"],
                    help="DiLoCo: outer steps sync or async (the references write out sync ones)")
    ap.add_argument("--fragments", type=int, default=1, help="DiLoCo: streaming fragments (reference: Lightning's)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tag = a.tag and f"-{a.tag}"
    if a.diloco and a.reference:
        import trainers_diloco

        if a.diloco_mode != "diloco" or (a.fragments > 1 and a.trainer == "hf"):
            ap.error("the DiLoCo references write out sync outer steps (Lightning's also with --fragments)")
        if a.trainer == "lightning":
            return trainers_diloco.lightning_reference(Path(a.out), a.epochs, tag, a.outer_momentum, a.fragments)
        return trainers_diloco.hf_reference(Path(a.out), a.epochs, tag, a.outer_momentum)
    run = {"lightning": lightning_run, "hf": hf_run}[a.trainer]
    extra = {"finetune": True} if a.finetune else {}
    diloco = diloco_options(a.outer_momentum, a.diloco_mode, a.fragments) if a.diloco else None
    run(Path(a.out), a.reference, a.epochs, a.resume, tag, diloco=diloco, **extra)


if __name__ == "__main__":
    main()
