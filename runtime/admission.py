"""Admission: long calls never take the handler threads that health, status and control calls need.

A role's gRPC server has ``threads`` handler threads, and a call holds one for as long as it
runs: a sync push parks one until its step closes, a pull or a membership watch until what it
waits for happens, and a request stream until its caller sends. So calls are of two kinds:

- long: every request or response stream (Push, Pull, InitShard, LoadState) and the unary
  calls that wait (Checkpoint, WatchMembership). At most ``threads - reserve`` of them run
  at once; the ``reserve`` threads (8, the "+ 8" in the documented ``threads >= workers + 8``)
  stay free for everything else. A legal job (at most ``threads - 8`` workers, one push per
  worker per server at a time) is therefore always admitted whole, and a sync barrier can
  never be starved by the reserve.
- quick: health (its Watch has its own small cap, ``runtime.health``), AdminService, status and
  control calls (GetShardStatus, SetMembership, SetReplicas, every other coordinator call),
  and Replicate (a primary's step waits for it on its backup: refusing it there could stall a
  step whose pushes hold the long slots; only the cluster's credential may call it).

A request stream also counts against its caller's host (``streams_per_host``). The default is
the whole long capacity: a legal job may run all its workers on one host (``LocalCluster``
does, every worker at 127.0.0.1), and a lower default would refuse part of its barrier. A
server reached by several worker machines can set it lower so one machine cannot take the
others' share. Callers who send nothing cannot hold slots for long either way: a stream's
first message must come within seconds (``runtime.limits.IdleStreamInterceptor``).

One call too many is answered at once with UNAVAILABLE (the server's own status, so nothing
of it ran), which workers retry with backoff (``runtime.retry``): a brief overlap, a stream still
closing while its worker's next one arrives, costs a retry and nothing else.
"""
from __future__ import annotations

import contextlib

import grpc

from .limits import CallerSlots, peer_host
from .status import abort

RESERVE_THREADS = 8
LONG_UNARY = frozenset({"/shardps.v1.ShardService/Checkpoint", "/shardps.v1.CoordinatorService/WatchMembership"})
QUICK_PREFIXES = ("/grpc.health.v1.Health/", "/shardps.v1.AdminService/", "/shardps.v1.ShardService/Replicate")


def long_call_limit(threads: int, reserve: int = RESERVE_THREADS) -> int:
    """Long calls a server of ``threads`` handler threads runs at once (small pools keep half)."""
    return threads - min(reserve, threads // 2)


class AdmissionInterceptor(grpc.ServerInterceptor):
    def __init__(self, threads: int, streams_per_host: int = 0, reserve: int = RESERVE_THREADS):
        limit = long_call_limit(threads, reserve)
        self.long = CallerSlots(limit, limit, "long calls (streams, waits)")
        self.streams = CallerSlots(limit, streams_per_host or limit, "request streams")

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(QUICK_PREFIXES):
            return handler
        if not (handler.request_streaming or handler.response_streaming or method in LONG_UNARY):
            return handler
        kind = ("stream" if handler.request_streaming else "unary") + "_" + \
               ("stream" if handler.response_streaming else "unary")
        behavior, stream = getattr(handler, kind), handler.request_streaming

        if handler.response_streaming:
            def admitted(request, context):
                with self._admit(context, stream):
                    yield from behavior(request, context)
        else:
            def admitted(request, context):
                with self._admit(context, stream):
                    return behavior(request, context)

        return handler._replace(**{kind: admitted})

    @contextlib.contextmanager
    def _admit(self, context, stream: bool):
        """Hold a long-call slot (and a stream slot) for the call, or end it with UNAVAILABLE now."""
        host = peer_host(context.peer())
        refusal = self.long.acquire(host)
        if refusal:
            abort(context, grpc.StatusCode.UNAVAILABLE, refusal)
        try:
            if not stream:
                yield
                return
            refusal = self.streams.acquire(host)
            if refusal:
                abort(context, grpc.StatusCode.UNAVAILABLE, f"{refusal} (SHARDPS_STREAMS_PER_HOST sets the limit per host)")
            try:
                yield
            finally:
                self.streams.release(host)
        finally:
            self.long.release(host)
