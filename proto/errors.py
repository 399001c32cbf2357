"""Domain errors shared by every role, each with a typed failure reason.

Cores raise these; each gRPC adapter maps them to a status in one function
(``shardps.runtime.status.abort_with``), and the receiver maps the status back to the
same class (``status.error_from_rpc``), so a user sees the server's own message.

Recovery never reads that message: a status carries the error's ``reason`` and its
structured ``fields`` (the step a job rolled back to, a membership or placement
epoch) as a ``google.rpc.ErrorInfo`` in its details, and the receiver rebuilds the
class from the reason alone (docs/architecture.md, "Failure reasons"). Every reason
is a ``Reason`` constant, and every class that has its own reason is defined here,
so every receiver can rebuild every reason. ``code`` names a ``grpc.StatusCode``
member; this module does not import grpc.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

DOMAIN = "shardps"  # ErrorInfo.domain of every reason below


class Reason:
    """Every failure reason, one source. The value is also the label of the server's rejection
    counters; on the wire it travels upper-case (``wire``), as ErrorInfo asks."""

    INTERNAL = "internal"
    INVALID_ARGUMENT = "invalid_argument"
    FAILED_PRECONDITION = "failed_precondition"
    FUTURE_STEP = "future_step"
    WRONG_JOB = "wrong_job"
    ROLLED_BACK = "rolled_back"
    MEMBERSHIP_CHANGED = "membership_changed"
    NEEDS_COPY = "needs_copy"
    SUPERSEDED = "superseded"
    NO_SHARED_MEMORY = "no_shared_memory"
    NO_LINK = "no_link"
    UNKNOWN_WORKER = "unknown_worker"
    STALE_STEP = "stale_step"
    UNAVAILABLE = "unavailable"
    NOT_PRIMARY = "not_primary"
    UNAUTHENTICATED = "unauthenticated"
    TIMEOUT = "timeout"
    CHECKPOINT_FAILED = "checkpoint_failed"
    SPILL_FAILED = "spill_failed"

    @staticmethod
    def wire(reason: str) -> str:
        return reason.upper()

    @staticmethod
    def from_wire(name: str) -> str:
        return name.lower()


ALL_REASONS = frozenset(v for k, v in vars(Reason).items() if k.isupper())
BY_REASON: dict[str, type[ShardpsError]] = {}  # reason -> the class a receiver rebuilds


class ShardpsError(Exception):
    """Base class; ``code`` is the gRPC status it travels as, ``reason`` what it is, and
    ``fields`` (name -> type) the values a receiver acts on, set as attributes."""

    code = "INTERNAL"
    reason = Reason.INTERNAL
    fields: Mapping[str, type] = {}
    from_transport = False  # set by the receiver: no shardps handler sent it (``runtime.status.error_from_rpc``)

    def __init__(self, message: str = "", **values):
        super().__init__(message)
        unknown = set(values) - set(self.fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}; it has {sorted(self.fields)}")
        for name, kind in self.fields.items():
            setattr(self, name, kind(values.get(name, kind())))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "reason" not in cls.__dict__:
            return  # a grouping of others (ReplicaRefused): travels as its base's reason
        if cls.__module__ != __name__:
            raise TypeError(f"{cls.__name__}: classes with a reason of their own belong in proto/errors.py, "
                            "where every receiver can rebuild them")
        if cls.reason not in ALL_REASONS or cls.reason in BY_REASON:
            raise TypeError(f"{cls.__name__}: reason {cls.reason!r} is not a Reason, or has a class already")
        BY_REASON[cls.reason] = cls

    def values(self) -> dict[str, object]:
        """The structured fields, by name."""
        return {name: getattr(self, name) for name in self.fields}

    @classmethod
    def from_wire(cls, message: str, values: Mapping[str, str]) -> ShardpsError:
        """The error a status carried: ``values`` are ErrorInfo's string metadata, converted to the
        fields' types (a missing or malformed one is the type's zero: a newer peer's extra
        metadata is ignored)."""
        typed = {}
        for name, kind in cls.fields.items():
            try:
                typed[name] = kind(values[name])
            except (KeyError, ValueError, TypeError):
                pass
        return cls(message, **typed)

    def __reduce__(self):  # pickles keep the fields (keyword arguments)
        return functools.partial(type(self), **self.values()), self.args


BY_REASON[Reason.INTERNAL] = ShardpsError


class InvalidArgument(ShardpsError):
    """Malformed input: wrong size, offset, dtype, NaN/Inf values, bad numbers."""

    code = "INVALID_ARGUMENT"
    reason = Reason.INVALID_ARGUMENT


class FailedPrecondition(ShardpsError):
    """Valid input that does not fit the job: other fingerprint, other job, not initialised, future step."""

    code = "FAILED_PRECONDITION"
    reason = Reason.FAILED_PRECONDITION


class FutureStep(FailedPrecondition):
    """A push for a step the shard has not reached."""

    reason = Reason.FUTURE_STEP


class WrongJob(FailedPrecondition):
    """A call for another job, another layout fingerprint or another shard range."""

    reason = Reason.WRONG_JOB


class UnknownWorker(ShardpsError):
    """The worker id is not in the membership view the push names."""

    code = "NOT_FOUND"
    reason = Reason.UNKNOWN_WORKER


class StaleStep(ShardpsError):
    """The push is for a step that closed long ago; pull and carry on."""

    code = "ABORTED"
    reason = Reason.STALE_STEP


class Unavailable(ShardpsError):
    """The cluster is not ready yet (servers missing); retry shortly."""

    code = "UNAVAILABLE"
    reason = Reason.UNAVAILABLE


class NotPrimary(Unavailable):
    """This server does not serve the shard now (a backup, a primary whose lease ran out or that was
    superseded, a step voided by a step-down): ask the coordinator where it is and retry there."""

    reason = Reason.NOT_PRIMARY


class Unauthenticated(ShardpsError):
    """The call carried no token, or the wrong one; set SHARDPS_AUTH_TOKEN (or auth_token=)."""

    code = "UNAUTHENTICATED"
    reason = Reason.UNAUTHENTICATED


class WaitTimeout(ShardpsError):
    """A bounded wait ran out (a sync step did not close in time)."""

    code = "DEADLINE_EXCEEDED"
    reason = Reason.TIMEOUT


class CheckpointError(ShardpsError):
    """A checkpoint could not be written (disk full, I/O error) or read; the previous ones stand."""

    code = "RESOURCE_EXHAUSTED"
    reason = Reason.CHECKPOINT_FAILED


class SpillError(ShardpsError):
    """A spill file (a checkpoint's or a pull's one version of the state, server/tensorfile.py) could not
    be written: a full temporary directory; nothing changed."""

    code = "RESOURCE_EXHAUSTED"
    reason = Reason.SPILL_FAILED


class RolledBack(FailedPrecondition):
    """The job rolled back to an earlier step (a shard restarted from its checkpoint); the
    push named an older epoch. The worker pulls and carries on from ``step`` in ``epoch``."""

    reason = Reason.ROLLED_BACK
    fields = {"step": int, "epoch": int}
    step: int  # set from ``fields`` (declared for the type checker)
    epoch: int

    @classmethod
    def at(cls, step: int, epoch: int, detail: str = "") -> RolledBack:
        return cls(f"the job rolled back to step {step} in epoch {epoch}{detail}; pull and continue from there",
                   step=step, epoch=epoch)


class MembershipChanged(FailedPrecondition):
    """A joining worker's pull waited for the parameters of its join step, and the shard learned a
    newer membership view meanwhile: a dead worker's removal from the open step may make the joiner
    a member from an earlier step, which the shards then wait for instead. The worker fetches the
    views up to ``epoch`` and pulls again from the step they say."""

    reason = Reason.MEMBERSHIP_CHANGED
    fields = {"epoch": int}
    epoch: int  # set from ``fields`` (declared for the type checker)

    @classmethod
    def at(cls, epoch: int, version: int) -> MembershipChanged:
        return cls(f"the membership changed (epoch {epoch}) while this pull waited for version {version}; pull "
                   "again from the new view's start step", epoch=epoch)


class ReplicaRefused(FailedPrecondition):
    """A backup cannot take an update (one of the two below)."""


class NeedsCopy(ReplicaRefused):
    """The backup holds no replica yet, or is not at the version before the update: the primary
    sends it a whole copy first."""

    reason = Reason.NEEDS_COPY


class Superseded(ReplicaRefused):
    """The sender is not the primary of the placement the backup follows (``placement_epoch``, newer,
    or the same one with the backup as its primary): the sender steps down."""

    reason = Reason.SUPERSEDED
    fields = {"placement_epoch": int}
    placement_epoch: int  # set from ``fields`` (declared for the type checker)


class NoSharedMemory(FailedPrecondition):
    """The shard server cannot open the worker's shared-memory segment (another host, no /dev/shm):
    the worker sends that shard's bytes over gRPC."""

    reason = Reason.NO_SHARED_MEMORY


class NoLink(FailedPrecondition):
    """The shard server has no byte link for this worker (never opened, broken, replaced, or the
    server offers none): the worker opens a new link, or sends that shard's bytes over gRPC."""

    reason = Reason.NO_LINK


# Statuses without a reason (the transport's, a deadline, an interceptor's, an injected fault) by code.
BY_CODE = {cls.code: cls for cls in (InvalidArgument, FailedPrecondition, UnknownWorker, StaleStep, Unavailable, WaitTimeout,
                                     Unauthenticated)}

