"""Built-in workloads on real data that ships with a package (nothing is downloaded).

- ``digits``: an MLP on scikit-learn's bundled 8x8 digits (1,797 images), held-out accuracy.
- ``charlm``: a ~3M-parameter character-level transformer trained on the Python
  standard library's own source files, held-out bits per character.
- ``charlm25m``: the same data and model family, 512 wide and 8 layers deep (25.5M
  parameters), the size of the issue's reference MLP, for benchmarks across links.

Each workload cuts every *global* batch (the union of all workers' batches) the same
way on every process and hands rank r its own rows, so sync training over W workers
sees exactly the batches one process would see with W times the batch size.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Defaults:
    optimizer: str
    lr: float
    batch_size: int  # per worker
    epochs: float


class Workload(ABC):
    """Interface: a model, a deterministic stream of global batches, a loss and a held-out metric."""

    name = ""
    metric = ""  # headline held-out metric
    higher_is_better = True
    defaults: Defaults

    def __init__(self, seed: int = 0):
        self.seed = seed

    @abstractmethod
    def model(self) -> torch.nn.Module:
        """A fresh model, initialised from the seed (every process builds the same one)."""

    @property
    @abstractmethod
    def train_size(self) -> int:
        """Training examples (or windows) in one epoch."""

    @abstractmethod
    def global_batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The union batch of ``step``: identical on every process."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``model`` on (x, y)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics of ``model``, including ``self.metric``."""

    def steps_for(self, epochs: float, global_batch: int) -> int:
        return max(1, math.ceil(epochs * self.train_size / global_batch))

    def rows(self, step: int, global_size: int, lo: int, hi: int):
        """Rows [lo, hi) of global batch ``step`` (``global_size`` samples): one worker's share."""
        x, y = self.global_batch(step, global_size)
        return x[lo:hi], y[lo:hi]


class Digits(Workload):
    name, metric = "digits", "accuracy"
    defaults = Defaults(optimizer="adam", lr=3e-3, batch_size=32, epochs=15)

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # fixed split
        cut = int(0.8 * len(y))
        self.x_train, self.y_train = x[order[:cut]], y[order[:cut]]
        self.x_test, self.y_test = x[order[cut:]], y[order[cut:]]

    def model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    @property
    def train_size(self) -> int:
        return len(self.y_train)

    def global_batch(self, step: int, size: int):
        """Epoch-wise shuffles; batch k of an epoch takes rows [k*size, (k+1)*size) of that shuffle."""
        per_epoch = max(1, self.train_size // size)
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(self.train_size, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        idx = perm[k * size:(k + 1) * size]
        return self.x_train[idx], self.y_train[idx]

    def loss(self, model, x, y):
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        logits = model(self.x_test.to(device)).float().cpu()
        return {
            "accuracy": (logits.argmax(1) == self.y_test).float().mean().item(),
            "loss": F.cross_entropy(logits, self.y_test).item(),
        }


class CharLM(Workload):
    """Byte-level (for this ASCII source, character-level) GPT-style language model."""

    name, metric, higher_is_better = "charlm", "bits_per_char", False
    defaults = Defaults(optimizer="adamw", lr=1e-3, batch_size=8, epochs=0.05)
    CONTEXT, WIDTH, LAYERS, HEADS, VOCAB = 128, 256, 4, 4, 256
    MAX_BYTES = 4 << 20  # ~4 MB of stdlib source

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        text = _stdlib_text(self.MAX_BYTES)
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        cut = int(0.9 * len(data))
        self.train, self.held_out = data[:cut], data[cut:]

    def model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return TinyGPT(self.VOCAB, self.CONTEXT, self.WIDTH, self.LAYERS, self.HEADS)

    @property
    def train_size(self) -> int:
        return len(self.train) // self.CONTEXT  # windows per epoch

    def _windows(self, data, starts):
        idx = starts[:, None] + torch.arange(self.CONTEXT + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def global_batch(self, step: int, size: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.CONTEXT - 1, (size,), generator=g)
        return self._windows(self.train, starts)

    def loss(self, model, x, y):
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, windows: int = 64) -> dict[str, float]:
        device = next(model.parameters()).device
        starts = torch.linspace(0, len(self.held_out) - self.CONTEXT - 2, windows).long()
        x, y = self._windows(self.held_out, starts)
        loss = self.loss(model, x.to(device), y.to(device)).item()
        return {"loss": loss, "bits_per_char": loss / math.log(2)}


class CharLM25M(CharLM):
    """``charlm`` at 25.5M parameters: wider and deeper, same data, context and held-out metric."""

    name = "charlm25m"
    defaults = Defaults(optimizer="adamw", lr=5e-4, batch_size=8, epochs=0.05)
    WIDTH, LAYERS, HEADS = 512, 8, 8


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Embedding(context, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                                 norm_first=True, activation="gelu")
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, x):
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def _stdlib_text(max_bytes: int) -> bytes:
    """The standard library's own top-level .py sources, in sorted order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 100_000:
        raise RuntimeError(f"found only {total} bytes of Python source under {root}")
    return b"".join(out)[:max_bytes]


WORKLOADS: dict[str, type[Workload]] = {"digits": Digits, "charlm": CharLM, "charlm25m": CharLM25M}


def get_workload(name: str, seed: int = 0) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
    return WORKLOADS[name](seed)
