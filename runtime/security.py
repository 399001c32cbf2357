"""Who may talk to the cluster: three principals, tokens, TLS, mutual TLS.

- **Workers** train: register, push, pull, heartbeat, load optimizer state, read status.
  With ``SHARDPS_AUTH_TOKEN`` set, their calls must carry it.
- **Cluster members** (the coordinator and the shard servers, calling each other:
  registration, membership changes, rollbacks, restores) and **operators** (fault
  injection, checkpoints on request) hold the cluster's own credential,
  ``SHARDPS_CLUSTER_TOKEN``, which a worker never holds. ``LocalCluster`` and
  ``shardps run`` make one up by themselves (in ``<log dir>/cluster.token``), so
  their internal and admin calls are guarded even when the user set no token.

Every role and every client reads the same settings, from arguments or from the
environment (so one ``.env`` or Kubernetes Secret configures a whole cluster):
``SHARDPS_AUTH_TOKEN``, ``SHARDPS_CLUSTER_TOKEN`` (also valid for worker calls),
``SHARDPS_TLS_CERT``/``SHARDPS_TLS_KEY``, ``SHARDPS_TLS_CA`` (clients: the servers' CA;
servers with mutual TLS: the clients') and ``SHARDPS_TLS_CLIENT_AUTH``; what each means is
written once, in ``proto/defaults.py`` (docs/configuration.md shows the table). Calls carry
the token as ``authorization: Bearer <token>``.

Servers check credentials in an interceptor (``AuthInterceptor``), before any
other logic: a call without a valid credential gets UNAUTHENTICATED, a worker's
credential on an internal or admin call PERMISSION_DENIED, and neither touches
state. Health checks stay open so orchestrators can probe. A role started without
``SHARDPS_CLUSTER_TOKEN`` leaves internal calls open and says so in its log.
``scripts/dev-certs.sh`` makes a development CA and certificates.

    security = Security(token="s3cret")             # or Security.from_env()
    channel = open_channel("host:7070", security)   # runtime.rpc
"""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from .status import abort

AUTH_METADATA = "authorization"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes need no credentials
# Calls only cluster members and operators may make: they change membership, roll shards back,
# register servers, inject faults or write checkpoints.
INTERNAL_METHODS = frozenset({
    "/shardps.v1.CoordinatorService/RegisterServer",
    "/shardps.v1.CoordinatorService/ReportRestore",
    "/shardps.v1.ShardService/SetMembership",
    "/shardps.v1.ShardService/SetReplicas",
    "/shardps.v1.ShardService/Replicate",
    "/shardps.v1.ShardService/Rollback",
    "/shardps.v1.ShardService/Checkpoint",
    "/shardps.v1.AdminService/SetFaults",
})


class SecurityError(ValueError):
    """Credentials are configured wrongly (a file missing, half a pair); the message names the fix."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read the {what} {path}: {exc.strerror}; make development certificates "
                            "with scripts/dev-certs.sh DIR") from None


@dataclass(frozen=True)
class Security:
    token: str = ""  # the workers' token
    cluster_token: str = ""  # the cluster's own credential: roles and operators hold it, workers never do
    tls_cert: str = ""  # PEM file
    tls_key: str = ""
    tls_ca: str = ""
    client_auth: bool = False  # servers: require client certificates (mutual TLS)

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SecurityError("give both SHARDPS_TLS_CERT and SHARDPS_TLS_KEY (a certificate and its key), or neither")
        if self.client_auth and not self.tls_ca:
            raise SecurityError("mutual TLS (SHARDPS_TLS_CLIENT_AUTH) needs SHARDPS_TLS_CA, the CA of the clients")

    @classmethod
    def from_env(cls, token: str | None = None) -> "Security":
        """Settings from SHARDPS_* variables; an explicit ``token`` wins over SHARDPS_AUTH_TOKEN."""
        env = os.environ
        return cls(token=env.get("SHARDPS_AUTH_TOKEN", "") if token is None else token,
                   cluster_token=env.get("SHARDPS_CLUSTER_TOKEN", ""),
                   tls_cert=env.get("SHARDPS_TLS_CERT", ""), tls_key=env.get("SHARDPS_TLS_KEY", ""),
                   tls_ca=env.get("SHARDPS_TLS_CA", ""),
                   client_auth=env.get("SHARDPS_TLS_CLIENT_AUTH", "").lower() in ("1", "true", "yes"))

    @property
    def tls(self) -> bool:
        """Whether channels use TLS: a client does when it knows a CA to check servers against."""
        return bool(self.tls_ca or self.tls_cert)

    def env(self) -> dict[str, str]:
        """The SHARDPS_* variables that give a child process these settings."""
        out = {"SHARDPS_AUTH_TOKEN": self.token, "SHARDPS_CLUSTER_TOKEN": self.cluster_token,
               "SHARDPS_TLS_CERT": self.tls_cert, "SHARDPS_TLS_KEY": self.tls_key, "SHARDPS_TLS_CA": self.tls_ca}
        if self.client_auth:
            out["SHARDPS_TLS_CLIENT_AUTH"] = "1"
        return {k: v for k, v in out.items() if v}

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls_cert:
            return None
        pair = (_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))
        ca = _read(self.tls_ca, "TLS CA certificate") if self.tls_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=self.client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca = _read(self.tls_ca, "TLS CA certificate") if self.tls_ca else None
        if self.tls_cert:
            return grpc.ssl_channel_credentials(ca, _read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))
        return grpc.ssl_channel_credentials(ca)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The credential this process presents: the cluster's when it holds it, else the workers'."""
        presented = self.cluster_token or self.token
        return ((AUTH_METADATA, f"Bearer {presented}"),) if presented else ()

    def as_worker(self) -> "Security":
        """These settings without the cluster's credential: what a worker process may be given."""
        return Security(self.token, "", self.tls_cert, self.tls_key, self.tls_ca, self.client_auth)


def _equal(given: bytes, secret: str) -> bool:
    return bool(secret) and hmac.compare_digest(given, f"Bearer {secret}".encode())


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call's credential against the principal its method needs (see the module doc)."""

    def __init__(self, token: str, cluster_token: str):
        self._token, self._cluster = token, cluster_token

    def intercept_service(self, continuation, details):
        method = details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(details)
        given = dict(details.invocation_metadata or ()).get(AUTH_METADATA, "")
        given = (given if isinstance(given, str) else given.decode(errors="replace")).encode()
        member = _equal(given, self._cluster)
        worker = member or not self._token or _equal(given, self._token)
        if method in INTERNAL_METHODS and self._cluster and not member:
            if worker and (given or not self._token):
                return _refusal(continuation(details), grpc.StatusCode.PERMISSION_DENIED,
                                f"{method.rsplit('/', 1)[-1]} is a call between the cluster's own roles or from its "
                                "operators: it needs the cluster's credential (SHARDPS_CLUSTER_TOKEN), which workers "
                                "do not hold")
            return _refusal(continuation(details), grpc.StatusCode.UNAUTHENTICATED,
                            "the call carried no valid credential: operators set SHARDPS_CLUSTER_TOKEN to the "
                            "cluster's credential")
        if worker:
            return continuation(details)
        reason = "no auth token" if not given else "a wrong auth token"
        return _refusal(continuation(details), grpc.StatusCode.UNAUTHENTICATED,
                        f"the call carried {reason}: set SHARDPS_AUTH_TOKEN (or auth_token=) to the cluster's token")


def _refusal(handler, code: grpc.StatusCode, message: str):
    """``handler`` with its behaviour replaced by aborting with ``code``: nothing of the call runs."""
    if handler is None:
        return None

    def refuse(request, context):
        abort(context, code, message)

    def refuse_stream(request, context):
        abort(context, code, message)
        yield  # pragma: no cover - abort raises

    kind = ("stream_" if handler.request_streaming else "unary_") + ("stream" if handler.response_streaming else "unary")
    return handler._replace(**{kind: refuse_stream if handler.response_streaming else refuse})


class _TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call's metadata (TLS or not)."""

    def __init__(self, metadata):
        self._metadata = tuple(metadata)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata) \
            if hasattr(details, "_replace") else _Details(details, self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, extra):
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.metadata = tuple(base.metadata or ()) + tuple(extra)
        self.wait_for_ready, self.compression = getattr(base, "wait_for_ready", None), getattr(base, "compression", None)


def secure(channel_factory, address: str, security: "Security", options) -> grpc.Channel:
    """A channel to ``address`` with ``security``'s TLS and token (``channel_factory``: grpc's module)."""
    if security.tls:
        channel = channel_factory.secure_channel(address, security.channel_credentials(), options=options)
    else:
        channel = channel_factory.insecure_channel(address, options=options)
    if security.metadata():
        channel = grpc.intercept_channel(channel, _TokenClientInterceptor(security.metadata()))
    return channel
