"""Flatten a model's gradients into one host vector per push and scatter a flat vector back.

The buffers are allocated once (a fresh 100 MB buffer costs ~35 ms of page faults).
Parameters and their gradients are *views* into two flat buckets wherever the model
allows (as DDP's ``gradient_as_bucket_view``), so backward accumulates straight into
the bucket and a reply lands in the model without a per-parameter copy:

* ``host``: an fp32 CPU model. The buckets are the host vectors themselves (in the
  same-host shared-memory segment when there is one): no copy at all either way.
* ``device``: every parameter on one device with one dtype (a CUDA or MPS model, a
  bf16 replica). The buckets live on that device; a push casts its range to the
  wire dtype *on the device* and copies it to page-locked host memory in one
  asynchronous copy per shard (on CUDA, on a stream of its own, so shard 0 is on
  the wire while shard 1 is still copying, and with ``overlap`` while backward goes
  on); each reply is copied back to the device as it lands.
* ``copy``: anything else (parameters on several devices or of several dtypes):
  per-parameter copies.

Which parameters *have* a gradient is tracked as torch sees it (``p.grad is None``
or not): a bound gradient view counts only once backward has written into it
since ``zero_grad(set_to_none=True)`` (a post-accumulate-grad hook notes that),
so the shards can skip a parameter no worker computed a gradient for, as
``torch.optim`` skips one whose ``.grad`` is None.
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

import torch

from ..proto.layout import Layout
from ..proto.messages import mask_of
from ..runtime.shm import Segment, ShmUnavailable
from .device import Copier, Pending, Registered, empty_host

log = logging.getLogger("shardps.worker")

CHECK_SAMPLES = 1 << 16  # elements sampled to notice parameters changed behind the optimizer's back
BUCKETS = ("host", "device", "copy")


def bucket_kind(params: Sequence[torch.Tensor]) -> str:
    """How ``FlatParams`` holds these parameters (see the module's docstring)."""
    devices, dtypes = {p.device for p in params}, {p.dtype for p in params}
    if len(devices) != 1 or len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return "copy"
    device, dtype = devices.pop(), dtypes.pop()
    return "host" if device.type == "cpu" and dtype == torch.float32 else "device"


class Staged:
    """One shard's gradient on its way into host memory, for one push. ``wait`` blocks until the
    bytes are there; ``wire`` is the flat wire buffer with this range fresh (the push thread
    casts it from the fp32 host copy when that is what was staged)."""

    def __init__(self, flat: "FlatParams", start: int, stop: int, fp32: bool, pending: Pending | None = None):
        self.flat, self.start, self.stop, self.fp32 = flat, start, stop, fp32
        self._pending = pending or Pending()

    def wait(self) -> None:
        self._pending.wait()

    def wire(self) -> torch.Tensor:
        self.wait()
        flat = self.flat
        if self.fp32 and flat.wire is not flat.grads:
            flat.wire[self.start:self.stop].copy_(flat.grads[self.start:self.stop])
        return flat.wire


class FlatParams:
    """Parameters laid out as ``layout`` describes (the order of the optimizer's param groups)."""

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str], groups: Sequence[int],
                 aliases: Sequence[tuple[str, ...]], num_groups: int, wire_dtype=torch.float32,
                 shared: bool = False, bucket: str | None = None):
        """``shared``: put the host vectors in a shared-memory segment (``runtime/shm.py``) that shard
        servers on this host read and write directly; where /dev/shm cannot hold it, plain memory.
        ``bucket``: "host", "device" or "copy" (default: what the parameters allow, ``bucket_kind``)."""
        self.params = list(params)
        self.layout = Layout.from_shapes(
            [(n, tuple(p.shape), str(p.dtype).removeprefix("torch."), g, a)
             for p, n, g, a in zip(self.params, names, groups, aliases)], num_groups)
        self.kind = bucket or bucket_kind(self.params)
        if self.kind not in BUCKETS or (self.kind != "copy" and bucket_kind(self.params) == "copy") or \
                (self.kind == "host" and bucket_kind(self.params) != "host"):
            raise ValueError(f"cannot hold these parameters in a {self.kind!r} bucket")
        self.device = self.params[0].device if self.params else torch.device("cpu")
        numel = self.layout.numel
        self._host_device = self.device if self.kind == "device" else torch.device("cpu")  # pin for device copies
        self._host_vectors(shared)
        # The push's wire buffer: the fp32 grads themselves, or a bf16/fp16 copy of them.
        self.wire = self.grads if wire_dtype == torch.float32 else empty_host(numel, wire_dtype, self._host_device)
        self.bound = self.kind != "copy"  # parameters and gradients are views into the buckets
        if self.kind == "device":
            dtype = self.params[0].dtype
            self.bucket_grads = torch.zeros(numel, dtype=dtype, device=self.device)
            self.bucket_values = torch.zeros(numel, dtype=dtype, device=self.device)
        else:
            self.bucket_grads, self.bucket_values = self.grads, self.values
        self._copier = Copier(self.device) if self.kind == "device" else None
        self._fence = None  # the caller's stream at the start of the step's pushes (CUDA)
        self._lock = threading.Lock()
        self.touched = [False] * len(self.params)  # backward wrote a gradient since zero_grad(set_to_none=True)
        # A frozen parameter (requires_grad=False) gets its hook when it is unfrozen (``_settle``).
        self._hooks = {i: p.register_post_accumulate_grad_hook(self._toucher(i))
                       for i, p in enumerate(self.params) if p.requires_grad}
        if self.bound:
            self._bind()
        self._stride = max(1, numel // CHECK_SAMPLES)
        self._check = None

    def _host_vectors(self, shared: bool) -> None:
        """Allocate ``grads`` and ``values`` (fp32, host): in a new shared-memory segment with
        ``shared`` (zeroed by the kernel; the memory the servers map), else in plain memory."""
        numel = self.layout.numel
        self.segment = None
        if shared:
            try:
                self.segment = Segment.create(numel)
            except ShmUnavailable as exc:
                log.info("no shared memory for this worker's pushes (they go over the network): %s", exc)
        if self.segment is not None:
            self.grads, self.values = self.segment.grads, self.segment.values
            self._registered = Registered([self.grads, self.values], self._host_device)
        else:
            self.grads = empty_host(numel, torch.float32, self._host_device)  # flat gradients, host
            self.values = empty_host(numel, torch.float32, self._host_device)  # flat parameters, host
            self._registered = Registered([], self._host_device)

    @torch.no_grad()
    def renew_segment(self) -> None:
        """Move the host vectors into a new shared-memory segment (plain memory if none can be
        made) and unlink the old one. A server whose push call this worker gave up on (a paused or
        partitioned primary, a call cut by a move) may still write its reply into the old segment
        at any later time; after this, nothing it writes reaches the model. The gradients move
        along; the values are copied too, but may hold such a write: pull next."""
        self.quiesce()
        old, old_grads, old_values = self.segment, self.grads, self.values
        grad_views = [p.grad is not None and self._is_view(p.grad, e) for p, e in zip(self.params, self.layout.params)]
        self._registered.close()
        self._host_vectors(shared=True)
        self.grads.copy_(old_grads)
        self.values.copy_(old_values)
        if self.wire is old_grads:
            self.wire = self.grads
        if self.kind != "device":
            self.bucket_grads, self.bucket_values = self.grads, self.values
        if self.kind == "host":  # the parameters and their gradients are views into the new vectors
            for p, e, grad_view in zip(self.params, self.layout.params, grad_views):
                p.data = self.values[e.offset:e.stop].view(p.shape)
                if grad_view:
                    p.grad = self.grads[e.offset:e.stop].view(p.shape)
        if old is not None:
            old.unlink()
            del old_grads, old_values  # (the mapping goes once no view of it is left)
            old.close()

    @property
    def exposed(self) -> bool:
        """Whether a server may still write into the segment after its caller gave up (``Segment.exposed``)."""
        return self.segment is not None and self.segment.exposed

    def _toucher(self, index: int):
        def touched(param):
            self.touched[index] = True
        return touched

    @torch.no_grad()
    def _bind(self) -> None:
        """Make every parameter a view into the value bucket (keeping its current values), and
        every trainable one's gradient a view into the gradient bucket."""
        for i, (p, e) in enumerate(zip(self.params, self.layout.params)):
            view = self.bucket_values[e.offset:e.stop]
            view.copy_(p.reshape(-1))
            p.data = view.view(p.shape)
            if p.grad is not None:
                self.bucket_grads[e.offset:e.stop].copy_(p.grad.reshape(-1))
                self.touched[i] = True
            if p.requires_grad:  # attached from the start (zeros), so even the first backward accumulates in place
                p.grad = self.bucket_grads[e.offset:e.stop].view(p.shape)

    def close(self) -> None:
        for h in self._hooks.values():
            h.remove()
        if self._copier is not None:
            self._copier.drain()
        self._registered.close()
        if self.segment is not None:  # the memory stays mapped (a host model's tensors live in it); the name goes
            self.segment.unlink()

    def zero_grads(self, set_to_none: bool = True) -> None:
        """Zero the gradient bucket in place; bound gradients stay attached as views. With
        ``set_to_none`` every parameter counts as having no gradient until backward writes one."""
        self.bucket_grads.zero_()
        for p, e in zip(self.params, self.layout.params):
            if p.grad is not None and not self._is_view(p.grad, e):
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        if set_to_none:
            self.touched = [False] * len(self.params)

    def _is_view(self, t: torch.Tensor, e) -> bool:
        return self.bound and t.data_ptr() == self.bucket_grads[e.offset:].data_ptr() and t.numel() == e.numel

    def has_grad(self, index: int) -> bool:
        """Whether parameter ``index`` has a gradient, as torch would see ``p.grad``."""
        p, e = self.params[index], self.layout.params[index]
        if p.grad is None:
            return False
        return not self._is_view(p.grad, e) or self.touched[index]

    def grad_mask(self, start: int, stop: int) -> bytes:
        """``StepOptions.grad_mask`` for the shard [start, stop): its pieces that have a gradient."""
        return mask_of([self.has_grad(piece.index) for piece in self.layout.pieces(start, stop)])

    def _views(self, flat: torch.Tensor):
        for p, e in zip(self.params, self.layout.params):
            yield p, flat[e.offset:e.stop]

    def params_in(self, start: int, stop: int) -> list[int]:
        """Indices of the parameters with at least one element in [start, stop)."""
        return [i for i, e in enumerate(self.layout.params) if e.offset < stop and e.stop > start]

    @torch.no_grad()
    def _settle(self, start: int, stop: int) -> None:
        """Make the gradient bucket hold, over [start, stop), what torch would see as ``.grad``:
        zeros for a None (or never written) gradient, a gradient autograd replaced copied in and
        re-attached as a view."""
        for i in self.params_in(start, stop):
            p, e = self.params[i], self.layout.params[i]
            view = self.bucket_grads[e.offset:e.stop]
            if p.grad is None:
                view.zero_()
            elif p.grad.is_sparse:
                raise ValueError("sparse gradients are not supported; use dense embeddings")
            elif not self._is_view(p.grad, e):
                view.copy_(p.grad.detach().reshape(-1))
                if self.bound and p.requires_grad:  # re-attach: the next backward accumulates into the bucket
                    p.grad = view.view(p.shape)
                    self.touched[i] = True
                    if i not in self._hooks:  # frozen when the optimizer was built, unfrozen since: the
                        # hook notes the next backwards (without it they would count as "no gradient")
                        self._hooks[i] = p.register_post_accumulate_grad_hook(self._toucher(i))
            elif not self.touched[i]:
                view.zero_()  # a bound gradient backward never wrote counts as None: push zeros

    def stage_grads(self, start: int, stop: int, shm: bool = False) -> Staged:
        """Start moving the gradients of [start, stop) into host memory for a push: the fp32
        ``grads`` when the push goes through shared memory (``shm``), else the wire buffer. On a
        CUDA device the cast and the copy are queued on the copy stream and this returns at once;
        the push thread waits for them (``Staged.wait``)."""
        self._settle(start, stop)
        if self.kind != "device":
            return Staged(self, start, stop, fp32=True)  # the push thread casts to the wire dtype, if any
        fp32 = shm or self.wire is self.grads
        host = self.grads if fp32 else self.wire
        return Staged(self, start, stop, fp32, self._copier.to_host(host[start:stop], self.bucket_grads[start:stop]))

    def gather_grads(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Copy the gradients of [start, stop) into the wire buffer (zeros for a None grad) and
        return the whole wire buffer (its [start, stop) part is fresh)."""
        stop = self.layout.numel if stop is None else stop
        return self.stage_grads(start, stop).wire()

    def all_finite(self) -> bool:
        """Whether every gradient the model holds is finite (GradScaler's overflow test)."""
        pairs = [(p.grad, e) for p, e in zip(self.params, self.layout.params) if p.grad is not None]
        if self.bound and pairs and all(self._is_view(g, e) for g, e in pairs):
            return bool(torch.isfinite(self.bucket_grads).all())  # one kernel, one sync
        return all(bool(torch.isfinite(g).all()) for g, _ in pairs)

    def gather_params(self) -> torch.Tensor:
        """Copy the model's current parameters into ``values`` (fp32)."""
        self.quiesce()
        if self.kind == "device":
            self.values.copy_(self.bucket_values)
        elif self.kind == "copy":
            for p, view in self._views(self.values):
                view.copy_(p.detach().reshape(-1))
        return self.values

    def fence(self) -> None:
        """Mark the start of a step's pushes: replies are copied to the device only after what the
        caller's stream queued before this (the step's forward and backward read the parameters)."""
        if self._copier is not None:
            self._fence = self._copier.mark()

    def scatter_range(self, start: int, stop: int) -> None:
        """A reply for [start, stop) landed in ``values``: start copying it to the device (CUDA:
        asynchronously, while other shards' replies still arrive). Called from push threads."""
        if self.kind == "device":
            with self._lock:
                self._copier.to_device(self.bucket_values[start:stop], self.values[start:stop], self._fence)

    def quiesce(self) -> None:
        """Wait until no copy reads ``values`` or writes ``grads`` any more: call before anything
        but a push's reply writes ``values`` (a pull)."""
        if self._copier is not None:
            self._copier.drain()

    @torch.no_grad()
    def scatter_params(self, ranges_done: bool = False) -> None:
        """Make the model's parameters ``values`` and remember a sample of them, to notice edits
        made behind the optimizer's back. ``ranges_done``: every range already went through
        ``scatter_range`` (a step's replies); else all of ``values`` is copied (a pull)."""
        if self.kind == "device":
            if not ranges_done:
                self.fence()  # after whatever the caller's stream still has queued
                self.scatter_range(0, self.layout.numel)
            self._copier.publish()  # the caller's stream waits for the copies; the host does not
        elif self.kind == "copy":
            for p, view in self._views(self.values):
                p.copy_(view.view(p.shape))
        self._check = self._sample()

    def _sample(self) -> torch.Tensor:
        if self.bound:
            return self.bucket_values[::self._stride].clone()
        return torch.stack([p.detach().reshape(-1)[::max(1, p.numel() // 64)].float().sum() for p in self.params]).cpu()

    def changed_since_scatter(self) -> bool:
        """Whether the model's parameters differ from what the shards last sent (sampled: a
        change to a few elements may go unnoticed; any wholesale edit or load is noticed)."""
        return self._check is not None and not torch.equal(self._sample(), self._check)
