"""Channels every role and client opens: options, credentials, the health probe.

Keepalive is configured on both sides together (a client pinging faster than the
server allows gets GOAWAY "too_many_pings"), so the server's options live here too;
``so_reuseport`` is off so two servers can never silently share a port. Servers are
built in ``runtime.server``; errors become statuses and back in ``runtime.status``.
"""
from __future__ import annotations

import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .security import Security, secure

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
    """A channel to ``address`` with the cluster's credentials (``runtime.security.Security``; None:
    from the SHARDPS_AUTH_TOKEN / SHARDPS_TLS_* environment, so every tool works against a
    secured cluster when its environment is set)."""
    return secure(grpc, address, security if security is not None else Security.from_env(),
                  channel_options(max_message_bytes))


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


def port_refuses(address: str, timeout: float) -> bool:
    """Whether a fresh TCP connection to ``address`` (``host:port``) is refused now: nothing listens on
    the port, so the server's process is gone. Told by the connect's errno (ECONNREFUSED), never by a
    message's words. False when the connection opens (a live, maybe stuck, server), when it times out
    or the host is unreachable (paused, partitioned: not known dead), and for non-TCP targets. Blocks at
    most ``timeout`` seconds."""
    target = address.split("///", 1)[-1]
    if address.startswith("unix:") or ":" not in target:
        return False
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except (OSError, ValueError):
        return False
