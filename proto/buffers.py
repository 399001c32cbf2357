"""The buffers file: a model's persistent buffers as one safetensors blob (names, shapes, dtypes kept).

Rank 0 sends it to shard 0 with each push (DDP broadcasts rank 0's buffers before
every forward); shard 0 keeps it, returns it with replies, checkpoints it, and
exports it. safetensors is a format, not code: reading it never runs anything, so
a blob from the network is safe to parse once its size is bounded.

    blob = encode({"bn.running_mean": torch.zeros(4)})
    check(blob, job.buffers)            # ValueError naming what does not match
    tensors = decode(blob)
"""
from __future__ import annotations

from typing import Sequence

import torch
from safetensors.torch import load as st_load, save as st_save

from .codec import dtype_from_name
from .layout import BufferEntry

HEADER_SLACK = 1 << 16  # bytes of safetensors header and alignment allowed beyond the tensors' own


def max_bytes(entries: Sequence[BufferEntry]) -> int:
    return sum(e.numel * dtype_from_name(e.dtype).itemsize for e in entries) + HEADER_SLACK + 64 * len(entries)


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def decode(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(bytes(blob))
    except Exception as exc:  # safetensors raises its own error types for malformed input
        raise ValueError(f"the buffers are not a readable safetensors file: {str(exc)[:200]}") from None


def check(blob: bytes, entries: Sequence[BufferEntry]) -> dict[str, torch.Tensor]:
    """Decode ``blob`` and check it holds exactly ``entries``; returns the tensors."""
    if len(blob) > max_bytes(entries):
        raise ValueError(f"the buffers file is {len(blob)} bytes; the job's buffers need at most {max_bytes(entries)}")
    tensors = decode(blob)
    expected = {e.name: e for e in entries}
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"the buffers file does not match the job's buffers (missing {missing[:5]}, "
                         f"unexpected {extra[:5]})")
    for name, t in tensors.items():
        e = expected[name]
        if tuple(t.shape) != e.shape or t.dtype != dtype_from_name(e.dtype):
            raise ValueError(f"buffer {name!r} is {list(t.shape)} {t.dtype}; the job's is {list(e.shape)} {e.dtype}")
    return tensors
