"""Bounded resources for every role's gRPC server: long waits are capped, stalled streams end.

A thread-pool gRPC server parks one thread per call that waits (a membership watch,
a pull for a version not reached yet, a checkpoint of a future version). Unbounded,
a few dozen of them, or a client that opens an upload and never sends the rest, hold
every thread and health checks stop answering. So:

- ``WaitSlots``: at most ``limit`` calls of a kind wait at once; one more is answered
  at once with UNAVAILABLE (clients back off and retry), never queued behind the others.
- ``Watchdog`` + ``IdleStreamInterceptor``: a request stream that sends nothing for
  ``idle_s`` is cancelled, which frees its handler thread.

    slots = WaitSlots(8, "pulls waiting for a version")
    with slots.slot():
        state.cond.wait_for(...)
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time

import grpc

from .errors import Unavailable


class WaitSlots:
    def __init__(self, limit: int, what: str):
        self.limit, self.what = limit, what
        self._free = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def slot(self):
        if not self._free.acquire(blocking=False):
            raise Unavailable(f"{self.limit} {self.what} are pending on this server already (its limit); retry shortly")
        try:
            yield
        finally:
            self._free.release()


class Watchdog:
    """Cancels calls whose armed deadline passed: one daemon thread for the whole server."""

    def __init__(self, tick: float = 0.5):
        self._armed: dict[int, tuple[float, object]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.cancelled = 0
        threading.Thread(target=self._run, args=(tick,), name="shardps-watchdog", daemon=True).start()

    def arm(self, context, seconds: float) -> int:
        token = next(self._ids)
        with self._lock:
            self._armed[token] = (time.monotonic() + seconds, context)
        return token

    def disarm(self, token: int) -> None:
        with self._lock:
            self._armed.pop(token, None)

    def _run(self, tick: float) -> None:
        while True:
            time.sleep(tick)
            now = time.monotonic()
            with self._lock:
                due = [(t, ctx) for t, (deadline, ctx) in self._armed.items() if deadline <= now]
                for t, _ in due:
                    del self._armed[t]
            for _, ctx in due:
                self.cancelled += 1
                ctx.cancel()


class IdleStreamInterceptor(grpc.ServerInterceptor):
    """Cancels a request stream that sends nothing for ``idle_s`` seconds."""

    def __init__(self, watchdog: Watchdog, idle_s: float):
        self.watchdog, self.idle_s = watchdog, idle_s

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not handler.request_streaming:
            return handler
        kind = "stream_stream" if handler.response_streaming else "stream_unary"
        behavior = getattr(handler, kind)

        def guarded(request_iterator, context):
            return behavior(self._guard(request_iterator, context), context)

        return handler._replace(**{kind: guarded})

    def _guard(self, requests, context):
        it = iter(requests)
        while True:
            token = self.watchdog.arm(context, self.idle_s)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.watchdog.disarm(token)
            yield item
