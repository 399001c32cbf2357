"""ShardState: one shard's fp32 master slice, its stock torch optimizer, and the apply.

Plain Python and torch, no gRPC: tests drive it in-process. One lock guards the
whole apply; sync policies wait on ``cond`` (a Condition over that lock). A push
is validated completely before anything changes (its sizes, step options,
hyper-parameters, finite values, buffers), so a rejected push leaves the state
byte-identical. Shard 0 also keeps the job's buffers (rank 0's, as DDP's).

This class keeps what changes together under the lock: the parameters, the optimizer,
the version, the buffers and the dedup table (an apply, a skip, a load, a restore, a
backup's replay or whole copy changes them all at once). Each other concern is an object
of its own, with its invariants in its module and methods the others call (all under
``cond``): the update policy (``modes.py``, which sees this class as ``steps.StepHost``),
the checks made before the lock (``checks.py``), the counters (``stats.py``), the
membership views (``views.py``), the generation and rollback fence (``timeline.py``),
the reply caches (``replies.py``), the shared-memory segments (``segments.py``) and a
replicated shard's role (``replica.py``).

    state = ShardState(ShardRange(0, 0, 128), job, step_timeout=60)
    state.initialize(torch.zeros(128))
    outcome = state.push(push, members=frozenset({0, 1}))
    if outcome.clip_partial is not None:       # a clipped step: every shard's partial -> total
        outcome = state.finish_clip(push, total_norm, outcome.duplicate)
    version, frames = state.snapshot(encode)
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Callable, NoReturn, cast

import torch

from ..proto import optim
from ..proto.errors import (FailedPrecondition, InvalidArgument, MembershipChanged, NeedsCopy, NotPrimary,
                             ShardpsError, Unavailable, WaitTimeout)
from ..runtime.history import NO_HISTORY, History
from ..proto.messages import JobConfig, job_from_pb, job_to_pb
from ..proto.plan import ShardRange
from ..runtime.shm import SegmentFile
from . import tensorfile
from .checkpoint import Snapshot
from .checks import PushChecks, all_finite
from .modes import make_policy
from . import replica as replicas
from .replies import ReplyCache
from .segments import SegmentTable
from .slice_optimizer import SliceOptimizer
from .stats import ShardStats
from .steps import Closed, Outcome, Push
from .timeline import Timeline
from .views import Views

log = logging.getLogger("shardps.server")


class ShardState:
    """The fp32 slice [start, stop) of the flat parameters and the optimizer state for it."""

    def __init__(self, shard: ShardRange, job: JobConfig, job_id: str, step_timeout: float = 300.0):
        self.shard, self.job, self.job_id = shard, job, job_id
        self.param = torch.zeros(shard.numel, dtype=torch.float32)
        self.optimizer = SliceOptimizer(job, shard, self.param)
        self.policy = make_policy(job, step_timeout)
        # Shard 0 keeps the job's persistent buffers (the initializer's, then rank 0's after each step).
        self.buffers: bytes | None = None
        self.transport: dict[int, str] = {}  # the byte path each worker's last push came by (status)
        self.version = job.first_step  # updates applied (counted from the job's first step: an added group's)
        self.last_step: dict[int, int] = {}  # worker_id -> last step applied (the dedup table)
        self.initialized = False
        self.stats = ShardStats()
        self.cond = threading.Condition(threading.Lock())
        # The concerns below each keep their own invariants (their modules say which), all under ``cond``.
        self.checks = PushChecks(shard, job, len(self.optimizer.pieces), self.reject)  # before the lock
        self.replies = ReplyCache()  # the slice of the current version, encoded or copied once for all replies
        self.timeline = Timeline(shard.shard_id, self.stats)  # generation and the rollback fence
        self.on_version: Callable[["ShardState"], None] | None = None  # called under the lock at each new version
        self.history: History = NO_HISTORY  # the run's history (runtime/history.py), set by the node
        self.views = Views()  # membership views known: which members make up each step
        # A replicated job's shard (server/replica.py): this copy's role, and how updates reach backups.
        self.replica: replicas.ReplicaRole | None = replicas.ReplicaRole() if job.replicas > 1 else None
        self.send: replicas.Send | None = None
        self.ship_timeout = self.step_timeout = step_timeout
        self.applied_table: dict[int, int] = {}  # the dedup table as of the last applied version
        # Same-host workers' shared-memory segments (runtime/shm.py, server/segments.py).
        self.segments = SegmentTable(self.cond, job.layout.numel, shard.start, shard.shard_id, self.views.newest,
                                     self.stats.rejections)

    @classmethod
    def from_snapshot(cls, snap: Snapshot, step_timeout: float = 300.0) -> "ShardState":
        """A shard restored from a checkpoint (after a restart)."""
        from ..proto.gen import shardps_pb2 as pb

        job = job_from_pb(pb.JobSpec.FromString(snap.job_spec))
        state = cls(ShardRange(snap.shard_id, snap.start, snap.stop), job, snap.job_id, step_timeout)
        state.restore(snap)
        state.timeline.started_from(snap.version)
        return state

    # ------------------------------------------------------------------ lifecycle

    def initialize(self, params: torch.Tensor, buffers: bytes | None = None, replace: bool = False) -> bool:
        """Set the starting parameters (and shard 0's buffers) once; returns False (and changes
        nothing) if already set. ``replace`` sets them on an initialised shard too, between two
        steps (a worker's deliberate edit: ``ShardedOptimizer.upload_params``)."""
        if params.shape != self.param.shape or params.dtype != torch.float32:
            raise InvalidArgument(
                f"initial parameters must be {self.shard.numel} fp32 elements, "
                f"got {list(params.shape)} {params.dtype}"
            )
        if not all_finite(params):
            raise InvalidArgument("parameters contain NaN or Inf; nothing was changed")
        self.checks.check_buffers(buffers)
        if self.replica is not None:
            self.replica.wait_assigned(self.ship_timeout)
        with self.cond:
            if self.initialized and not replace:
                return False
            self.check_serving()
            self.param.copy_(params)
            if buffers is not None:
                self.buffers = bytes(buffers)
            self.replies.forget()
            first, self.initialized = not self.initialized, True
            self._recopy()  # a replicated shard's backups take the starting point before anyone is told
            self.cond.notify_all()
            self._record("restored", why="initialized" if first else "replaced")
            if first and self.on_version is not None:
                self.on_version(self)  # the first version: the starting point a rollback can always reach
            return True

    def wait_initialized(self, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.initialized, timeout=timeout):
                raise FailedPrecondition(
                    f"shard {self.shard.shard_id} was not initialised within {timeout:.0f}s "
                    "(the initializer worker uploads the starting parameters)"
                )

    # ------------------------------------------------------------------ push

    def push(self, push: Push, members: frozenset[int]) -> Outcome:
        """Submit one push to the policy. Raises a domain error (state unchanged) for bad pushes.

        Sync mode blocks until the push's step closes or the policy's timeout passes.
        ``push.release`` is called exactly once: here, unless the policy kept the gradient.
        """
        try:
            return self._push(push, members)
        finally:
            if not push.kept and push.release is not None:
                push.release()

    def _push(self, push: Push, members: frozenset[int]) -> Outcome:
        self.checks.validate(push)
        with self.cond:
            admitted = self.admit(push, members)
            if admitted is None:
                return Outcome(self.version, 0, False, next_step=self.version, dropped=True)
            members, duplicate = admitted
            return self.policy.submit(self, push, members, duplicate)

    def admit(self, push: Push, members: frozenset[int]) -> tuple[frozenset[int], bool] | None:
        """Under the lock: check that ``push`` may be submitted (raises a domain error, nothing
        changed); returns (the members of its step, whether it is a duplicate), or None for a
        joiner's push that came late (dropped, counted)."""
        if not self.initialized:
            self.stats.rejected("not_initialized")
            raise FailedPrecondition(f"shard {self.shard.shard_id} has no parameters yet; initialise it first")
        self.check_serving()
        self.timeline.check(push.epoch)
        if self.views:  # the views this shard knows decide, not the caller (a view may have changed since)
            members = self.members_for(push.step)
            if push.worker_id not in members and push.step < self.version and self.views.member_later(push.worker_id, push.step):
                # A joiner whose view starts at the job's open step, which this shard closed already
                # (with the members before it): late, as a backup worker's push; it goes on from here.
                self.stats.dropped()
                return None
        try:
            duplicate = self.policy.check(self, push, members)
        except ShardpsError as exc:
            self.stats.rejected(exc.reason)
            raise
        self.stats.received(push.worker_id, duplicate)
        if not duplicate:
            # A new version is coming: drop the cached reply frames now (replies still
            # streaming hold their own reference), so they never coexist with the next
            # step's receive buffers.
            self.replies.forget()
        return members, duplicate

    def finish_clip(self, push: Push, total_norm: float, duplicate: bool) -> Outcome:
        """The total norm of ``push``'s clipped step (after its ``push`` answered with a partial):
        the step is applied with torch's clip coefficient, and the push answered as usual."""
        try:
            with self.cond:
                self.timeline.check(push.epoch)
                try:
                    return self.policy.finish_clip(self, push, total_norm, duplicate)
                except ShardpsError as exc:
                    self.stats.rejected(exc.reason)
                    raise
        finally:
            if not push.kept and push.release is not None:
                push.release()

    def apply(self, grad: torch.Tensor, present: list[bool] | None, hyper: list | None, lr_scale: float = 1.0,
              buffers: bytes | None = None, step: int | None = None, partial: float | None = None,
              pushed: dict[int, int] | None = None, stepped: int = 0) -> None:
        """One optimizer step with ``grad`` (called by the policy, under the lock): pieces not
        ``present`` are skipped, ``hyper`` (the groups' kwargs, None: unchanged) applies from now on.
        ``step``: the sync step it closes (None: async, one push); ``pushed``: worker -> step of the
        pushes behind it (the run's history). A replicated shard's backups apply it first
        (``server/replica.py``). ``stepped``: elements [0, stepped) took the step already, part by part
        (``apply_part``; an unreplicated shard only)."""
        start = time.perf_counter()
        if self.replica is not None:
            self._ship(replicas.Update(self.version + 1, grad, present, self.hyper_json(hyper), lr_scale, buffers,
                                       self._table(step), clip_partial=partial))
        if hyper is not None:
            self.optimizer.set_hyper(hyper)
        if self.shard.numel and stepped < self.shard.numel:
            self.optimizer.step(grad, present, lr_scale, lo=stepped)
        self._next_version(buffers)
        self._record_update("applied", step, pushed)
        self.stats.applied(time.perf_counter() - start)

    @property
    def early_parts(self) -> bool:
        return self.replica is None

    def apply_part(self, grad: torch.Tensor, present: list[bool] | None, hyper: list | None, lr_scale: float,
                   lo: int, hi: int) -> None:
        """Elements [lo, hi) take the open step now (a part every member sent; under the lock): the
        optimizer steps their pieces only; ``apply(stepped=...)`` closes the step."""
        start = time.perf_counter()
        if hyper is not None:
            self.optimizer.set_hyper(hyper)
        self.optimizer.step(grad, present, lr_scale, lo=lo, hi=hi)
        self.stats.applied(time.perf_counter() - start, part=True)

    def torn(self, step: int, worker_id: int, parts: int) -> None:
        log.warning("shard %d: worker %d left step %d after %d part(s) of it were applied with its gradient; the "
                    "rest of the step is applied without it", self.shard.shard_id, worker_id, step, parts)
        self._record("torn", step=step, worker=worker_id, parts=parts)

    def settle(self) -> None:
        """Under the lock: wait while the open step is applied part by part (the slice is between two
        versions then), so that a reader (pull, checkpoint, digest, export) sees one version; the
        step's last parts are on their way. Unavailable after the step timeout (retry)."""
        if not self.policy.mid_step(self):
            return
        if not self.cond.wait_for(lambda: not self.policy.mid_step(self), timeout=self.step_timeout):
            raise Unavailable(f"shard {self.shard.shard_id}'s step {self.version} is still being applied part by "
                              f"part (a member's parts stopped coming); try again")

    def skip(self, buffers: bytes | None = None, step: int | None = None,
             pushed: dict[int, int] | None = None) -> None:
        """Close a step without applying it (an fp16 overflow on some worker), under the lock."""
        if self.replica is not None:
            self._ship(replicas.Update(self.version + 1, None, None, self.hyper_json(), 1.0, buffers,
                                       self._table(step)))
        self.stats.skipped()
        self._next_version(buffers)
        self._record_update("skipped", step, pushed)

    def _record_update(self, kind: str, step: int | None, pushed: dict[int, int] | None) -> None:
        """The run's history: the version just made, the pushes it is made of, who made it."""
        if self.history is NO_HISTORY:
            return
        members = self.members_for(step) if step is not None else None
        self._record(kind, step=step, pushed=_by_name(pushed or {}),
                     members=sorted(members) if members is not None else None, table=_by_name(self._table(step)))

    def _record(self, kind: str, **fields) -> None:
        """One event of the run's history about this shard at its current version (under the lock)."""
        placement = self.replica.placement_epoch if self.replica is not None else 0
        self.history.record(kind, job=self.job_id, shard=self.shard.shard_id, version=self.version,
                            placement=placement, **fields)

    def _table(self, step: int | None) -> dict[int, int]:
        """The dedup table once ``step`` is applied: a worker that pushed later steps already (SSP) has
        pushed this one (a worker's steps come in order), so its entry is this step."""
        if step is None:
            return dict(self.last_step)
        return {w: min(s, step) for w, s in self.last_step.items()}

    def _ship(self, update: replicas.Update) -> None:
        assert self.replica is not None  # only a replicated shard ships
        replicas.ship(self.replica, self, update, self._sender(), self.ship_timeout)
        self.applied_table = update.last_step

    def _sender(self) -> replicas.Send:
        """How updates reach the backups (set by the node when it holds the shard; a primary with no
        backups ships nothing and never calls it)."""
        return cast(replicas.Send, self.send)

    def raise_voided(self, generation: int, during: str) -> NoReturn:
        """Under the lock, for a call that waited while the generation moved on from ``generation``:
        RolledBack when a restore - a rollback - did it, else Unavailable (NotPrimary: the caller
        retries, where the plan says). A replica that stepped down, demoted itself or took a copy
        voided the call's step, and may already serve again (placed primary anew): that is no
        rollback, and the worker must not replay from an earlier step for it. ``during`` ends the
        RolledBack message (what waited)."""
        self.check_serving()
        if not self.timeline.rolled_back_since(generation):
            raise NotPrimary(replicas.moved(self.shard.shard_id, "the step this call waited in was voided (the "
                                            "replica stepped down or took a copy)"))
        raise self.timeline.rolled_back(during)

    def void_open_steps(self) -> None:
        """Under the lock: the steps this replica had open will be closed elsewhere (or again): the
        pushes waiting in them are refused, and their workers' entries in the dedup table go back to
        the last applied version, so that their pushes are applied when they come again."""
        self.last_step = dict(self.applied_table)
        self.timeline.void()  # pushes waiting in a step wake up and are refused
        self.policy.reset()
        self.cond.notify_all()

    # ------------------------------------------------------------------ what a policy calls (steps.StepHost)

    @property
    def generation(self) -> int:
        return self.timeline.generation

    def members_for(self, step: int) -> frozenset[int]:
        return self.views.members_for(step)

    def last_step_of(self, worker_id: int) -> int:
        return self.last_step.get(worker_id, -1)

    def took(self, worker_id: int, step: int) -> None:
        self.last_step[worker_id] = step

    def skip_push(self, buffers: bytes | None) -> None:
        self.stats.skipped()
        if buffers is not None:
            self.buffers = buffers

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return self.cond.wait_for(predicate, timeout=timeout)

    def notify_all(self) -> None:
        self.cond.notify_all()

    def check_serving(self) -> None:
        """Under the lock: refuse work on a replica that is not the shard's primary now (a worker
        with an old plan, or a primary whose lease ran out): Unavailable, which workers retry after
        asking the coordinator where the shard is."""
        if self.replica is None:
            return
        why = self.replica.serving()
        if why:
            self.stats.rejected("not_primary")
            raise NotPrimary(replicas.moved(self.shard.shard_id, why))

    def _next_version(self, buffers: bytes | None) -> None:
        if buffers is not None:
            self.buffers = buffers
        self.version += 1
        if self.on_version is not None:
            self.on_version(self)

    def load_state(self, tensors: dict[str, torch.Tensor], hyper_json: str) -> int:
        """Take over optimizer state by name (``optim/<i>/<key>``) and the groups' hyper-parameters,
        between two steps; checked completely first. Returns the version it applies at."""
        hyper = self.checks.parse_hyper(hyper_json)
        with self.cond:
            self.timeline.check(None)
            try:
                self.optimizer.load_state_tensors(tensors)
            except ValueError as exc:
                self.stats.rejected("bad_state")
                raise InvalidArgument(str(exc)) from None
            if hyper is not None:
                self.optimizer.set_hyper(hyper)
            self._recopy()
            return self.version

    def _recopy(self) -> None:
        """Under the lock: the state changed outside a step (loaded, restored): a replicated primary's
        backups take a whole copy before anyone is answered."""
        if self.replica is None:
            return
        primary = self.replica.unsync()
        if primary and self.initialized:
            replicas.ship(self.replica, self, None, self._sender(), self.ship_timeout)

    # ------------------------------------------------------------------ backup replicas

    def replay(self, header, tensors: dict[str, torch.Tensor]) -> int:
        """A backup applies its primary's update (``server/replica.py``) with the same kernels, so the
        copies stay bit-identical; returns the version. ReplicaRefused when it cannot: it needs a
        whole copy first (new, or not at the version before), or the sender is no longer primary."""
        grad = tensors.get("grad")
        if not header.skipped and (grad is None or grad.numel() != self.shard.numel or grad.dtype != torch.float32):
            raise InvalidArgument(f"an update of shard {self.shard.shard_id} carries {self.shard.numel} fp32 "
                                  "gradient elements")
        present = list(header.present) or None
        if present is not None and len(present) != len(self.optimizer.pieces):
            raise InvalidArgument(f"an update names {len(present)} pieces; shard {self.shard.shard_id} has "
                                  f"{len(self.optimizer.pieces)}")
        blob, hyper = self.checks.replica_parts(header.hyperparams_json, tensors)
        with self.cond:
            self._check_sender(header)
            if self.initialized and self.version == header.version:
                return self.version  # a repeat: the primary's first attempt landed
            if not self.initialized or self.version != header.version - 1:
                raise NeedsCopy(f"needs a whole copy: the backup of shard {self.shard.shard_id} is at version "
                                f"{self.version if self.initialized else 'none'}, the update makes {header.version}")
            if hyper is not None:
                self.optimizer.set_hyper(hyper)
            step = header.version - 1
            if header.skipped:
                self.stats.skipped()
                closed = Closed(0.0, skipped=True)
            else:
                assert grad is not None  # checked above: a replayed step that is not skipped carries one
                if self.shard.numel:
                    self.optimizer.step(grad, present, header.lr_scale)
                closed = Closed(self.optimizer.lr() * header.lr_scale,
                                partial=header.clip_partial if header.HasField("clip_partial") else None)
            self.policy.remember(step, closed)
            self._take_table(header)
            self.replies.forget()
            self._next_version(blob)
            self._record("replayed", skipped=header.skipped, table=_by_name(self.last_step))
            return self.version

    def take_copy(self, header, tensors: dict[str, torch.Tensor]) -> int:
        """A backup takes a whole copy of its primary's replica (a new or restarted backup, or one
        that fell behind): parameters, optimizer state, buffers, version, dedup table, views."""
        param = tensors.get("param")
        if param is None or param.numel() != self.shard.numel or param.dtype != torch.float32:
            raise InvalidArgument(f"a copy of shard {self.shard.shard_id} carries {self.shard.numel} fp32 parameters")
        blob, hyper = self.checks.replica_parts(header.hyperparams_json, tensors)
        views = Views.parse_json(header.views_json)
        with self.cond:
            self._check_sender(header)
            self.policy.reset()
            optimizer = SliceOptimizer(self.job, self.shard, self.param)
            try:
                optimizer.load_state_tensors({k: v for k, v in tensors.items() if k.startswith("optim/")})
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            self.param.copy_(param)
            self.optimizer = optimizer
            if hyper is not None:
                self.optimizer.set_hyper(hyper)
            self.buffers = blob
            self.version = header.version
            self._take_table(header)
            self.views.take(views)
            self.initialized = True
            self.replies.forget()
            self.timeline.copied(header.min_epoch, header.rolled_back_to)
            self._record("restored", why="copy", table=_by_name(self.last_step))
            self.cond.notify_all()
            return self.version

    def _take_table(self, header) -> None:
        """Under the lock: the primary's dedup table, as of the version this replica is now at."""
        self.last_step = {int(w): int(s) for w, s in header.last_step.items()}
        self.applied_table = dict(self.last_step)

    def _check_sender(self, header) -> None:
        """Under the lock: updates come only from the primary of this replica's placement or a newer one."""
        role = self.replica
        if role is None:
            raise FailedPrecondition(f"job {self.job.name!r} keeps no replicas of its shards")
        if role.take_from(header.placement_epoch, self.shard.shard_id):
            # the sender is primary in a newer placement than this stale one (it slept): step down
            replicas.step_down(role, self, f"superseded by placement epoch {header.placement_epoch}")

    # ------------------------------------------------------------------ same-host byte path

    def write_params(self, seg: SegmentFile) -> int:
        """Write the slice into the worker's values in ``seg`` at one version; returns it. A write the
        file refuses (a full /dev/shm) raises NoSharedMemory: the worker sends the push again another
        way, which answers it as the duplicate it is."""
        with self.cond:
            self.settle()
            self.segments.write(seg, self.param)
            self.stats.moved(shm_sent=self.param.numel() * 4)
            return self.version

    # ------------------------------------------------------------------ membership

    def learn_view(self, view, from_open_step: bool = False) -> bool:
        """Install ``view`` (a ``proto.messages.View``) for the steps from its start_step on.

        Refused (False) when this shard already closed that step, since the step was then made
        up of other members; with ``from_open_step`` it governs from the open step instead (a
        dead worker's removal must unblock the step that waits for it). Open steps are made up
        again with the new members; pushes of workers no longer in them are let go.
        """
        with self.cond:
            start = view.start_step
            if self.version > start:
                if not from_open_step:
                    return False
                start = self.version
            self.views.install(view.epoch, start, view.worker_ids)
            self.policy.reconsider(self)
            self.segments.forget_departed()
            self.cond.notify_all()
            return True

    # ------------------------------------------------------------------ checkpoints and rollback

    def checkpoint_snapshot(self, live: bool = False) -> Snapshot:
        """Everything a checkpoint holds, at the current version (call under the lock): copies, or
        with ``live`` the shard's own tensors (no memory taken; valid only until the lock is released,
        for ``CheckpointStore.begin``)."""
        self.settle()
        param = self.param.detach() if live else self.param.detach().clone()
        return Snapshot(self.job_id, job_to_pb(self.job).SerializeToString(), self.shard.shard_id, self.shard.start,
                        self.shard.stop, self.version, dict(self.last_step), param,
                        self.optimizer.state_tensors(copy=not live), self.hyper_json(), self.buffers)

    def hyper_json(self, groups: list | None = None) -> str:
        """The groups' schedulable hyper-parameters (as a push carries them): the current ones, or those of
        ``groups`` (the groups' kwargs a step is about to apply)."""
        return json.dumps(optim.hyper_of(groups if groups is not None else self.optimizer.hyper,
                                         self.job.schedulable()), separators=(",", ":"))

    def restore(self, snap: Snapshot, epoch: int = 0) -> int:
        """Go back (or forward) to ``snap``; pushes waiting in a step are told the job rolled back.
        With ``epoch``, later calls must name at least that membership epoch. Returns the old version."""
        if (snap.shard_id, snap.start, snap.stop) != (self.shard.shard_id, self.shard.start, self.shard.stop):
            raise FailedPrecondition(f"checkpoint of shard {snap.shard_id} [{snap.start}, {snap.stop}) does not fit "
                                     f"shard {self.shard.shard_id} [{self.shard.start}, {self.shard.stop})")
        with self.cond:
            before = self.version
            self.policy.reset()
            self.param.copy_(snap.param)
            self.optimizer = SliceOptimizer(self.job, self.shard, self.param)
            self.optimizer.load_state_tensors(snap.optimizer_state)
            if snap.hyper_json:
                self.optimizer.set_hyper(optim.parse_hyper(self.job.optimizer, self.job.groups, snap.hyper_json))
            self.buffers = snap.buffers
            self.version, self.last_step = snap.version, dict(snap.last_step)
            self.initialized = True
            self.replies.forget()
            self.timeline.restored(snap.version, epoch)
            if epoch:
                self.stats.rolled_back(before - snap.version)
            self.applied_table = dict(self.last_step)
            self._record("restored", why="rollback" if epoch else "checkpoint")
            if self.replica is not None:  # a backup at the same version number may hold other values now
                self.replica.unsync()
            self.cond.notify_all()
            return before

    def reject(self, reason: str) -> None:
        with self.cond:
            self.stats.rejected(reason)

    # ------------------------------------------------------------------ pull

    def wait_for_version(self, version: int, epoch: int, timeout: float) -> None:
        """Block until this shard has reached ``version`` (a joining worker waits for the parameters
        of its join step), or raise once that may never happen: the job rolled back (``RolledBack``)
        or this shard learned a view newer than ``epoch`` (``MembershipChanged``; ``epoch`` 0: newer
        than the views known now). Either can make the waiting worker a member from an earlier
        step, which the shards wait for while it waits for this one. WaitTimeout after ``timeout`` s."""
        with self.cond:
            self.timeline.check(epoch or None)
            generation, known = self.generation, epoch or self.views.latest_epoch
            self.cond.wait_for(lambda: self.version >= version or self.generation != generation
                               or self.views.latest_epoch > known, timeout=timeout)
            if self.version >= version:
                return
            if self.generation != generation:
                self.raise_voided(generation, f" while this pull waited for version {version}")
            if self.views.latest_epoch > known:
                raise MembershipChanged.at(self.views.latest_epoch, version)
            raise WaitTimeout(f"shard {self.shard.shard_id} did not reach version {version} within {timeout:.0f}s "
                              f"(it is at {self.version})")

    def note_transport(self, worker_id: int, path: str) -> None:
        """Which byte path ``worker_id``'s last push came by (grpc, shm or tcp), for status."""
        if self.transport.get(worker_id) != path:
            with self.cond:
                self.transport[worker_id] = path

    def reply_tensor(self, dtype: torch.dtype = torch.float32) -> tuple[int, torch.Tensor]:
        """(version, the slice in ``dtype``) for a reply sent from tensor memory: the live fp32 slice
        where the policy keeps it still while replies go out, else a copy of that version in ``dtype``
        (rounded once, shared by the replies of one version, like ``snapshot``'s encoding)."""
        with self.cond:
            self.settle()
            if dtype is torch.float32 and self.policy.params_still_while_replying:
                return self.version, self.param
            return self.replies.copy(self.version, self.param, dtype)

    def snapshot(self, encode: Callable[[torch.Tensor], list]) -> tuple[int, list]:
        """(version, encode(slice)), cached per version.

        ``encode`` runs under the lock and must copy what it needs (the adapter
        serializes reply frames, which Push and Pull share); the N workers released by
        one sync step then share one encoding.
        """
        with self.cond:
            self.settle()
            return self.replies.encoded(self.version, self.param, encode)

    def export(self, directory: str | None = None, optimizer_state: bool = True) -> tuple[int, tensorfile.Spill, str]:
        """(version, the slice and (``optimizer_state``) its optimizer state, the groups' hyper-parameters)
        at one instant. The tensors (keys "param", then ``optim/<i>/<key>`` per piece) are a Spill: an
        unlinked file in ``directory`` (default: the system's temporary directory, TMPDIR), written under
        the lock from the live tensors, so the copy costs page cache rather than this process's memory;
        pushes wait for that write. The caller closes the Spill. Raises SpillError (RESOURCE_EXHAUSTED)
        when the directory is full."""
        with self.cond:
            self.settle()
            tensors = {"param": self.param, **(self.optimizer.state_tensors(copy=False) if optimizer_state else {})}
            spill = tensorfile.Spill(tensors, directory)
            return self.version, spill, self.hyper_json()

    def add_bytes(self, received: int = 0, sent: int = 0, shm_received: int = 0) -> None:
        with self.cond:
            self.stats.moved(received, sent, shm_received)  # (shm bytes out are counted by write_params)

    def digest(self) -> str:
        """SHA-256 over version, dedup table, hyper-parameters, buffers, parameters and optimizer state,
        all of one version: hashed from the tensors' own memory under the lock (no copy; pushes wait
        for the hashing, about 2 s per GB on a 2-core machine)."""
        with self.cond:
            self.settle()
            h = hashlib.sha256(repr((self.version, sorted(self.last_step.items()), self.hyper_json())).encode())
            h.update(self.buffers or b"")
            tensors = {"param": self.param, **self.optimizer.state_tensors(copy=False)}
            for key in sorted(tensors):
                h.update(key.encode())
                h.update(tensorfile.raw(tensors[key]))
            return h.hexdigest()


def _by_name(table: dict[int, int]) -> dict[str, int]:
    """A worker -> step table with JSON's string keys (the history's form)."""
    return {str(w): s for w, s in table.items()}

