"""CoordinatorService gRPC adapter: decode, call ``Coordinator``, encode."""
from __future__ import annotations

import time


from ..proto.errors import InvalidArgument
from ..proto.gen import shardps_pb2 as pb
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from ..proto.messages import job_from_pb, job_to_pb, member_to_pb, plan_to_pb, view_to_pb
from ..proto.rpc import translate_errors
from .state import Coordinator


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def _plan(self):
        return plan_to_pb(self.c.plan, self.c.job.layout.numel if self.c.job else 0, self.c.align)

    @translate_errors
    def RegisterServer(self, request, context):
        shard_id = self.c.register_server(request.address, request.shard_id)
        return pb.RegisterServerResponse(shard_id=shard_id, num_servers=self.c.num_servers)

    @translate_errors
    def RegisterWorker(self, request, context):
        try:
            job = job_from_pb(request.job)
        except ValueError as exc:
            raise InvalidArgument(f"bad job spec: {exc}") from None
        reg = self.c.register_worker(job, request.name, request.device)
        return pb.RegisterWorkerResponse(
            job_id=reg.job_id, worker_id=reg.worker_id, job=job_to_pb(reg.job),
            plan=self._plan(), initializer=reg.initializer,
        )

    @translate_errors
    def WatchMembership(self, request, context):
        view = self.c.watch(request.job_id, request.after_epoch, request.timeout_ms / 1000.0)
        return pb.WatchMembershipResponse(view=view_to_pb(view))

    @translate_errors
    def GetMembership(self, request, context):
        return pb.GetMembershipResponse(view=view_to_pb(self.c.view(request.job_id, request.epoch)))

    def GetJob(self, request, context):
        with self.c.cond:
            if self.c.job is None:
                return pb.GetJobResponse()
            return pb.GetJobResponse(job_id=self.c.job_id, job=job_to_pb(self.c.job), plan=self._plan())

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
        return pb.HeartbeatResponse(epoch=epoch, lease_ms=int(lease * 1000))

    @translate_errors
    def ReportRestore(self, request, context):
        r = self.c.report_restore(request.job_id, request.shard_id, request.version)
        return pb.ReportRestoreResponse(rollback=rollback_to_pb(r))

    def GetJobStatus(self, request, context):
        c, now = self.c, time.monotonic()
        with c.cond:
            return pb.GetJobStatusResponse(
                job_id=c.job_id,
                job=job_to_pb(c.job) if c.job else None,
                plan=self._plan(),
                view=view_to_pb(c.latest()),
                servers=[pb.ServerInfo(shard_id=i, address=a) for i, a in sorted(c.servers.items())],
                num_servers=c.num_servers,
                pending=[member_to_pb(m) for m in c.pending],
                left_worker_ids=list(c.left),
                rollbacks=[rollback_to_pb(r) for r in c.rollbacks],
                expired_worker_ids=list(c.expired),
                heartbeat_age_s={w: now - t for w, t in c.last_seen.items()},
                worker_counters={w: pb.WorkerCounters(step=step, counters=counters)
                                 for w, (step, counters) in c.reports.items()},
                waiting_for=c.waiting_for,
            )


def rollback_to_pb(r) -> pb.Rollback:
    return pb.Rollback(shard_id=r.shard_id, from_version=r.from_version, to_version=r.to_version, epoch=r.epoch,
                       unix_time=r.unix_time)
