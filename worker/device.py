"""Moving bytes between an accelerator and host memory without stalling it.

A CUDA worker's flat gradient and parameter buckets live on the GPU; the host side
of each push and reply is one flat fp32 (or wire-dtype) vector. This module owns the
device-specific parts, so that ``flat.py`` reads the same for every device:

* ``pin``: host buffers the GPU copies into are page-locked, so copies run at full
  DMA speed and asynchronously. A fresh buffer is allocated pinned; memory that
  already exists (the same-host shared-memory segment, ``runtime/shm.py``) is
  registered in place with ``cudaHostRegister``, so a gradient goes from the GPU
  straight into the memory the shard servers read. Pinning is an optimisation:
  where it fails (no CUDA, a locked-memory limit) the copy is synchronous.
* ``Copier``: copies on a stream of their own (CUDA), ordered after the work the
  caller's stream has queued so far, and an event per copy to wait on. On CPU and
  MPS devices the copy is synchronous and the event is None.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("shardps.worker")


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def empty_host(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed host buffer, page-locked when ``device`` is a CUDA device."""
    if is_cuda(device):
        try:
            return torch.zeros(numel, dtype=dtype, pin_memory=True)
        except RuntimeError as exc:  # e.g. RLIMIT_MEMLOCK in a container
            log.info("host buffer not pinned (%s): device copies are synchronous", exc)
    return torch.zeros(numel, dtype=dtype)


class Registered:
    """Existing host memory (a tensor's storage) page-locked in place for CUDA copies; ``close``
    unregisters it. Does nothing, and says so in the log, where CUDA cannot register it."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device):
        self._ptrs: list[int] = []
        if not is_cuda(device):
            return
        cudart = torch.cuda.cudart()
        for t in tensors:
            if t.numel() == 0:
                continue
            try:  # 1: cudaHostRegisterPortable (every CUDA context may use it)
                err = int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1))
            except (RuntimeError, AttributeError) as exc:
                log.info("shared memory not registered with CUDA (%s): device copies are synchronous", exc)
                continue
            if err != 0:
                log.info("shared memory not registered with CUDA (cudaError %d): device copies are synchronous", err)
                continue
            self._ptrs.append(t.data_ptr())

    def close(self) -> None:
        if self._ptrs:
            cudart = torch.cuda.cudart()
            for ptr in self._ptrs:
                cudart.cudaHostUnregister(ptr)
            self._ptrs = []


class Copier:
    """Host <-> device copies for one device: asynchronous on a CUDA stream of their own, else
    synchronous. Each ``to_host``/``to_device`` returns an event (None: already done) and keeps
    any temporary it made alive until that event is waited for."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if is_cuda(device) else None

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> "Pending":
        """``dst`` (host) <- ``src`` (device), cast to ``dst``'s dtype on the device first."""
        if self.stream is None:
            dst.copy_(src)
            return Pending()
        ready = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            tmp = src.to(dst.dtype) if src.dtype != dst.dtype else src  # the cast runs on the GPU
            dst.copy_(tmp, non_blocking=True)
            return Pending(self.stream.record_event(), tmp)

    def to_device(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """``dst`` (device) <- ``src`` (host, fp32), cast to ``dst``'s dtype on the device; on CUDA
        queued after ``after`` and made visible to the caller's stream by ``publish``."""
        if self.stream is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            if dst.dtype == src.dtype:
                dst.copy_(src, non_blocking=True)
            else:
                dst.copy_(src.to(self.device, non_blocking=True))  # the cast runs on the GPU

    def mark(self) -> torch.cuda.Event | None:
        """An event at the end of what the caller's stream has queued so far."""
        return torch.cuda.current_stream(self.device).record_event() if self.stream is not None else None

    def publish(self) -> None:
        """Make the caller's stream wait for every copy queued so far (no host wait)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def drain(self) -> None:
        """Wait (on the host) until every queued copy is done: host buffers may be written again."""
        if self.stream is not None:
            self.stream.synchronize()


class Pending:
    """A copy in flight; ``wait`` blocks the calling thread until it is done."""

    def __init__(self, event: torch.cuda.Event | None = None, keep: torch.Tensor | None = None):
        self._event, self._keep = event, keep

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = self._keep = None
