"""Lightning on shardps: an MLP on scikit-learn's digits, with clipping and a per-step schedule.

    shardps launch --nproc 2 examples/lightning_digits.py --epochs 3
    shardps launch --nproc 2 examples/lightning_digits.py --diloco 10   # DiLoCo: an outer step every 10 steps

Each worker trains on its part of every epoch (Lightning's DistributedSampler, by the job's
rank); rank 0 alone writes logs and checkpoints under runs/lightning-digits.
"""
import argparse

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from shardps.worker.lightning import ShardpsStrategy


class Digits(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Tanh(),
                                       torch.nn.Linear(64, 10))

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)  # the workers' mean
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        plain = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": plain, "weight_decay": 0.0}],
                                lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.05 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per worker step")
    ap.add_argument("--diloco", type=int, default=0, metavar="H",
                    help="DiLoCo mode: AdamW steps on each worker, an outer step on the shards every H steps")
    a = ap.parse_args()
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
    train = torch.utils.data.TensorDataset(x[:1500], y[:1500])
    val = torch.utils.data.TensorDataset(x[1500:], y[1500:])
    strategy = ShardpsStrategy(mode="diloco", sync_every=a.diloco) if a.diloco else ShardpsStrategy()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=a.epochs,
                        gradient_clip_val=1.0, default_root_dir="runs/lightning-digits", enable_progress_bar=False)
    trainer.fit(Digits(), torch.utils.data.DataLoader(train, batch_size=a.batch_size, shuffle=True),
                torch.utils.data.DataLoader(val, batch_size=a.batch_size))
    if trainer.is_global_zero:
        print(f"val_acc {float(trainer.callback_metrics['val_acc']):.3f}")


if __name__ == "__main__":
    main()
