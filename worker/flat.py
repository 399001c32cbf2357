"""Flatten a model's gradients into one fp32 host vector and scatter a flat vector back.

The buffers are allocated once; each step copies into them (a fresh 100 MB buffer
costs ~35 ms of page faults, a copy into an existing one ~4 ms). Copies convert
dtype and device, so the model may live in bf16 on CUDA while the wire is fp32.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..proto.layout import Layout


class FlatParams:
    """The trainable parameters of a model, laid out as ``layout`` describes."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], wire_dtype=torch.float32):
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.layout = Layout.from_module(named)
        self.params = [p for _, p in named]
        self.grads = torch.zeros(self.layout.numel, dtype=torch.float32)  # flat gradients, host
        self.values = torch.zeros(self.layout.numel, dtype=torch.float32)  # flat parameters, host
        # The push's wire buffer: the fp32 grads themselves, or a bf16/fp16 copy of them.
        self.wire = self.grads if wire_dtype == torch.float32 else torch.zeros(self.layout.numel, dtype=wire_dtype)

    def _views(self, flat: torch.Tensor):
        for p, e in zip(self.params, self.layout.params):
            yield p, flat[e.offset:e.stop]

    def gather_grads(self) -> torch.Tensor:
        """Copy every parameter's gradient into the wire buffer (zeros where grad is None)."""
        for p, view in self._views(self.grads):
            if p.grad is None:
                view.zero_()
            elif p.grad.is_sparse:
                raise ValueError("sparse gradients are not supported; use dense embeddings")
            else:
                view.copy_(p.grad.detach().reshape(-1))
        if self.wire is not self.grads:
            self.wire.copy_(self.grads)
        return self.wire

    def gather_params(self) -> torch.Tensor:
        """Copy the model's current parameters into ``values`` (fp32)."""
        for p, view in self._views(self.values):
            view.copy_(p.detach().reshape(-1))
        return self.values

    @torch.no_grad()
    def scatter_params(self) -> None:
        """Write ``values`` back into the model's parameters, in their own dtype and device."""
        for p, view in self._views(self.values):
            p.copy_(view.view(p.shape))
