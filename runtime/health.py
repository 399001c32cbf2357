"""The standard grpc.health.v1 service, served so that no caller can freeze the server through it.

grpcio-health-checking's own ``HealthServicer`` answers Watch without a thread: it registers
a callback with ``context.add_callback`` and calls into gRPC from ``set()`` under its lock.
A burst of short-deadline Watch calls then deadlocks it (the close callback, run by gRPC's
dispatch thread under the call's lock, waits for the servicer's lock, while ``set`` or a new
Watch holds that and waits for a call's lock), and the whole role stops answering.
Here nothing holds a lock while calling into gRPC:

- ``Check``/``List`` read a dict (NOT_FOUND for an unknown service, as the protocol says).
- ``Watch`` is a plain streaming handler: it sends the current status, then each change,
  waking at least every ``poll_s`` to see whether its caller is still there
  (``context.is_active()``). Each open Watch holds a handler thread, so at most ``max_watches``
  are open at once and ``watches_per_caller`` from one host; one more is refused at once
  with RESOURCE_EXHAUSTED (probes use Check; a Watch client retries with backoff).

    health = HealthService()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health.set("shardps.v1.ShardService", health_pb2.HealthCheckResponse.SERVING)
"""
from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .limits import CallerSlots, peer_host

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
MAX_WATCHES = 4  # open Watch streams per server: each holds a handler thread from the reserve
WATCHES_PER_CALLER = 2


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, max_watches: int = MAX_WATCHES, watches_per_caller: int = WATCHES_PER_CALLER,
                 poll_s: float = 0.5):
        self._statuses: dict[str, int] = {"": SERVING}
        self._changed = threading.Condition()  # guards _statuses; notified on every change
        self._shutting_down = False
        self.watches = CallerSlots(max_watches, watches_per_caller, "health watches")
        self.poll_s = poll_s

    def set(self, service: str, status: int) -> None:
        """Set ``service``'s status ("" is the whole server); ignored after ``enter_graceful_shutdown``."""
        with self._changed:
            if self._shutting_down:
                return
            self._statuses[service] = status
            self._changed.notify_all()

    def enter_graceful_shutdown(self) -> None:
        """Every service reports NOT_SERVING from now on, whatever ``set`` says later."""
        with self._changed:
            self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)
            self._shutting_down = True
            self._changed.notify_all()

    def status(self, service: str = "") -> int | None:
        with self._changed:
            return self._statuses.get(service)

    def Check(self, request, context):
        status = self.status(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no service {request.service[:200]!r} here")
        return health_pb2.HealthCheckResponse(status=status)

    def List(self, request, context):
        with self._changed:
            statuses = dict(self._statuses)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=s) for name, s in statuses.items()})

    def Watch(self, request, context):
        caller = peer_host(context.peer())
        refusal = self.watches.acquire(caller)
        if refusal:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            sent = None
            while context.is_active():
                with self._changed:
                    status = self._statuses.get(request.service, UNKNOWN)
                    if status == sent:  # nothing new: wait for a change, or to look at the caller again
                        self._changed.wait(min(self.poll_s, max(0.01, context.time_remaining())))
                        status = self._statuses.get(request.service, UNKNOWN)
                if status != sent:
                    yield health_pb2.HealthCheckResponse(status=status)  # outside the lock: gRPC may block here
                    sent = status
        finally:
            self.watches.release(caller)
