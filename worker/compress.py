"""Gradient compression with error feedback, on the worker: top-k and int8.

``TopK`` sends, per shard, only the k = ceil(ratio x shard size) elements of
largest magnitude of (gradient + residual); ``Int8`` sends every element of
(gradient + residual) as int8 with one fp32 scale per block (``proto/quant.py``).
Either way what the push leaves out (the unsent elements, the rounding error)
stays in the residual and joins the next step's gradient (error feedback, Stich
et al. 2018; Lin et al., "Deep Gradient Compression", 2018; Seide et al., 1-bit
SGD, 2014). Without the residual, small but persistent gradient components would
never be sent; with it, everything is eventually applied. The residual lives only
here, never on the servers. A push is compressed once and its payload resent
as is on a retry, so the residual counts each push once.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..proto import quant


class Payload(NamedTuple):
    """What one push sends for one shard: ``positions`` (int32, top-k) or None for every element;
    ``values`` in their wire dtype; ``scales`` (float32, int8 values) or None."""
    positions: torch.Tensor | None
    values: torch.Tensor
    scales: torch.Tensor | None = None


class TopK:
    def __init__(self, numel: int, ratio: float, wire_dtype: torch.dtype = torch.float32):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"top-k ratio must be in (0, 1), got {ratio}")
        self.ratio, self.wire_dtype = ratio, wire_dtype
        self.residual = torch.zeros(numel, dtype=torch.float32)  # error feedback: what was not sent yet

    def compress(self, grads: torch.Tensor, start: int, stop: int) -> Payload:
        """This step's push for one shard: int32 positions within [start, stop) and their values.

        ``grads`` (the flat fp32 gradient) is only read; the residual absorbs the rest.
        """
        acc = self.residual[start:stop]
        acc.add_(grads[start:stop])  # gradient + everything not sent before
        k = min(acc.numel(), max(1, math.ceil(self.ratio * acc.numel())))
        positions = torch.topk(acc.abs(), k, sorted=False).indices
        chosen = acc[positions]
        values = chosen.to(self.wire_dtype)
        acc[positions] = chosen - values.float()  # sent; only a bf16/fp16 rounding error stays behind
        return Payload(positions.to(torch.int32), values)


class Int8:
    """Every element as int8 with per-block scales; the quantisation error is the residual."""

    def __init__(self, numel: int, block: int = quant.DEFAULT_BLOCK):
        if block < 1:
            raise ValueError(f"int8 block must be >= 1 element, got {block}")
        self.block = block
        self.residual = torch.zeros(numel, dtype=torch.float32)

    def compress(self, grads: torch.Tensor, start: int, stop: int) -> Payload:
        """This step's push for one shard (blocks start at ``start``); ``grads`` is only read."""
        acc = self.residual[start:stop]
        acc.add_(grads[start:stop])
        values, scales = quant.quantize(acc, self.block)
        acc.sub_(quant.dequantize(values, scales))  # only the rounding error stays behind
        return Payload(None, values, scales)
