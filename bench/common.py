"""Shared pieces of the benchmarks: models, timing statistics, process helpers.

Every benchmark prints ratios from one run: the peer and shardps alternate in the
same process tree, several repetitions each, and the report gives medians and spread.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch


def mlp(width: int = 4096, io: int = 1024, seed: int = 0) -> torch.nn.Module:
    """The issue's reference model: 1024 -> 4096 -> 4096 -> 1024 (25.2M parameters at width 4096)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(io, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, io))


def mlp_for_params(target: int) -> tuple[int, int]:
    """(width, io) of a 3-layer MLP with about ``target`` parameters (io = width / 4)."""
    # params ~= 2 * w * w/4 + w * w = 1.5 w^2
    width = max(64, int((target / 1.5) ** 0.5) // 64 * 64)
    return width, width // 4


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "n": len(s)}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def emit(name: str, result: dict, out: str | None) -> None:
    result = {"benchmark": name, "machine": machine(), **result}
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
