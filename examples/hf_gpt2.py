"""The Hugging Face Trainer on shardps: a small GPT-2 (built from a config) on text from Python's
standard library, with the Trainer's defaults (AdamW decay / no-decay groups, max_grad_norm=1.0)
plus gradient accumulation and a warmup schedule.

    shardps launch --nproc 2 examples/hf_gpt2.py --epochs 2
    shardps launch --nproc 2 examples/hf_gpt2.py --diloco 20   # DiLoCo: an outer step every 20 steps

Each worker trains on its part of every epoch; rank 0 alone logs, checkpoints and calls
save_pretrained (runs/hf-gpt2).
"""
import argparse

import torch

from shardps.worker.hf import ShardpsTrainer  # before TrainingArguments: accelerate must see one process
from shardps.worker.workloads import _stdlib_text
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

CONTEXT = 64


class Windows(torch.utils.data.Dataset):
    def __init__(self, size: int):
        text = torch.frombuffer(bytearray(_stdlib_text(max(size * CONTEXT, 200_000))), dtype=torch.uint8).long()
        self.tokens = (text[:size * CONTEXT] - 32).clamp(0, 95)  # printable ASCII as a 96-token vocabulary

    def __len__(self):
        return len(self.tokens) // CONTEXT

    def __getitem__(self, i):
        x = self.tokens[i * CONTEXT:(i + 1) * CONTEXT]
        return {"input_ids": x, "labels": x}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--windows", type=int, default=512)
    ap.add_argument("--diloco", type=int, default=0, metavar="H",
                    help="DiLoCo mode: the Trainer's AdamW on each worker, an outer step on the shards every H steps")
    a = ap.parse_args()
    config = GPT2Config(vocab_size=96, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    args = TrainingArguments(output_dir="runs/hf-gpt2", num_train_epochs=a.epochs, learning_rate=3e-3,
                             weight_decay=0.01, warmup_steps=10, lr_scheduler_type="cosine",
                             per_device_train_batch_size=8, gradient_accumulation_steps=2, logging_steps=10,
                             save_strategy="epoch", report_to="none", use_cpu=not torch.cuda.is_available())
    diloco = {"mode": "diloco", "sync_every": a.diloco} if a.diloco else {}
    trainer = ShardpsTrainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Windows(a.windows),
                             sharded_kwargs=diloco)
    trainer.train()
    trainer.save_model("runs/hf-gpt2/final")


if __name__ == "__main__":
    main()
