"""Domain errors shared by every role.

Cores raise these; each gRPC adapter maps them to a status code in one function
(``shardps.proto.rpc.abort_with``), and the worker maps a status back to the same
class, so a user sees the server's own message. ``code`` names a
``grpc.StatusCode`` member; this module does not import grpc.
"""
from __future__ import annotations

import re


class ShardpsError(Exception):
    """Base class; ``code`` is the gRPC status it travels as."""

    code = "INTERNAL"
    reason = "internal"  # short key for rejection counters


class InvalidArgument(ShardpsError):
    """Malformed input: wrong size, offset, dtype, NaN/Inf values, bad numbers."""

    code = "INVALID_ARGUMENT"
    reason = "invalid_argument"


class FailedPrecondition(ShardpsError):
    """Valid input that does not fit the job: other fingerprint, other job, not initialised, future step."""

    code = "FAILED_PRECONDITION"
    reason = "failed_precondition"


class FutureStep(FailedPrecondition):
    """A push for a step the shard has not reached."""

    reason = "future_step"


class WrongJob(FailedPrecondition):
    """A call for another job, another layout fingerprint or another shard range."""

    reason = "wrong_job"


class UnknownWorker(ShardpsError):
    """The worker id is not in the membership view the push names."""

    code = "NOT_FOUND"
    reason = "unknown_worker"


class StaleStep(ShardpsError):
    """The push is for a step that closed long ago; pull and carry on."""

    code = "ABORTED"
    reason = "stale_step"


class Unavailable(ShardpsError):
    """The cluster is not ready yet (servers missing); retry shortly."""

    code = "UNAVAILABLE"
    reason = "unavailable"


class Unauthenticated(ShardpsError):
    """The call carried no token, or the wrong one; set SHARDPS_AUTH_TOKEN (or auth_token=)."""

    code = "UNAUTHENTICATED"
    reason = "unauthenticated"


class WaitTimeout(ShardpsError):
    """A bounded wait ran out (a sync step did not close in time)."""

    code = "DEADLINE_EXCEEDED"
    reason = "timeout"


class RolledBack(FailedPrecondition):
    """The job rolled back to an earlier step (a shard restarted from its checkpoint); the
    push named an older epoch. The worker pulls and carries on from ``step`` in ``epoch``."""

    reason = "rolled_back"
    PATTERN = re.compile(r"rolled back to step (\d+) in epoch (\d+)")

    def __init__(self, message: str):
        super().__init__(message)
        found = self.PATTERN.search(message)
        self.step, self.epoch = (int(found.group(1)), int(found.group(2))) if found else (0, 0)

    @classmethod
    def at(cls, step: int, epoch: int, detail: str = "") -> "RolledBack":
        return cls(f"the job rolled back to step {step} in epoch {epoch}{detail}; pull and continue from there")


class MembershipChanged(FailedPrecondition):
    """A joining worker's pull waited for the parameters of its join step, and the shard learned a
    newer membership view meanwhile: a dead worker's removal from the open step may make the joiner
    a member from an earlier step, which the shards then wait for instead. The worker fetches the
    views up to ``epoch`` and pulls again from the step they say."""

    reason = "membership_changed"
    PATTERN = re.compile(r"membership changed \(epoch (\d+)\)")

    def __init__(self, message: str):
        super().__init__(message)
        found = self.PATTERN.search(message)
        self.epoch = int(found.group(1)) if found else 0

    @classmethod
    def at(cls, epoch: int, version: int) -> "MembershipChanged":
        return cls(f"the membership changed (epoch {epoch}) while this pull waited for version {version}; pull "
                   "again from the new view's start step")


RECOGNISED = (RolledBack, MembershipChanged)  # FAILED_PRECONDITION errors a client tells apart by their message

BY_CODE = {cls.code: cls for cls in (InvalidArgument, FailedPrecondition, UnknownWorker, StaleStep, Unavailable, WaitTimeout,
                                     Unauthenticated)}
