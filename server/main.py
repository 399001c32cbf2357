"""Run a shard server: ``shardps server --coordinator HOST:7070 --port 7071``.

It binds, registers with the coordinator (which assigns a shard id unless one is
given), then serves ShardService and grpc.health.v1 until SIGTERM/SIGINT.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from ..coordinator.client import CoordinatorClient
from ..proto.codec import DEFAULT_CHUNK_BYTES
from ..proto import defaults as D
from ..proto.defaults import FIRST_MESSAGE_S
from ..proto.messages import added_group_parent
from ..runtime.history import History
from ..runtime.process import wait_for_stop_signal, write_port_file
from ..runtime.rpc import MAX_MESSAGE_BYTES
from ..runtime.server import add_health, bind, role_server
from ..runtime.security import Security
from .links import LinkHub
from .node import ShardNode
from .service import ShardServicer, add_to_server

log = logging.getLogger("shardps.server")


@dataclass(frozen=True)
class ServerConfig:
    coordinator: str  # coordinator address, host:port
    host: str = "127.0.0.1"  # interface to bind; "0.0.0.0" in containers
    port: int = D.SERVER_PORT  # 0 picks a free port
    advertise: str = ""  # host:port workers dial; default host:bound-port
    shard_id: int = -1  # -1 lets the coordinator assign the lowest free id
    threads: int = D.SERVER_THREADS  # gRPC handler threads: >= workers blocked in a sync step + control calls
    step_timeout: float = D.STEP_TIMEOUT_S  # sync: seconds a push waits for its step to close
    first_message_timeout: float = FIRST_MESSAGE_S  # a request stream that sends nothing this long is cancelled
    streams_per_host: int = 0  # request streams one host may hold open (0: threads - 8, see runtime/admission.py)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # bytes per streamed reply chunk
    max_message_bytes: int = MAX_MESSAGE_BYTES  # larger messages are refused (RESOURCE_EXHAUSTED)
    register_wait: float = 60.0  # seconds to keep trying to reach the coordinator at start
    port_file: str = ""  # if set, the bound port is written here
    checkpoint_dir: str = ""  # checkpoints go to <dir>/shard-<id>/; "" keeps none (a restart loses the shard)
    checkpoint_every: int = 0  # also checkpoint every N versions (0: only at version 0, on request and on SIGTERM)
    checkpoint_keep: int = D.CHECKPOINT_KEEP  # newest checkpoints kept per shard
    metrics_port: int = -1  # serve Prometheus metrics here (0: any free port, -1: off)
    compute_threads: int = 0  # torch threads for the optimizer step (0: torch's default, every core)
    history_dir: str = ""  # append what this server does to the run's history here (shardps check); "" records none
    data_port: int = D.setting("data_port").default  # byte links (server/links.py); 0: any free port, -1: none
    link_parts: int = D.LINK_PARTS  # sync pushes on a byte link come in up to this many parts (server/parts.py)

    def __post_init__(self):
        if ":" not in self.coordinator:
            raise ValueError(f"coordinator must be host:port, got {self.coordinator!r}")
        if self.threads < 4:
            raise ValueError(f"threads must be >= 4, got {self.threads}")
        if not 0.1 <= self.first_message_timeout <= 600:
            raise ValueError(f"first_message_timeout must be in 0.1..600 seconds, got {self.first_message_timeout}")
        if self.streams_per_host < 0:
            raise ValueError(f"streams_per_host must be >= 0 (0: no limit below the server's), got "
                             f"{self.streams_per_host}")
        if self.compute_threads < 0:
            raise ValueError(f"compute_threads must be >= 0 (0: every core), got {self.compute_threads}")
        if self.chunk_bytes < 1 or self.chunk_bytes > self.max_message_bytes - 4096:
            raise ValueError("chunk_bytes must be positive and fit in max_message_bytes with room for headers")
        if self.checkpoint_every < 0 or self.checkpoint_keep < 1:
            raise ValueError("checkpoint_every must be >= 0 and checkpoint_keep >= 1")
        if not -1 <= self.data_port <= 65535:
            raise ValueError(f"data_port must be a port, 0 (any free one) or -1 (none), got {self.data_port}")
        if not 1 <= self.link_parts <= 64:
            raise ValueError(f"link_parts must be in 1..64 (1: whole pushes), got {self.link_parts}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("--checkpoint-every needs --checkpoint-dir")


def build_shard_server(config: ServerConfig, coordinator: CoordinatorClient) -> tuple[grpc.Server, int, ShardNode]:
    """Build (not start) a shard server; returns (server, bound port, node). The node's shard
    id is config.shard_id until ``register`` sets the coordinator's answer."""

    node = ShardNode(config.shard_id, lambda job_id: coordinator.job(job_id=job_id), coordinator.view,
                     config.step_timeout,
                     config.checkpoint_dir, config.checkpoint_every, config.checkpoint_keep,
                     history=History.open(config.history_dir, "server"))
    # A request stream may legitimately pause as long as a sync step takes (a clipped push waits for
    # the other shards' partial norms), not longer.
    server, injector = role_server(config.threads, config.max_message_bytes, idle_s=config.step_timeout + 30,
                                   first_message_s=config.first_message_timeout,
                                   streams_per_host=config.streams_per_host)
    if config.metrics_port >= 0:
        from ..runtime import metrics

        mport = metrics.serve(config.metrics_port, config.host,
                              metrics.registry_with(metrics.ShardCollector(node.gauges, injector)))
        write_port_file(config.port_file + ".metrics" if config.port_file else "", mport)
        log.info("metrics on http://%s:%d/metrics", config.host, mport)
    links, off = None, "it was started with --data-port -1"
    if Security.from_env().tls:
        off = "TLS is on: the bytes stay inside gRPC's TLS"
    elif config.data_port >= 0:
        links = LinkHub(config.host, config.data_port, idle_timeout=config.first_message_timeout)
        log.info("byte links on %s:%d", config.host, links.port)
    servicer = ShardServicer(node, config.chunk_bytes, wait_timeout=config.register_wait, threads=config.threads,
                             links=links, links_off=off, link_parts=config.link_parts)
    add_to_server(servicer, server)
    add_health(server, ["shardps.v1.ShardService"])
    port = bind(server, f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port} (in use?)")
    return server, port, node


def register(config: ServerConfig, coordinator: CoordinatorClient, node: ShardNode, port: int) -> None:
    host = socket.gethostname() if config.host in ("0.0.0.0", "::", "[::]") else config.host
    advertise = config.advertise or f"{host}:{port}"
    node.shard_id, num_servers = coordinator.register_server(advertise, config.shard_id, config.register_wait)
    node.address = advertise
    log.info("shard %d of %d serving on %s", node.shard_id, num_servers, advertise)


def recover(coordinator: CoordinatorClient, node: ShardNode) -> None:
    """After a restart: for every job the coordinator runs, restore this shard's newest checkpoint
    of it and have the coordinator roll every shard back to a version all of them have (a job
    that had started and has no checkpoint here is marked lost, with the reason). Every job is restored
    before any is reported: a job's rollback takes its added param groups' jobs with it (to a step all of
    them have a checkpoint of), so their restored checkpoints must be listed by then; a group whose parent
    restored one here is not reported on its own."""
    restored = {}
    for name in coordinator.status().job_names:
        status = coordinator.status(name)
        job_id, job, plan = coordinator.job(job_id=status.job_id)
        home = next((s for s in plan if s.range.shard_id == node.shard_id), None)
        if job is not None and job.replicas > 1 and home is not None:
            if home.address != node.address:
                # A live copy took the shard over: this server rejoins as a backup, and the primary sends it
                # a whole copy (the coordinator places it); the disk's older copy would only roll the job back.
                log.warning("job %s: shard %d is served by %s now; rejoining as a backup", name, node.shard_id,
                            home.address)
                continue
            if node.checkpoint_dir:
                # No live copy is left (this server was still its primary): the coordinator restores every
                # lost shard from the servers' checkpoints (this disk's among them) and rolls the job back
                # (restore_lost).
                log.warning("job %s: shard %d had no live copy left; the coordinator restores it from checkpoints",
                            name, node.shard_id)
                continue
        version = node.restore_latest(status.job_id, name, started=status.view.epoch > 0)
        if version is not None:
            restored[name] = (status.job_id, version)
    for name, (job_id, version) in restored.items():
        if added_group_parent(name) in restored:
            continue  # its parent's rollback rolled it back too
        rollback = coordinator.report_restore(job_id, node.shard_id, version)
        log.warning("job %s rolled back from version %d to %d (epoch %d)", name, rollback.from_version,
                    rollback.to_version, rollback.epoch)


def _recover_logged(coordinator: CoordinatorClient, node: ShardNode) -> None:
    try:
        recover(coordinator, node)
    except Exception as exc:  # the shard stays unavailable; the log says why
        log.error("recovery from the checkpoint failed: %s", exc)


def _sweep_forever(every: float = 30.0) -> None:
    """Unlink shared memory left by workers killed on this host (``runtime.shm.sweep``), now and then."""
    from ..runtime.shm import sweep

    while True:
        try:
            sweep()
        except OSError as exc:
            log.warning("sweeping shared memory failed: %s", exc)
        time.sleep(every)


def checkpoint_on_exit(node: ShardNode) -> None:
    """SIGTERM: write every job's current version before going (``docker compose down``, ``kubectl delete``)."""
    for state in list(node.states.values()):
        checkpointer = node.checkpointer_for(state)
        if checkpointer is None or state.timeline.awaiting_rollback:
            continue
        try:
            written = checkpointer.request(state, 0, timeout=60.0)
            log.info("checkpoint of job %s at exit: version %d in %s", state.job.name, written.version, written.path)
        except Exception as exc:  # a failed checkpoint must not keep the process from exiting
            log.error("checkpoint at exit failed: %s", exc)


def _warm_up() -> None:
    """Build one throwaway torch optimizer: the first one in a process loads the rest of torch (seconds),
    which would otherwise fall on the first job's first call."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def serve(config: ServerConfig) -> None:
    if config.compute_threads:  # servers sharing a host split its cores instead of each taking all of them
        torch.set_num_threads(config.compute_threads)
    threading.Thread(target=_warm_up, name="shardps-warm-up", daemon=True).start()
    with CoordinatorClient(config.coordinator, reconnect=config.register_wait) as coordinator:
        server, port, node = build_shard_server(config, coordinator)
        server.start()
        register(config, coordinator, node, port)
        write_port_file(config.port_file, port)
        # Recovery waits for every server to be registered (a resumed job starts them all at once),
        # so it runs beside serving; until it is done, pushes are answered UNAVAILABLE (retry).
        threading.Thread(target=_recover_logged, args=(coordinator, node), name="shardps-recover", daemon=True).start()
        threading.Thread(target=_sweep_forever, name="shardps-shm-sweep", daemon=True).start()
        wait_for_stop_signal()
        checkpoint_on_exit(node)
        server.stop(grace=2).wait(5)
