"""Flatten a model's gradients into one fp32 host vector and scatter a flat vector back.

The buffers are allocated once (a fresh 100 MB buffer costs ~35 ms of page faults).
For an fp32 model on the CPU the parameters and their gradients *are* views into
the two flat buffers (as DDP's ``gradient_as_bucket_view``): replies land in the
model directly and backward accumulates straight into the push buffer, so the
model's memory is counted once and no copy is made either way. Other models
(CUDA, MPS, bf16/fp16 replicas) copy, converting dtype and device on the way.
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
        self.bound = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in self.params)
        if self.bound:
            self._bind()

    @torch.no_grad()
    def _bind(self) -> None:
        """Make every parameter a view into ``values`` (keeping its current values)."""
        for p, e in zip(self.params, self.layout.params):
            view = self.values[e.offset:e.stop]
            view.copy_(p.reshape(-1))
            p.data = view.view(p.shape)
            if p.grad is not None:
                self.grads[e.offset:e.stop].copy_(p.grad.reshape(-1))
            # Attached from the start (zeros), so even the first backward accumulates in place.
            p.grad = self.grads[e.offset:e.stop].view(p.shape)

    def zero_grads(self) -> None:
        """Zero the flat gradients in place; bound gradients stay attached as views."""
        self.grads.zero_()
        for p, e in zip(self.params, self.layout.params):
            if p.grad is not None and not self._is_view(p.grad, self.grads, e):
                p.grad = None

    @staticmethod
    def _is_view(t: torch.Tensor, flat: torch.Tensor, e) -> bool:
        return t.data_ptr() == flat[e.offset:].data_ptr() and t.numel() == e.numel

    def _views(self, flat: torch.Tensor):
        for p, e in zip(self.params, self.layout.params):
            yield p, flat[e.offset:e.stop]

    def params_in(self, start: int, stop: int) -> list[int]:
        """Indices of the parameters with at least one element in [start, stop)."""
        return [i for i, e in enumerate(self.layout.params) if e.offset < stop and e.stop > start]

    def gather_grads(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Copy the gradients of the parameters in [start, stop) into the wire buffer (zeros for
        a None grad) and return the whole wire buffer (its [start, stop) part is fresh)."""
        stop = self.layout.numel if stop is None else stop
        for i in self.params_in(start, stop):
            p, e = self.params[i], self.layout.params[i]
            view = self.grads[e.offset:e.stop]
            if p.grad is None:
                view.zero_()
            elif p.grad.is_sparse:
                raise ValueError("sparse gradients are not supported; use dense embeddings")
            elif not (self.bound and self._is_view(p.grad, self.grads, e)):
                view.copy_(p.grad.detach().reshape(-1))
                if self.bound:  # re-attach: the next backward accumulates into the flat buffer
                    p.grad = view.view(p.shape)
        if self.wire is not self.grads:
            self.wire[start:stop].copy_(self.grads[start:stop])
        return self.wire

    def gather_params(self) -> torch.Tensor:
        """Copy the model's current parameters into ``values`` (fp32)."""
        for p, view in self._views(self.values):
            view.copy_(p.detach().reshape(-1))
        return self.values

    @torch.no_grad()
    def scatter_params(self) -> None:
        """Write ``values`` back into the model's parameters (nothing to do when they are views)."""
        if self.bound:
            return
        for p, view in self._views(self.values):
            p.copy_(view.view(p.shape))
