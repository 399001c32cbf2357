"""The coordinator's calls to shard servers (control only, never tensors): list checkpoints, roll back."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

from ..proto.gen import shardps_pb2 as pb
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from ..runtime.rpc import CONTROL_TIMEOUT_S, open_channel, port_refuses
from ..runtime.status import error_from_rpc


@dataclass(frozen=True)
class Checkpoints:
    versions: list[int]  # ascending
    version: int  # the shard's live version
    awaiting_rollback: bool = False  # restored at start-up, waiting for the job to be aligned


class ShardAdmin:
    """Blocking calls with deadlines; a fresh channel per call (rare, small). ``generation`` is the
    coordinator's, sent with every call that changes a shard (see ``coordinator.journal``)."""

    def __init__(self, timeout: float = CONTROL_TIMEOUT_S, security=None):
        self.timeout, self.security, self.generation = timeout, security, 1
        self._kept: dict[str, grpc.Channel] = {}  # the placement calls' channels (a few per second each)
        self._lock = threading.Lock()

    def _call(self, address: str, what: str, fn):
        with open_channel(address, self.security) as channel:
            try:
                return fn(pb_grpc.ShardServiceStub(channel))
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, f"{what} at shard server {address}") from None

    def checkpoints(self, address: str, job_id: str, shard_id: int | None = None, job_name: str = "") -> Checkpoints:
        """The server's checkpoints of its own shard of ``job_id`` and that shard's live version; with
        ``shard_id``, of that shard (a replicated job's primary checkpoints whichever shard it serves) and
        its replica's version there (0: it holds none; ``job_name`` then finds the checkpoints)."""
        req = pb.ListCheckpointsRequest(job_id=job_id, shard_id=shard_id, job_name=job_name)
        reply = self._call(address, "ListCheckpoints", lambda s: s.ListCheckpoints(req, timeout=self.timeout))
        return Checkpoints(list(reply.versions), reply.version, reply.awaiting_rollback)

    def refuses(self, address: str, timeout: float) -> bool:
        """Whether the server's port refuses a fresh connection now: no process listens there (it died).
        False when the port accepts and when the connect times out: a paused or cut-off server is not
        known to be dead. Blocks at most ``timeout`` s."""
        return port_refuses(address, timeout)

    def set_membership(self, address: str, job_id: str, view, from_open_step: bool) -> tuple[bool, int]:
        from ..proto.messages import view_to_pb

        req = pb.SetMembershipRequest(job_id=job_id, view=view_to_pb(view), from_open_step=from_open_step,
                                      coordinator_generation=self.generation)
        reply = self._call(address, "SetMembership", lambda s: s.SetMembership(req, timeout=self.timeout))
        return reply.accepted, reply.version

    def rollback(self, address: str, job_id: str, version: int, epoch: int, shard_id: int | None = None) -> int:
        """Restore the server's checkpoint of ``version`` of its own shard (or of ``shard_id``, whose replica
        it must hold); returns the version it was at."""
        req = pb.RollbackRequest(job_id=job_id, version=version, epoch=epoch, coordinator_generation=self.generation,
                                 shard_id=shard_id)
        return self._call(address, "Rollback", lambda s: s.Rollback(req, timeout=60.0)).from_version

    def set_replicas(self, address: str, rows: list, lease_s: float, timeout: float,
                     lease_from: pb.LeaseClock | None = None) -> tuple[list, pb.LeaseClock]:
        """Tell the server at ``address`` which replicas it holds and renew its primary lease from
        ``lease_from`` (its clock in an earlier answer; None: no renewal); returns [(job_id, shard,
        in-sync backup addresses, unreachable backup addresses)] for its primaries, and its clock now."""
        req = pb.SetReplicasRequest(coordinator_generation=self.generation, lease_ms=int(lease_s * 1000), assignments=[
            pb.ReplicaAssignment(job_id=j, shard_id=k, placement_epoch=e, primary=p, backups=b)
            for j, k, e, p, b in rows], lease_from=lease_from)
        with self._lock:
            channel = self._kept.get(address)
            if channel is None:
                channel = self._kept[address] = open_channel(address, self.security)
        try:
            reply = pb_grpc.ShardServiceStub(channel).SetReplicas(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"SetReplicas at shard server {address}") from None
        return [(r.job_id, r.shard_id, list(r.in_sync), list(r.unreachable)) for r in reply.reports], reply.clock
