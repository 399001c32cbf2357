"""CoordinatorService gRPC adapter: decode, call ``Coordinator``, encode."""
from __future__ import annotations

import contextlib
import time

from ..proto.errors import InvalidArgument, Unavailable
from ..runtime.limits import WaitSlots
from ..proto.gen import shardps_pb2 as pb
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from ..proto.messages import job_from_pb, job_to_pb, member_to_pb, plan_to_pb, view_to_pb
from ..runtime.status import translate_errors
from .failover import SuspectChecker
from .state import Coordinator


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Coordinator, threads: int = 32):
        self.c = coordinator
        # Membership and collective long-polls park a handler thread each: capped so health checks always find one.
        self.watches = WaitSlots(max(2, threads // 2), "membership watches")
        self.suspects = SuspectChecker(coordinator)

    def _plan(self, state):
        return plan_to_pb(state.plan, state.job.layout.numel, self.c.align)

    @translate_errors
    def RegisterServer(self, request, context):
        shard_id = self.c.register_server(request.address, request.shard_id)
        return pb.RegisterServerResponse(shard_id=shard_id, num_servers=self.c.num_servers)

    @translate_errors
    def RegisterWorker(self, request, context):
        try:
            job = job_from_pb(request.job)
        except (ValueError, RecursionError) as exc:
            raise InvalidArgument(f"bad job spec: {str(exc)[:500]}") from None
        reg = self.c.register_worker(job, request.name, request.device)
        with self.c.cond:
            plan = self._plan(self.c.job(reg.job_id))
        return pb.RegisterWorkerResponse(job_id=reg.job_id, worker_id=reg.worker_id, job=job_to_pb(reg.job),
                                         plan=plan, initializer=reg.initializer)

    @translate_errors
    def WatchMembership(self, request, context):
        with self.watches.slot():
            view = self.c.watch(request.job_id, request.after_epoch, request.timeout_ms / 1000.0)
        return pb.WatchMembershipResponse(view=view_to_pb(view))

    @translate_errors
    def Collective(self, request, context):
        wait = request.timeout_ms / 1000.0
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.watches.slot())
            except Unavailable:
                # Every waiting slot is taken (a job with more workers than slots): contribute without
                # waiting, or the round could never close; the worker asks again shortly.
                wait = 0.0
            payloads, epoch = self.c.collective(request.job_id, request.worker_id, request.name, request.round,
                                                request.payload, wait)
        return pb.CollectiveResponse(done=payloads is not None, payloads=payloads or (), epoch=epoch)

    @translate_errors
    def GetMembership(self, request, context):
        return pb.GetMembershipResponse(view=view_to_pb(self.c.view(request.job_id, request.epoch)))

    @translate_errors
    def GetJob(self, request, context):
        if request.suspect:  # a worker found these servers refusing: a dead primary fails over before the answer
            self.suspects.check(request.suspect)
        with self.c.cond:
            if request.job_id:
                state = next((j for j in self.c.jobs.values() if j.job_id == request.job_id), None)
            else:
                state = self.c.named(request.job_name)
            if state is None:
                return pb.GetJobResponse()
            return pb.GetJobResponse(job_id=state.job_id, job=job_to_pb(state.job), plan=self._plan(state))

    @translate_errors
    def LeaveJob(self, request, context):
        self.c.leave(request.job_id, request.worker_id)
        return pb.LeaveJobResponse()

    @translate_errors
    def ReportThroughput(self, request, context):
        sizes = self.c.report_throughput(request.job_id, request.worker_id, request.window,
                                         request.samples_per_second, request.global_batch)
        return pb.ReportThroughputResponse(batch_sizes=sizes)

    @translate_errors
    def Heartbeat(self, request, context):
        epoch, lease = self.c.heartbeat(request.job_id, request.worker_id, request.step, dict(request.counters))
        with self.c.cond:
            state = self.c.job(request.job_id)
            waiting, abandoned = state.waiting_for, state.abandoned
            collectives = state.rounds.awaiting(request.worker_id)
        return pb.HeartbeatResponse(epoch=epoch, lease_ms=int(lease * 1000), waiting_for=waiting, abandoned=abandoned,
                                    collectives_waiting=collectives)

    @translate_errors
    def ReportRestore(self, request, context):
        r = self.c.report_restore(request.job_id, request.shard_id, request.version)
        return pb.ReportRestoreResponse(rollback=rollback_to_pb(r))

    def GetJobStatus(self, request, context):
        c, now = self.c, time.monotonic()
        with c.cond:
            state = c.named(request.job_name)
            base = dict(servers=[pb.ServerInfo(shard_id=i, address=a) for i, a in sorted(c.servers.items())],
                        num_servers=c.num_servers, job_names=sorted(c.jobs), generation=c.generation)
            if state is None:
                return pb.GetJobStatusResponse(**base)
            return pb.GetJobStatusResponse(
                job_id=state.job_id,
                job=job_to_pb(state.job),
                plan=self._plan(state),
                view=view_to_pb(state.latest()),
                pending=[member_to_pb(m) for m in state.pending],
                left_worker_ids=state.left[-STATUS_LIST:],
                rollbacks=[rollback_to_pb(r) for r in state.rollbacks[-STATUS_LIST:]],
                expired_worker_ids=state.expired[-STATUS_LIST:],
                heartbeat_age_s={w: now - t for w, t in sorted(state.last_seen.items())[-STATUS_LIST:]},
                worker_counters={w: pb.WorkerCounters(step=step, counters=counters)
                                 for w, (step, counters) in sorted(state.reports.items())[-STATUS_LIST:]},
                waiting_for=state.waiting_for,
                **self._placement(state),
                **base,
            )

    @staticmethod
    def _placement(state) -> dict:
        p = state.placement
        if p is None:
            return {}
        return {"placement_epoch": p.epoch, "failovers": [
            pb.Failover(shard_id=f.shard_id, from_server=f.from_server, to_server=f.to_server,
                        placement_epoch=f.epoch, unix_time=f.unix_time, reason=f.reason)
            for f in p.failovers[-STATUS_LIST:]]}


STATUS_LIST = 256  # newest entries of each history list that status returns


def rollback_to_pb(r) -> pb.Rollback:
    return pb.Rollback(shard_id=r.shard_id, from_version=r.from_version, to_version=r.to_version, epoch=r.epoch,
                       unix_time=r.unix_time)
