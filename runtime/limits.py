"""Bounded resources for every role's gRPC server: long waits are capped, stalled streams end.

A thread-pool gRPC server parks one thread per call that waits (a membership watch,
a pull for a version not reached yet, a checkpoint of a future version). Unbounded,
a few dozen of them, or a client that opens an upload and never sends the rest, hold
every thread and health checks stop answering. So:

- ``WaitSlots``: at most ``limit`` calls of a kind wait at once; one more is answered
  at once with UNAVAILABLE (clients back off and retry), never queued behind the others.
- ``CallerSlots``: the same, plus at most ``per_caller`` of them from one caller (the
  peer's host), so one machine cannot take what the others need.
- ``Watchdog`` + ``IdleStreamInterceptor``: a request stream that sends no first message
  within ``first_s`` (a few seconds), or nothing more for ``idle_s``, is cancelled, which
  frees its handler thread.

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

from ..proto.defaults import FIRST_MESSAGE_S  # every shardps client sends a stream's first message at once
from ..proto.errors import Unavailable


def peer_host(peer: str) -> str:
    """The calling machine from ``context.peer()`` ("ipv4:10.0.0.5:41234" -> "10.0.0.5",
    "ipv6:[::1]:5000" -> "::1"); a unix socket's peer is the socket path."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


class CallerSlots:
    """At most ``limit`` holders at once and at most ``per_caller`` from one caller; ``acquire``
    never blocks (it returns why it refused, for the caller's status message)."""

    def __init__(self, limit: int, per_caller: int, what: str, state: str = "open"):
        self.limit, self.per_caller, self.what, self.state = limit, per_caller, what, state
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self.total = 0
        self.refused = 0

    def acquire(self, caller: str) -> str:
        """"" when a slot was taken (``release`` it), else the reason it was refused."""
        with self._lock:
            mine = self._held.get(caller, 0)
            if self.total >= self.limit:
                reason = f"{self.limit} {self.what} are {self.state} on this server already (its limit)"
            elif mine >= self.per_caller:
                reason = f"{self.per_caller} {self.what} from {caller} are {self.state} already (the limit per caller)"
            else:
                self._held[caller] = mine + 1
                self.total += 1
                return ""
            self.refused += 1
            return reason + "; retry shortly"

    def release(self, caller: str) -> None:
        with self._lock:
            self.total -= 1
            left = self._held[caller] - 1
            if left:
                self._held[caller] = left
            else:
                del self._held[caller]


class WaitSlots:
    """``CallerSlots`` for one kind of wait, whoever calls: one too many raises Unavailable."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what = limit, what
        self._slots = CallerSlots(limit, limit, what, state="pending")

    @property
    def in_use(self) -> int:
        """Slots held now."""
        return self._slots.total

    @contextlib.contextmanager
    def slot(self):
        refusal = self._slots.acquire("")
        if refusal:
            raise Unavailable(refusal)
        try:
            yield
        finally:
            self._slots.release("")


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
    """Cancels a request stream that sends no first message within ``first_s`` seconds of its
    handler starting, or nothing more for ``idle_s`` seconds after a message."""

    def __init__(self, watchdog: Watchdog, idle_s: float, first_s: float = FIRST_MESSAGE_S):
        self.watchdog, self.idle_s, self.first_s = watchdog, idle_s, first_s

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
        it, wait = iter(requests), self.first_s
        while True:
            token = self.watchdog.arm(context, wait)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.watchdog.disarm(token)
            wait = self.idle_s
            yield item
