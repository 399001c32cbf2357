"""int8 gradients on the wire: symmetric per-block quantisation (both ends of a push use it).

A vector of n values travels as n int8 values and one float32 scale per block of
``block`` consecutive elements (the last block may be shorter): element i is
``values[i] * scales[i // block]``. The receiver knows n and the number of scales,
so the block size is not sent: it is ``block_size(n, len(scales))``, and a sender
picks its blocks with ``blocks_for`` so that both ends agree.

    values, scales = quantize(x)                 # x: float32, 1-D
    y = dequantize(values, scales)               # |y - x| <= scale / 2 per element
"""
from __future__ import annotations

import math

import torch

DEFAULT_BLOCK = 4096  # elements per scale: 1/1024 of the int8 bytes again in scales
LEVELS = 127  # symmetric: -127..127 (-128 is never used, so negating a value never overflows)


def block_size(numel: int, num_scales: int) -> int:
    """Elements per scale of an ``numel``-element vector sent with ``num_scales`` scales."""
    return math.ceil(numel / num_scales) if num_scales else 0


def blocks_for(numel: int, block: int = DEFAULT_BLOCK) -> int:
    """How many scales a sender uses for ``numel`` elements with blocks of at most ``block``."""
    return math.ceil(numel / block)


def quantize(x: torch.Tensor, block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales) of the 1-D float tensor ``x``: each block's scale is its
    largest magnitude / 127 (0 for an all-zero block), each value round(x / scale)."""
    n = x.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.float32)
    b = block_size(n, blocks_for(n, block))
    x = x.float()
    padded = torch.nn.functional.pad(x, (0, (-n) % b)).view(-1, b)
    scales = padded.abs().amax(dim=1) / LEVELS
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(padded / divisor[:, None]).clamp_(-LEVELS, LEVELS).to(torch.int8)
    return values.view(-1)[:n].clone(), scales


def dequantize(values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 vector ``values`` and ``scales`` stand for (written into ``out`` when given).
    Raises ValueError when there are more scales than values or none for a non-empty vector."""
    n, k = values.numel(), scales.numel()
    if (n == 0) != (k == 0) or k > n:
        raise ValueError(f"{k} scales cannot cover {n} int8 values: send between 1 and {n} of them")
    out = torch.empty(n, dtype=torch.float32) if out is None else out
    if n == 0:
        return out
    b = block_size(n, k)
    if (k - 1) * b >= n:
        raise ValueError(f"{k} scales of blocks of {b} elements overrun {n} values: send ceil(n / block) scales")
    full = (n // b) * b
    out[:full].view(-1, b).copy_(values[:full].view(-1, b)).mul_(scales[:n // b, None])
    if full < n:
        out[full:].copy_(values[full:]).mul_(scales[-1])
    return out
