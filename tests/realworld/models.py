"""Models written here in the shapes real training code has (not copied from anywhere), and real data.

- ``MiniGPT``: a GPT with token and position embeddings, pre-norm blocks, a causal
  attention, an LM head tied to the token embedding, and a ``configure_optimizers``
  that splits decay (matrices) from no-decay (biases, norms) parameters, as
  nanoGPT-style code does.
- ``ConvBN``: a small residual convolutional net with BatchNorm (running statistics,
  ``num_batches_tracked``).
- ``Branchy``: a branch used on some steps only, a module never used, a frozen layer.
- ``Generator`` / ``Critic``: the two models of a GAN.

Data: the Python standard library's own sources as characters, and scikit-learn's
bundled 8x8 digits; both ship with what is installed.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, CONTEXT = 96, 16


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        # No bias on q/k/v (nanoGPT's bias=False): a key bias gets an exactly-zero gradient in exact
        # arithmetic, so Adam turns float noise in it into lr-sized steps in any two computations.
        self.qkv, self.out = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class MiniGPT(nn.Module):
    def __init__(self, width: int = 32, layers: int = 2, heads: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, width), nn.Embedding(CONTEXT, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2 ties them

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def configure_optimizers(self, weight_decay: float):
        """Decay every matrix, not biases and norms: two param groups."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def cosine_lr(step: int, peak: float = 3e-3, warmup: int = 2, total: int = 10, floor: float = 3e-4) -> float:
    """Linear warmup, then cosine decay to ``floor``: a learning rate set by hand every step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    ratio = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1 + math.cos(math.pi * ratio)) * (peak - floor)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x.view(-1, 1, 8, 8))
        h = F.relu(h + self.res(h))
        return self.head(h.mean(dim=(2, 3)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.branch = nn.Linear(64, 32), nn.Linear(32, 32)
        self.never = nn.Linear(32, 32)  # defined, never called
        self.frozen = nn.Linear(32, 32)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(32, 10)

    def forward(self, x, use_branch: bool):
        h = torch.tanh(self.trunk(x))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(self.frozen(h))


class Generator(nn.Module):
    def __init__(self, noise: int = 8):
        super().__init__()
        self.noise = noise
        self.net = nn.Sequential(nn.Linear(noise, 32), nn.LeakyReLU(0.2), nn.Linear(32, 64), nn.Sigmoid())

    def forward(self, z):
        return self.net(z)


class Critic(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------------------------ data


@functools.lru_cache(maxsize=1)
def _text() -> torch.Tensor:
    from shardps.worker.workloads import _stdlib_text

    data = torch.frombuffer(bytearray(_stdlib_text(200_000)), dtype=torch.uint8).long()
    return (data - 32).clamp(0, VOCAB - 1)  # printable ASCII onto the vocabulary


def text_batch(step: int, size: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Union batch ``step`` (micro-batch ``micro``) of character windows: the same on every process."""
    data = _text()
    g = torch.Generator().manual_seed(1000 * step + micro)
    starts = torch.randint(0, len(data) - CONTEXT - 1, (size,), generator=g)
    chunk = data[starts[:, None] + torch.arange(CONTEXT + 1)]
    return chunk[:, :-1], chunk[:, 1:]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def digits_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(7 + step))[:size]
    return x[idx], y[idx]


def noise_batch(step: int, size: int, width: int = 8) -> torch.Tensor:
    return torch.randn(size, width, generator=torch.Generator().manual_seed(99_991 + step))
