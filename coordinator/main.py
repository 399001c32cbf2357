"""Run the coordinator: ``shardps coordinator --port 7070 --num-servers 2``.

It serves CoordinatorService and grpc.health.v1 until SIGTERM/SIGINT.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from dataclasses import dataclass

import grpc

from ..proto.gen import shardps_pb2 as pb
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from ..proto import defaults as D
from ..proto.messages import JobConfig, job_from_pb
from ..runtime.process import wait_for_stop_signal, write_port_file
from ..runtime.server import add_health, bind, role_server
from .service import CoordinatorServicer
from .journal import Journal
from .shards import ShardAdmin
from .state import Coordinator

log = logging.getLogger("shardps.coordinator")


@dataclass(frozen=True)
class CoordinatorConfig:
    host: str = "127.0.0.1"  # interface to bind; "0.0.0.0" in containers
    port: int = D.COORDINATOR_PORT  # 0 picks a free port (see port_file)
    num_servers: int = 2  # shard servers the flat parameter vector is cut across
    threads: int = D.COORDINATOR_THREADS  # gRPC handler threads (membership watches hold one each)
    lease_seconds: float = D.LEASE_S  # a worker silent this long is removed from the membership
    replica_lease_seconds: float = D.REPLICA_LEASE_S  # replicated jobs: how long a primary answers after its last renewal
    resume_job: str = ""  # job.json written by prepare_resume: run its job(s) from their checkpoint steps
    state_dir: str = ""  # keep the coordinator's state here, so a restart resumes its jobs ("": in memory only)
    metrics_port: int = -1  # serve Prometheus metrics here (0: any free port, -1: off)
    port_file: str = ""  # if set, the bound port is written here

    def __post_init__(self):
        if self.num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {self.num_servers}")
        if self.resume_job:
            read_resume_file(self.resume_job)  # a bad file is a usage error, before anything starts
        if self.lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {self.lease_seconds}")
        if not 0.2 <= self.replica_lease_seconds <= 600:
            raise ValueError(f"replica_lease_seconds must be in 0.2..600, got {self.replica_lease_seconds}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


def read_resume_file(path: str) -> list[tuple[str, JobConfig, int]]:
    """[(job_id, job, step)] from the job.json that ``client.resume.prepare_resume`` writes: one job,
    or (``{"jobs": [...]}``) several, e.g. a streaming DiLoCo run's fragments."""
    try:
        spec = json.loads(Path(path).read_text())
        specs = spec["jobs"] if "jobs" in spec else [spec]
        return [(s["job_id"], job_from_pb(pb.JobSpec.FromString(base64.b64decode(s["job_spec"]))), int(s["version"]))
                for s in specs]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot read the resume file {path}: {exc}") from None


def build_coordinator_server(config: CoordinatorConfig) -> tuple[grpc.Server, int, Coordinator]:
    """Build (not start) the coordinator's gRPC server; returns (server, bound port, core)."""
    shards = ShardAdmin()
    journal = Journal(config.state_dir) if config.state_dir else None
    coordinator = Coordinator(config.num_servers, shards=shards, lease_s=config.lease_seconds, journal=journal)
    coordinator.replica_lease_s = config.replica_lease_seconds
    shards.generation = coordinator.generation
    for job_id, job, step in read_resume_file(config.resume_job) if config.resume_job else ():
        with coordinator.cond:
            known = coordinator.named(job.name)
        if known is None:
            coordinator.resume(job_id, job, step)
        elif known.job_id != job_id:
            raise ValueError(f"the state in {config.state_dir} runs another job named {job.name!r}; use a new "
                             f"--state-dir to resume from {config.resume_job}")
    server, injector = role_server(config.threads)
    if config.metrics_port >= 0:
        from ..runtime import metrics

        mport = metrics.serve(config.metrics_port, config.host,
                              metrics.registry_with(metrics.CoordinatorCollector(coordinator.gauges, injector)))
        write_port_file(config.port_file + ".metrics" if config.port_file else "", mport)
    pb_grpc.add_CoordinatorServiceServicer_to_server(CoordinatorServicer(coordinator, config.threads), server)
    add_health(server, ["shardps.v1.CoordinatorService"])
    port = bind(server, f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port} (in use?)")
    return server, port, coordinator


def reconfigure_forever(coordinator: Coordinator, stop: threading.Event, every: float = 0.25) -> None:
    """Expire leases, admit joiners and restore lost replicated shards a few times a second, until ``stop``."""
    postponed = ""  # the last reason a restore was put off (logged once, not every round)
    while not stop.wait(every):
        try:
            for view in coordinator.reconfigure():
                log.warning("membership epoch %d from step %d: workers %s", view.epoch, view.start_step,
                            sorted(view.worker_ids))
        except Exception as exc:  # a shard may be down for a moment; try again
            log.warning("membership change postponed: %s", exc)
        try:
            for r in coordinator.restore_lost():
                log.warning("shard %d had no live copy: the job rolled back from version %d to %d (epoch %d)",
                            r.shard_id, r.from_version, r.to_version, r.epoch)
            postponed = ""
        except Exception as exc:  # noqa: BLE001 - a server may be unreachable for a moment; try again
            if str(exc) != postponed:
                log.error("restoring a lost shard from checkpoints postponed: %s", exc)
            postponed = str(exc)


def renew_replicas_forever(coordinator: Coordinator, stop: threading.Event, every: float = 0.25) -> None:
    """Replicated jobs: tell every server its replica placement a few times a second, all at once (which
    renews the primaries' leases and finds dead servers), until ``stop``."""
    pool = ThreadPoolExecutor(max_workers=max(2, coordinator.num_servers), thread_name_prefix="shardps-placement")
    lease = coordinator.replica_lease_s
    every = min(every, lease / 4)  # a lease runs from the answer before: it must outlast a round or two

    clocks: dict[str, pb.LeaseClock] = {}  # each server's clock in its last answer: where the next lease runs from

    def call(address, rows):
        reports, clocks[address] = coordinator.shards.set_replicas(address, rows, lease, timeout=max(0.2, lease / 2),
                                                                   lease_from=clocks.get(address))
        return time.monotonic(), reports  # the lease a server holds runs from before this moment (its clock then)

    silent: set[int] = set()
    quick = False  # a new placement (a promotion) goes out at once; never twice in a row
    while not stop.is_set():
        # placement_due: a failover found between rounds (coordinator.failover) goes out at once too
        coordinator.placement_due.wait(0 if quick else every)
        coordinator.placement_due.clear()
        if stop.is_set():
            break
        changed, number = False, None
        try:
            calls = coordinator.replica_calls()
            number = coordinator.rounds_started  # only this loop starts rounds
            futures = {sid: pool.submit(call, address, rows) for sid, (address, rows) in calls.items()}
            answers = {}
            for sid, future in futures.items():
                try:
                    answers[sid] = future.result()
                except Exception as exc:  # noqa: BLE001 - a server that does not answer may be dead
                    if sid not in silent:
                        log.warning("server %d does not answer its placement call: %s", sid, exc)
                    silent.add(sid)
                    answers[sid] = None
                else:
                    silent.discard(sid)
            if answers:
                changed = coordinator.replicas_renewed(answers)
            quick = changed and not quick
        except Exception as exc:  # noqa: BLE001 - never let the loop die
            quick = False
            log.warning("replica placement round failed: %s", exc)
        if number is not None:
            coordinator.round_sent(number)


def serve(config: CoordinatorConfig) -> None:
    server, port, coordinator = build_coordinator_server(config)
    server.start()
    stop = threading.Event()
    threading.Thread(target=reconfigure_forever, args=(coordinator, stop), name="shardps-leases", daemon=True).start()
    threading.Thread(target=renew_replicas_forever, args=(coordinator, stop), name="shardps-placement",
                     daemon=True).start()
    write_port_file(config.port_file, port)
    log.info("coordinator serving on %s:%d for %d shard servers", config.host, port, config.num_servers)
    wait_for_stop_signal()
    stop.set()
    server.stop(grace=2).wait(5)
