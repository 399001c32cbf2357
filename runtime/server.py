"""The one gRPC server factory every role uses, and what a server needs besides its servicers.

``role_server`` builds a coordinator's or shard server's ``grpc.Server`` with, in call
order: credentials (``runtime.security.AuthInterceptor``), admission (``runtime.admission``:
long calls leave handler threads for health, status and control calls; a host opens at
most so many request streams), idle request streams cancelled (``runtime.limits``), and
the fault hook (``runtime.faults``: the interceptor and the AdminService that sets its
rules). ``bind`` listens with the cluster's TLS settings; ``add_health`` serves
grpc.health.v1. Tests and benchmarks that need a bare server use ``thread_pool_server``.
"""
from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..proto.defaults import FIRST_MESSAGE_S
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from .admission import AdmissionInterceptor
from .faults import AdminServicer, FaultInjector, FaultInterceptor
from .health import HealthService
from .limits import IdleStreamInterceptor, Watchdog
from .rpc import MAX_MESSAGE_BYTES, server_options
from .security import AuthInterceptor, Security

log = logging.getLogger("shardps")


def thread_pool_server(max_threads: int, max_message_bytes: int = MAX_MESSAGE_BYTES, interceptors=()) -> grpc.Server:
    """A bare thread-pool gRPC server (no credentials, limits or faults). Size ``max_threads`` for
    every worker that may block in a sync step at once, plus control calls: a smaller pool
    deadlocks the barrier."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="shardps-rpc"),
        options=server_options(max_message_bytes),
        maximum_concurrent_rpcs=None,
        interceptors=list(interceptors),
    )


def role_server(max_threads: int, max_message_bytes: int = MAX_MESSAGE_BYTES, security: Security | None = None,
                idle_s: float = 300.0, first_message_s: float = FIRST_MESSAGE_S,
                streams_per_host: int = 0) -> tuple[grpc.Server, FaultInjector]:
    """A role's gRPC server: credentials checked first (settings from ``security`` or the
    environment), then admission (at most ``streams_per_host`` request streams a host; 0: no
    limit below the pool's), then request streams that send no first message within
    ``first_message_s``, or nothing for ``idle_s``, cancelled; then the fault hook, whose
    AdminService is served here (no rules are active until someone adds one). Returns the
    server, not started, and its ``FaultInjector``."""
    security = security if security is not None else Security.from_env()
    if not security.cluster_token:
        log.warning(
            "SHARDPS_CLUSTER_TOKEN is not set: internal and admin calls (membership, rollbacks, fault injection) "
            "are open to anyone who reaches this port; set it on every role (LocalCluster and shardps run make "
            "one up)")
    injector = FaultInjector()
    interceptors = [AuthInterceptor(security.token, security.cluster_token),
                    AdmissionInterceptor(max_threads, streams_per_host),
                    IdleStreamInterceptor(Watchdog(), idle_s, first_message_s), FaultInterceptor(injector)]
    server = thread_pool_server(max_threads, max_message_bytes, interceptors=interceptors)
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(injector), server)
    return server, injector


def bind(server: grpc.Server, address: str, security: Security | None = None) -> int:
    """Listen on ``address`` (TLS when the security settings have a certificate); returns the port, 0 on failure."""
    creds = (security if security is not None else Security.from_env()).server_credentials()
    return server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)


def add_health(server: grpc.Server, service_names: list[str]) -> HealthService:
    """Standard grpc.health.v1 service (``runtime.health.HealthService``: no caller can freeze it);
    every named service and "" report SERVING. Returns it (``set``, ``enter_graceful_shutdown``)."""
    servicer = HealthService()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer
