"""gRPC plumbing every role shares: channel/server options, errors <-> status codes.

Keepalive is configured on both sides together (a client pinging faster than the
server allows gets GOAWAY "too_many_pings"). ``so_reuseport`` is off so two servers
can never silently share a port.
"""
from __future__ import annotations

import functools
import inspect
from concurrent import futures

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from . import errors
from .health import HealthService

MAX_MESSAGE_BYTES = 8 << 20  # a 1 MiB chunk plus headroom; larger messages get RESOURCE_EXHAUSTED
KEEPALIVE_MS = 10_000  # client pings an idle connection this often
KEEPALIVE_TIMEOUT_MS = 5_000  # and gives up on it after this long without an answer
MAX_RECONNECT_BACKOFF_MS = 2_000  # a restarted server is dialled again within ~2 s (gRPC's default is 120 s)
WORKER_METADATA = "x-shardps-worker"  # the calling worker's id, for fault rules that pick one worker
CONTROL_TIMEOUT_S = 10.0  # deadline of small control RPCs (register, status, membership)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def open_channel(address: str, security=None, max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A channel to ``address`` with the cluster's credentials (``proto.security.Security``; None:
    from the SHARDPS_AUTH_TOKEN / SHARDPS_TLS_* environment, so every tool works against a
    secured cluster when its environment is set)."""
    from .security import Security, secure

    return secure(grpc, address, security if security is not None else Security.from_env(),
                  channel_options(max_message_bytes))


def bind(server: grpc.Server, address: str, security=None) -> int:
    """Listen on ``address`` (TLS when the security settings have a certificate); returns the port, 0 on failure."""
    from .security import Security

    creds = (security if security is not None else Security.from_env()).server_credentials()
    return server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)


def create_server(max_threads: int, max_message_bytes: int = MAX_MESSAGE_BYTES, interceptors=()) -> grpc.Server:
    """A thread-pool gRPC server. Size ``max_threads`` for every worker that may block in a
    sync step at once, plus control calls: a smaller pool deadlocks the barrier."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="shardps-rpc"),
        options=server_options(max_message_bytes),
        maximum_concurrent_rpcs=None,
        interceptors=list(interceptors),
    )


def add_health(server: grpc.Server, service_names: list[str]):
    """Standard grpc.health.v1 service (``proto.health.HealthService``: no caller can freeze it);
    every named service and "" report SERVING. Returns it (``set``, ``enter_graceful_shutdown``)."""
    servicer = HealthService()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def check_health(address: str, timeout: float = 2.0, service: str = "", security=None) -> bool:
    """True when the server at ``address`` answers SERVING within ``timeout`` seconds."""
    with open_channel(address, security) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# Trailing metadata of a status that the server's own code set once nothing of the call ran any
# more (a handler's error, a refusal, an injected fault). A status without it may come from the
# transport or the caller's deadline while the handler still runs: a push through shared memory
# may then write its reply into the worker's memory later (``proto/shm.py``).
HANDLER_ENDED = ("x-shardps-handler", "ended")
# How gRPC's transport words a port that refuses connections, or a connection lost mid-call (the
# server's process died): such a status becomes errors.ConnectionLost.
CONNECTION_REFUSED = "Connection refused"
CONNECTION_LOST = (CONNECTION_REFUSED, "Connection reset", "Socket closed", "Broken pipe")


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str, metadata=()):
    """End the call with ``code``, saying that its handler ran to its end (or never ran);
    ``metadata``: more trailing metadata (a domain error's reason, from ``abort_with``)."""
    context.set_trailing_metadata((HANDLER_ENDED, *metadata))
    context.abort(code, details)


def handler_ended(exc: grpc.RpcError) -> bool:
    """Whether a failed call's server said that nothing of the call runs there any more."""
    return any((key, value) == HANDLER_ENDED for key, value in _trailers(exc))


def _trailers(exc: grpc.RpcError) -> tuple:
    try:
        return tuple(exc.trailing_metadata() or ())
    except Exception:  # noqa: BLE001 - an error raised before the call started has none
        return ()


def abort_with(context: grpc.ServicerContext, exc: errors.ShardpsError):
    """Translate a domain error into its gRPC status (the one mapping, used by every servicer): the
    message for people, and a google.rpc.Status whose ErrorInfo carries the error's reason and
    fields for the code that acts on it (``error_from_rpc``)."""
    code, message = getattr(grpc.StatusCode, exc.code), str(exc)
    info = error_details_pb2.ErrorInfo(reason=errors.Reason.wire(exc.reason), domain=errors.DOMAIN,
                                       metadata={name: str(value) for name, value in exc.values().items()})
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    abort(context, code, message, rpc_status.to_status(status).trailing_metadata)


def failure_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The shardps ErrorInfo a failed call's status carries (None: a status without one, from the
    transport, a deadline, an interceptor or an injected fault, or one whose details do not match it)."""
    try:
        status = rpc_status.from_call(exc)
    except Exception:  # noqa: BLE001 - no trailers (failed before it started), details that do not parse or match
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == errors.DOMAIN:
            return info
    return None


def error_from_rpc(exc: grpc.RpcError, what: str) -> errors.ShardpsError:
    """A domain error for a failed call, keeping the server's own message: the class its reason
    names, with its fields (a status without a reason: the class of its code)."""
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    info = failure_info(exc)
    cls = errors.BY_REASON.get(errors.Reason.from_wire(info.reason)) if info is not None else None
    details = exc.details() or ""
    values = info.metadata if info is not None else {}
    if cls is None and name == "UNAVAILABLE" and any(words in details for words in CONNECTION_LOST):
        cls, values = errors.ConnectionLost, {"refused": str(int(CONNECTION_REFUSED in details))}
    if cls is None:
        cls = errors.BY_CODE.get(name, errors.ShardpsError)
    err = cls.from_wire(f"{what}: {name}: {details}", values)
    err.code = name
    return err


def translate_errors(method):
    """Servicer-method decorator: domain errors become gRPC statuses (the one mapping).

    Works for unary handlers and for generator handlers (server-streaming replies).
    """
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except errors.ShardpsError as exc:
                abort_with(context, exc)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except errors.ShardpsError as exc:
            abort_with(context, exc)

    return unary
