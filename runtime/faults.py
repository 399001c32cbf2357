"""RPC fault injection, the hook every role's server carries: rules that delay, abort or drop calls.

It is runtime, not the fault lab: the interceptor runs inside every coordinator and shard
server (``runtime.server.role_server`` installs it), in the path of every call. The lab
(``chaos/``: control, scenarios, network faults, reports) sets its rules from outside,
through the AdminService served here.

The shape follows gRPC's fault-injection design (gRFC A33): a rule matches calls
by method and (optionally) calling worker, fires with a probability, and a cap
bounds how many calls it holds or fails at once. Every role (coordinator, shard
server) installs ``FaultInterceptor`` and serves ``AdminServicer``, so
``shardps chaos rpc ...`` can switch faults on and off while a job runs. Admin
calls and health checks are never faulted (otherwise a fault could not be
cleared).

Kinds:
- ``delay``: hold the call ``delay_s`` seconds, then run it.
- ``abort``: fail it with ``status`` (before it runs, or with ``after`` once it ran:
  its effect happened and only the reply is lost, which is what makes retries
  dangerous and exactly-once necessary).
- ``drop``: never answer; the call is held until the caller's deadline passes
  (with ``after``: it runs first).

    injector = FaultInjector()
    injector.add(FaultRule(kind="abort", method="Push", status="UNAVAILABLE", probability=0.5, after=True))
    server = grpc.server(pool, interceptors=[FaultInterceptor(injector)])   # role_server does this
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import grpc

from ..proto.errors import InvalidArgument
from ..proto.gen import shardps_pb2 as pb
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from .rpc import WORKER_METADATA
from .status import abort, translate_errors

log = logging.getLogger("shardps.faults")

KINDS = ("delay", "abort", "drop")
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/shardps.v1.AdminService/")
MAX_HOLD_S = 600.0  # a dropped call with no deadline is held at most this long


@dataclass
class FaultRule:
    kind: str
    method: str = "*"  # RPC name, or "*" for every call
    worker_id: int | None = None  # only calls from this worker
    probability: float = 1.0
    delay_s: float = 0.0
    status: str = "UNAVAILABLE"  # for abort
    after: bool = False  # run the call, then lose its reply
    max_active: int = 0  # concurrent faults of this rule (0: no cap)
    max_count: int = 0  # faults in total (0: no limit)
    duration_s: float = 0.0  # expire this long after being added (0: never)
    id: int = 0
    injected: int = 0
    active: int = field(default=0, repr=False)
    expires: float = field(default=0.0, repr=False)  # monotonic time; 0: never

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidArgument(f"fault kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 < self.probability <= 1:
            raise InvalidArgument(f"fault probability must be in (0, 1], got {self.probability}")
        if self.kind == "abort" and (self.status not in grpc.StatusCode.__members__ or self.status == "OK"):
            raise InvalidArgument(f"abort needs a gRPC status code name such as UNAVAILABLE, got {self.status!r}")
        if self.kind == "delay" and self.delay_s <= 0:
            raise InvalidArgument("a delay fault needs delay_s > 0")
        if min(self.delay_s, self.max_active, self.max_count, self.duration_s) < 0:
            raise InvalidArgument("delay_s, max_active, max_count and duration_s must be >= 0")
        self.method = self.method or "*"

    def matches(self, method: str, worker_id: int | None) -> bool:
        return (self.method in ("*", method)) and (self.worker_id is None or self.worker_id == worker_id)


class FaultInjector:
    """The active rules of one role, and counters of what they injected. Thread-safe."""

    def __init__(self):
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()
        self._next_id = 1
        self.injected: Counter = Counter()  # "kind/method" -> faults injected, ever
        self._random = random.Random()

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            rule = replace(rule, id=self._next_id, injected=0, active=0,
                           expires=time.monotonic() + rule.duration_s if rule.duration_s else 0.0)
            self._next_id += 1
            self._rules.append(rule)
            log.warning("fault rule %d added: %s", rule.id, rule)
            return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[FaultRule]:
        with self._lock:
            self._expire()
            return [replace(r) for r in self._rules]

    def _expire(self) -> None:
        now = time.monotonic()
        self._rules = [r for r in self._rules
                       if not (r.expires and now >= r.expires) and not (r.max_count and r.injected >= r.max_count)]

    def pick(self, method: str, worker_id: int | None) -> list[FaultRule]:
        """The rules that fire for this call (each marked active until ``release``)."""
        if not self._rules:
            return []
        with self._lock:
            self._expire()
            fired = []
            for rule in self._rules:
                if not rule.matches(method, worker_id):
                    continue
                if rule.max_active and rule.active >= rule.max_active:
                    continue
                if self._random.random() >= rule.probability:
                    continue
                rule.active += 1
                rule.injected += 1
                self.injected[f"{rule.kind}/{method}"] += 1
                fired.append(rule)
            return fired

    def counts(self) -> dict[str, int]:
        """A copy of the injected counters ("kind/method" -> faults), for metrics."""
        with self._lock:
            return dict(self.injected)

    def release(self, fired: list[FaultRule]) -> None:
        with self._lock:
            for rule in fired:
                rule.active -= 1


def _worker_of(details: grpc.HandlerCallDetails) -> int | None:
    for key, value in details.invocation_metadata or ():
        if key == WORKER_METADATA:
            try:
                return int(value)
            except ValueError:
                return None
    return None


class FaultInterceptor(grpc.ServerInterceptor):
    """Applies the injector's rules to every call except admin and health calls."""

    def __init__(self, injector: FaultInjector):
        self.injector = injector

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        worker = _worker_of(details)
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrap = _wrap_streaming if handler.response_streaming else _wrap_unary
                return handler._replace(**{kind: wrap(self.injector, behavior, method, worker)})
        return handler


def _before(rule: FaultRule, context) -> None:
    if rule.kind == "delay":
        time.sleep(rule.delay_s)
    elif rule.kind == "abort":
        abort(context, grpc.StatusCode[rule.status], f"fault injected by rule {rule.id}: abort {rule.status}")
    else:
        _hold(rule, context)


def _after(rule: FaultRule, context) -> None:
    if rule.kind == "abort":
        abort(context, grpc.StatusCode[rule.status],
                      f"fault injected by rule {rule.id}: reply lost ({rule.status}) after the call ran")
    elif rule.kind == "drop":
        _hold(rule, context)


def _hold(rule: FaultRule, context) -> None:
    """Never answer: wait out the caller's deadline (bounded), then end the call."""
    remaining = context.time_remaining()
    time.sleep(min(MAX_HOLD_S, remaining if remaining is not None else MAX_HOLD_S) + 0.05)
    abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"fault injected by rule {rule.id}: call dropped")


def _apply(fired: list[FaultRule], context, after: bool) -> None:
    """The faults of ``fired`` that act before the call runs (``after`` False) or after it."""
    for rule in fired:
        if rule.after == after:
            (_after if after else _before)(rule, context)


def _wrap_unary(injector: FaultInjector, behavior, method: str, worker: int | None):
    def call(request, context):
        fired = injector.pick(method, worker)
        try:
            _apply(fired, context, after=False)
            reply = behavior(request, context)
            _apply(fired, context, after=True)
            return reply
        finally:
            injector.release(fired)

    return call


def _wrap_streaming(injector: FaultInjector, behavior, method: str, worker: int | None):
    def call(request, context):
        fired = injector.pick(method, worker)
        try:
            _apply(fired, context, after=False)
            if any(rule.after for rule in fired):
                for _ in behavior(request, context):  # run it to the end, keep nothing: the reply is lost
                    pass
                _apply(fired, context, after=True)
            else:
                yield from behavior(request, context)
        finally:
            injector.release(fired)

    return call


# ---------------------------------------------------------------- messages and the admin service

def rule_to_pb(rule: FaultRule) -> pb.FaultRule:
    msg = pb.FaultRule(id=rule.id, kind=rule.kind, method=rule.method, probability=rule.probability,
                       delay_s=rule.delay_s, status=rule.status, after=rule.after, max_active=rule.max_active,
                       max_count=rule.max_count, duration_s=rule.duration_s, injected=rule.injected)
    if rule.worker_id is not None:
        msg.worker_id = rule.worker_id
    return msg


def rule_from_pb(msg: pb.FaultRule) -> FaultRule:
    return FaultRule(kind=msg.kind, method=msg.method or "*",
                     worker_id=msg.worker_id if msg.HasField("worker_id") else None,
                     probability=msg.probability or 1.0, delay_s=msg.delay_s, status=msg.status or "UNAVAILABLE",
                     after=msg.after, max_active=msg.max_active, max_count=msg.max_count, duration_s=msg.duration_s)


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, injector: FaultInjector):
        self.injector = injector

    @translate_errors
    def SetFaults(self, request, context):
        rules = [rule_from_pb(r) for r in request.add]  # all checked before anything changes
        if request.clear:
            self.injector.clear()
        for rule in rules:
            self.injector.add(rule)
        return pb.SetFaultsResponse(rules=[rule_to_pb(r) for r in self.injector.rules()])

    def GetFaults(self, request, context):
        return pb.GetFaultsResponse(rules=[rule_to_pb(r) for r in self.injector.rules()],
                                    injected=dict(self.injector.injected))
