"""Flatten a model's gradients into one fp32 host vector and scatter a flat vector back.

The buffers are allocated once (a fresh 100 MB buffer costs ~35 ms of page faults).
For an fp32 model on the CPU the parameters and their gradients *are* views into
the two flat buffers (as DDP's ``gradient_as_bucket_view``): replies land in the
model directly and backward accumulates straight into the push buffer, so the
model's memory is counted once and no copy is made either way. Other models
(CUDA, MPS, bf16/fp16 replicas) copy, converting dtype and device on the way.

Which parameters *have* a gradient is tracked as torch sees it (``p.grad is None``
or not): a bound gradient view counts only once backward has written into it
since ``zero_grad(set_to_none=True)`` (a post-accumulate-grad hook notes that),
so the shards can skip a parameter no worker computed a gradient for, as
``torch.optim`` skips one whose ``.grad`` is None.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..proto.layout import Layout
from ..proto.messages import mask_of
from ..proto.shm import Segment, ShmUnavailable

log = logging.getLogger("shardps.worker")

CHECK_SAMPLES = 1 << 16  # elements sampled to notice parameters changed behind the optimizer's back


class FlatParams:
    """Parameters laid out as ``layout`` describes (the order of the optimizer's param groups)."""

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str], groups: Sequence[int],
                 aliases: Sequence[tuple[str, ...]], num_groups: int, wire_dtype=torch.float32,
                 shared: bool = False):
        """``shared``: put the flat buffers in a shared-memory segment (``proto/shm.py``) that shard
        servers on this host read and write directly; where /dev/shm cannot hold it, plain memory."""
        self.params = list(params)
        self.layout = Layout.from_shapes(
            [(n, tuple(p.shape), str(p.dtype).removeprefix("torch."), g, a)
             for p, n, g, a in zip(self.params, names, groups, aliases)], num_groups)
        self.segment = None
        if shared:
            try:
                self.segment = Segment.create(self.layout.numel)
            except ShmUnavailable as exc:
                log.info("pushes go over gRPC only: %s", exc)
        if self.segment is not None:  # zeroed by the kernel; the same memory the servers map
            self.grads, self.values = self.segment.grads, self.segment.values
        else:
            self.grads = torch.zeros(self.layout.numel, dtype=torch.float32)  # flat gradients, host
            self.values = torch.zeros(self.layout.numel, dtype=torch.float32)  # flat parameters, host
        # The push's wire buffer: the fp32 grads themselves, or a bf16/fp16 copy of them.
        self.wire = self.grads if wire_dtype == torch.float32 else torch.zeros(self.layout.numel, dtype=wire_dtype)
        self.bound = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in self.params)
        self.touched = [False] * len(self.params)  # backward wrote a gradient since zero_grad(set_to_none=True)
        self._hooks = [p.register_post_accumulate_grad_hook(self._toucher(i))
                       for i, p in enumerate(self.params) if p.requires_grad]
        if self.bound:
            self._bind()
        self._stride = max(1, self.layout.numel // CHECK_SAMPLES)
        self._check = None

    def _toucher(self, index: int):
        def touched(param):
            self.touched[index] = True
        return touched

    @torch.no_grad()
    def _bind(self) -> None:
        """Make every parameter a view into ``values`` (keeping its current values), and every
        trainable one's gradient a view into ``grads``."""
        for i, (p, e) in enumerate(zip(self.params, self.layout.params)):
            view = self.values[e.offset:e.stop]
            view.copy_(p.reshape(-1))
            p.data = view.view(p.shape)
            if p.grad is not None:
                self.grads[e.offset:e.stop].copy_(p.grad.reshape(-1))
                self.touched[i] = True
            if p.requires_grad:  # attached from the start (zeros), so even the first backward accumulates in place
                p.grad = self.grads[e.offset:e.stop].view(p.shape)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        if self.segment is not None:  # the memory stays mapped (the model's tensors live in it); the name goes
            self.segment.unlink()

    def zero_grads(self, set_to_none: bool = True) -> None:
        """Zero the flat gradients in place; bound gradients stay attached as views. With
        ``set_to_none`` every parameter counts as having no gradient until backward writes one."""
        self.grads.zero_()
        for p, e in zip(self.params, self.layout.params):
            if p.grad is not None and not self._is_view(p.grad, self.grads, e):
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        if set_to_none:
            self.touched = [False] * len(self.params)

    @staticmethod
    def _is_view(t: torch.Tensor, flat: torch.Tensor, e) -> bool:
        return t.data_ptr() == flat[e.offset:].data_ptr() and t.numel() == e.numel

    def has_grad(self, index: int) -> bool:
        """Whether parameter ``index`` has a gradient, as torch would see ``p.grad``."""
        p, e = self.params[index], self.layout.params[index]
        if p.grad is None:
            return False
        return not (self.bound and self._is_view(p.grad, self.grads, e)) or self.touched[index]

    def grad_mask(self, start: int, stop: int) -> bytes:
        """``StepOptions.grad_mask`` for the shard [start, stop): its pieces that have a gradient."""
        return mask_of([self.has_grad(piece.index) for piece in self.layout.pieces(start, stop)])

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
                if self.bound and p.requires_grad:  # re-attach: the next backward accumulates into the flat buffer
                    p.grad = view.view(p.shape)
                    self.touched[i] = True
            elif not self.touched[i]:
                view.zero_()  # a bound gradient backward never wrote counts as None: push zeros
        if self.wire is not self.grads:
            self.wire[start:stop].copy_(self.grads[start:stop])
        return self.wire

    def all_finite(self) -> bool:
        """Whether every gradient the model holds is finite (GradScaler's overflow test)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def gather_params(self) -> torch.Tensor:
        """Copy the model's current parameters into ``values`` (fp32)."""
        for p, view in self._views(self.values):
            view.copy_(p.detach().reshape(-1))
        return self.values

    @torch.no_grad()
    def scatter_params(self) -> None:
        """Write ``values`` back into the model's parameters (nothing to do when they are views)
        and remember a sample of them, to notice edits made behind the optimizer's back."""
        if not self.bound:
            for p, view in self._views(self.values):
                p.copy_(view.view(p.shape))
        self._check = self._sample()

    def _sample(self) -> torch.Tensor:
        if self.bound:
            return self.values[::self._stride].clone()
        return torch.stack([p.detach().reshape(-1)[::max(1, p.numel() // 64)].float().sum() for p in self.params]).cpu()

    def changed_since_scatter(self) -> bool:
        """Whether the model's parameters differ from what the shards last sent (sampled: a
        change to a few elements may go unnoticed; any wholesale edit or load is noticed)."""
        return self._check is not None and not torch.equal(self._sample(), self._check)
