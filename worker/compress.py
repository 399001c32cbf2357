"""Top-k gradient sparsification with error feedback, on the worker.

Each push sends, per shard, only the k = ceil(ratio x shard size) elements of
largest magnitude of (gradient + residual); what it leaves out stays in the
residual and joins the next step's gradient (error feedback, Stich et al. 2018;
Lin et al., "Deep Gradient Compression", 2018). Without the residual, small but
persistent gradient components would never be sent; with it, everything is
eventually applied. The residual lives only here, never on the servers.
"""
from __future__ import annotations

import math

import torch


class TopK:
    def __init__(self, numel: int, ratio: float, wire_dtype: torch.dtype = torch.float32):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"top-k ratio must be in (0, 1), got {ratio}")
        self.ratio, self.wire_dtype = ratio, wire_dtype
        self.residual = torch.zeros(numel, dtype=torch.float32)  # error feedback: what was not sent yet

    def compress(self, grads: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 positions within [start, stop), values) of this step's push for one shard.

        ``grads`` (the flat fp32 gradient) is only read; the residual absorbs the rest.
        """
        acc = self.residual[start:stop]
        acc.add_(grads[start:stop])  # gradient + everything not sent before
        k = min(acc.numel(), max(1, math.ceil(self.ratio * acc.numel())))
        positions = torch.topk(acc.abs(), k, sorted=False).indices
        chosen = acc[positions]
        values = chosen.to(self.wire_dtype)
        acc[positions] = chosen - values.float()  # sent; only a bf16/fp16 rounding error stays behind
        return positions.to(torch.int32), values
