"""Push while backward runs: each shard's push starts once backward has finalised every
gradient in its range (``Tensor.register_post_accumulate_grad_hook``), as DDP starts
all-reducing a bucket once its gradients are ready.

Backward finishes the last layers first, and the shard plan puts them on the last
shards, so shard S-1's push overlaps the backward of the layers before it. The
push streams its gradient right away and ends with a PushCommit carrying the step's
options (batch size, hyper-parameters, which pieces have gradients, an fp16
overflow, clipping), which ``clip_grad_norm_()`` or ``step()`` supplies; the server
waits for it, so sample weights stay exact. For gradient accumulation, wrap the
micro-batches' backward in ``opt.no_sync()`` (DDP's API): hooks then push nothing.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future
from typing import Callable

from ..proto.errors import WaitTimeout
from ..proto.gen import shardps_pb2 as pb
from .flat import FlatParams
from .ps_client import ClipExchange, PSClient


class _Commit:
    """The trailing options of one in-flight push; ``wait`` blocks until ``set``."""

    def __init__(self, timeout: float):
        self._event, self._value, self._timeout = threading.Event(), None, timeout

    def set(self, value: pb.StepOptions) -> None:
        self._value = value
        self._event.set()

    def wait(self) -> pb.StepOptions:
        if not self._event.wait(self._timeout):
            raise WaitTimeout(f"step() was not called within {self._timeout:.0f}s of backward")
        return self._value


class OverlapPusher:
    def __init__(self, flat: FlatParams, ps: PSClient, timeout: float):
        self.flat, self.ps, self.timeout = flat, ps, timeout
        ranges = [(s.info.range.start, s.info.range.stop) for s in ps.shards]
        self.shard_params = [flat.params_in(a, b) for a, b in ranges]
        self.param_shards = [[k for k, members in enumerate(self.shard_params) if i in members]
                             for i in range(len(flat.params))]
        self.enabled = True
        self._lock = threading.Lock()
        self._header: pb.PushHeader | None = None
        self._base_versions: list[int] = []
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i))
                       for i, p in enumerate(flat.params) if p.requires_grad]

    def _reset(self) -> None:
        self._remaining = [len(m) for m in self.shard_params]
        self._futures: dict[int, Future] = {}
        self._commits: dict[int, _Commit] = {}
        self.exchange: ClipExchange | None = None

    def arm(self, header: pb.PushHeader, base_versions: list[int]) -> None:
        """Set what the next step's pushes carry (called after every step)."""
        self._header, self._base_versions = header, base_versions

    @property
    def started(self) -> bool:
        return bool(self._futures)

    def _hook(self, index: int):
        def ready(param):
            if not self.enabled or self._header is None:
                return
            with self._lock:
                for k in self.param_shards[index]:
                    self._remaining[k] -= 1
                    if self._remaining[k] == 0:
                        self._start(k)

        return ready

    def _start(self, k: int) -> None:
        if k in self._futures:
            return
        if self.exchange is None:  # used only if the step turns out to be clipped
            self.exchange = ClipExchange(len(self.ps.shards), self._header.step, 2.0, self.timeout)
        shard = self.ps.shards[k]
        r = shard.info.range
        grads = self.flat.stage_grads(r.start, r.stop, shm=self.ps.shm_ok[k])  # queued; the push thread waits
        commit = self._commits[k] = _Commit(self.timeout)
        self._futures[k] = self.ps.submit_push(shard, grads, self.flat.values, self._header,
                                               self._base_versions[k], commit.wait, self.exchange,
                                               landed=self.flat.scatter_range)

    def commit(self, options_for: Callable[[int], pb.StepOptions],
               norm_type: float = 2.0) -> tuple[list[Future], ClipExchange]:
        """Start the shards backward did not complete, give every push its options
        (``options_for(shard_index)``); returns the pushes' futures (in shard order) and the
        step's clip exchange."""
        with self._lock:
            for k in range(len(self.ps.shards)):
                self._start(k)
            self.exchange.norm_type = norm_type
            for k, commit in self._commits.items():
                commit.set(options_for(k))
            futures = [self._futures[k] for k in range(len(self.ps.shards))]
            exchange = self.exchange
            self._reset()
        return futures, exchange

    @contextlib.contextmanager
    def no_sync(self):
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        with self._lock:
            for commit in self._commits.values():  # let streams blocked on a commit end: batch_size 0 is
                commit.set(pb.StepOptions())       # refused, so nothing is applied
