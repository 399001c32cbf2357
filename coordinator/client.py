"""CoordinatorClient: the typed stub that servers, workers and tools use to reach the coordinator.

Every call has a deadline. ``register_worker`` and ``register_server`` retry while the
coordinator is unreachable or not ready (servers still starting), up to ``wait`` seconds.

    coord = CoordinatorClient("127.0.0.1:7070")
    reg = coord.register_worker(job, name="host-a", device="cpu", wait=60)
"""
from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

import grpc

from ..proto.errors import Unavailable
from ..proto.gen import shardps_pb2 as pb
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from ..proto.messages import JobConfig, View, job_from_pb, job_to_pb, plan_from_pb, view_from_pb
from ..runtime.rpc import CONTROL_TIMEOUT_S, open_channel
from ..runtime.status import error_from_rpc
from .jobs import Registration

T = TypeVar("T")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class CoordinatorClient:
    def __init__(self, address: str, timeout: float = CONTROL_TIMEOUT_S, security=None, reconnect: float = 0.0):
        """``security``: a ``runtime.security.Security`` (None: from the SHARDPS_* environment).
        ``reconnect``: seconds every call keeps retrying while the coordinator is unreachable (a
        restarting coordinator comes back with its state; workers and servers ride that out)."""
        self.address, self.timeout, self.reconnect = address, timeout, reconnect
        self._channel = open_channel(address, security)
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        if self.reconnect > 0:
            return self._retrying(what, fn, self.reconnect, (grpc.StatusCode.UNAVAILABLE,))
        try:
            return fn()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"{what} at coordinator {self.address}") from None

    def _retrying(self, what: str, fn: Callable[[], T], wait: float, retryable=_RETRYABLE) -> T:
        """Call ``fn`` until it stops failing with a ``retryable`` code or ``wait`` s pass."""
        deadline, delay = time.monotonic() + wait, 0.05
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                if exc.code() not in retryable or time.monotonic() + delay > deadline:
                    raise error_from_rpc(exc, f"{what} at coordinator {self.address} (waited {wait:.0f}s)") from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    def register_server(self, address: str, shard_id: int, wait: float) -> tuple[int, int]:
        req = pb.RegisterServerRequest(address=address, shard_id=shard_id)
        reply = self._retrying("RegisterServer", lambda: self._stub.RegisterServer(req, timeout=self.timeout), wait)
        return reply.shard_id, reply.num_servers

    def register_worker(self, job: JobConfig, name: str, device: str, wait: float) -> Registration:
        req = pb.RegisterWorkerRequest(job=job_to_pb(job), name=name, device=device)
        reply = self._retrying("RegisterWorker", lambda: self._stub.RegisterWorker(req, timeout=self.timeout), wait)
        return Registration(reply.job_id, reply.worker_id, job_from_pb(reply.job), plan_from_pb(reply.plan),
                            reply.initializer)

    def watch(self, job_id: str, after_epoch: int, timeout: float) -> View:
        req = pb.WatchMembershipRequest(job_id=job_id, after_epoch=after_epoch, timeout_ms=int(timeout * 1000))
        reply = self._call("WatchMembership", lambda: self._stub.WatchMembership(req, timeout=timeout + self.timeout))
        return view_from_pb(reply.view)

    def views_with(self, job_id: str, worker_id: int, latest: View) -> list[View]:
        """The run of views up to ``latest`` that all contain ``worker_id``, newest first."""
        run = [latest]
        for epoch in range(latest.epoch - 1, 0, -1):
            view = self.view(job_id, epoch)
            if worker_id not in view.worker_ids:
                break
            run.append(view)
        return run

    def first_view_with(self, job_id: str, worker_id: int, latest: View) -> View:
        """The earliest of ``views_with``: its start_step is the step this worker joined at (later
        views may have added others)."""
        return self.views_with(job_id, worker_id, latest)[-1]

    def join_step(self, job_id: str, worker_id: int, latest: View) -> int:
        """The step a worker that has not pushed yet starts at: the lowest start step of ``views_with``.
        Usually its join view's; a later view starts lower when the job rolled back below the join step, or
        when a dead worker's removal took effect from the open step: each makes it a member from there."""
        return min(v.start_step for v in self.views_with(job_id, worker_id, latest))

    def wait_for_view(self, job_id: str, worker_id: int, timeout: float) -> View:
        """Block until a view containing ``worker_id`` exists; raise Unavailable after ``timeout`` s."""
        deadline, epoch = time.monotonic() + timeout, 0
        while True:
            left = deadline - time.monotonic()
            view = self.watch(job_id, epoch, max(0.0, min(left, 10.0)))
            if worker_id in view.worker_ids:
                return view
            epoch = view.epoch
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"training did not start within {timeout:.0f}s: the job waits for min_workers to register "
                    f"(view epoch {view.epoch} has {len(view.members)} workers); start more workers"
                )

    def wait_for_epoch(self, job_id: str, epoch: int, timeout: float) -> View:
        """Block until the job's view has reached ``epoch``; returns the latest view."""
        deadline, seen = time.monotonic() + timeout, epoch - 1
        while True:
            view = self.watch(job_id, seen, max(0.0, min(deadline - time.monotonic(), 10.0)))
            if view.epoch >= epoch:
                return view
            if time.monotonic() >= deadline:
                raise Unavailable(f"membership epoch {epoch} did not appear within {timeout:.0f}s "
                                  f"(latest is {view.epoch})")

    def collective(self, job_id: str, worker_id: int, name: str, round_: int, payload: bytes,
                   timeout: float) -> tuple[list[bytes] | None, int]:
        """One long poll of a collective round (``Coordinator.collective``): (payloads by rank, epoch), or
        (None, epoch) while the round is open after ``timeout`` s; calling again with the same arguments
        is safe (a retried contribution replaces itself)."""
        req = pb.CollectiveRequest(job_id=job_id, worker_id=worker_id, name=name, round=round_, payload=payload,
                                   timeout_ms=int(timeout * 1000))
        reply = self._call("Collective", lambda: self._stub.Collective(req, timeout=timeout + self.timeout))
        return (list(reply.payloads) if reply.done else None), reply.epoch

    def view(self, job_id: str, epoch: int) -> View:
        req = pb.GetMembershipRequest(job_id=job_id, epoch=epoch)
        return view_from_pb(self._call("GetMembership", lambda: self._stub.GetMembership(req, timeout=self.timeout)).view)

    def job(self, name: str = "", job_id: str = "", suspect=()):
        """(job_id, JobConfig, plan) of the job named ``name`` (or with id ``job_id``); job_id is ""
        while no such job is defined. ``suspect``: server addresses this caller found refusing or
        resetting connections; the coordinator checks them first (``coordinator.failover``), so the
        plan answered already has a dead primary's shards moved."""
        req = pb.GetJobRequest(job_name=name, job_id=job_id, suspect=list(suspect))
        reply = self._call("GetJob", lambda: self._stub.GetJob(req, timeout=self.timeout))
        if not reply.job_id:
            return "", None, []
        return reply.job_id, job_from_pb(reply.job), plan_from_pb(reply.plan)

    def leave(self, job_id: str, worker_id: int) -> None:
        req = pb.LeaveJobRequest(job_id=job_id, worker_id=worker_id)
        self._call("LeaveJob", lambda: self._stub.LeaveJob(req, timeout=self.timeout))

    def report_throughput(self, job_id: str, worker_id: int, window: int, rate: float,
                          global_batch: int) -> tuple[int, ...]:
        """Report samples/s over the last window; returns this window's batch size per rank."""
        req = pb.ReportThroughputRequest(job_id=job_id, worker_id=worker_id, window=window,
                                         samples_per_second=rate, global_batch=global_batch)
        reply = self._call("ReportThroughput", lambda: self._stub.ReportThroughput(req, timeout=self.timeout))
        return tuple(reply.batch_sizes)

    def heartbeat(self, job_id: str, worker_id: int, step: int, counters: dict[str, int]) -> pb.HeartbeatResponse:
        """Renew this worker's lease; the reply has the job's newest epoch, the lease in ms, and why
        the job cannot go on when it cannot."""
        req = pb.HeartbeatRequest(job_id=job_id, worker_id=worker_id, step=step, counters=counters)
        return self._call("Heartbeat", lambda: self._stub.Heartbeat(req, timeout=self.timeout))

    def report_restore(self, job_id: str, shard_id: int, version: int, timeout: float = 120.0) -> pb.Rollback:
        """A restarted shard restored ``version``; returns the rollback the coordinator carried out."""
        req = pb.ReportRestoreRequest(job_id=job_id, shard_id=shard_id, version=version)
        return self._retrying("ReportRestore", lambda: self._stub.ReportRestore(req, timeout=timeout), timeout).rollback

    def status(self, name: str = "") -> pb.GetJobStatusResponse:
        req = pb.GetJobStatusRequest(job_name=name)
        return self._call("GetJobStatus", lambda: self._stub.GetJobStatus(req, timeout=self.timeout))
