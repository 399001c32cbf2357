"""Domain errors <-> gRPC statuses: the one mapping every servicer and client uses.

The error *types* and their reasons are the contract (``proto.errors``); this module is
how a running role sends them (``abort_with``, ``translate_errors``: a status whose
``google.rpc.ErrorInfo`` carries the reason and fields) and how a caller gets them back
(``error_from_rpc``), so no code path reads a status's message text.
"""
from __future__ import annotations

import functools
import inspect

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..proto import errors

# Trailing metadata of a status that the server's own code set once nothing of the call ran any
# more (a handler's error, a refusal, an injected fault). A status without it may come from the
# transport or the caller's deadline while the handler still runs: a push through shared memory
# may then write its reply into the worker's memory later (``runtime/shm.py``).
HANDLER_ENDED = ("x-shardps-handler", "ended")


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
    names, with its fields (a status without a reason: the class of its code). ``from_transport`` is
    set on an error no shardps handler sent (no reason, no handler-ended marker): gRPC's transport,
    the caller's own deadline, a proxy. Whether such a server is gone is asked of its port
    (``runtime.rpc.port_refuses``), never of the status's words."""
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    info = failure_info(exc)
    cls = errors.BY_REASON.get(errors.Reason.from_wire(info.reason)) if info is not None else None
    details = exc.details() or ""
    values = info.metadata if info is not None else {}
    if cls is None:
        cls = errors.BY_CODE.get(name, errors.ShardpsError)
    err = cls.from_wire(f"{what}: {name}: {details}", values)
    err.code = name
    err.from_transport = info is None and not handler_ended(exc)
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
