"""Coordinator core: named jobs, their shard plans, servers and membership views. Never touches tensors.

A cluster runs one or more named jobs (a GAN's generator and discriminator are two)
over the same shard servers; each job has its own id, spec, plan (its flat vector
cut across all servers) and membership. The first worker to register under a name
defines that job; later workers must send the same spec. Training starts when
``min_workers`` workers have registered: that forms membership view 1 (epoch 1,
ranks in registration order). In async mode a later worker joins at once with a
new view. Sync and SSP jobs change membership at a step boundary that every shard
agrees on (``reconfigure``): workers hold leases renewed by heartbeats; a worker
whose lease runs out is removed from the step its shards have open, and a new worker
is added from a step a few steps ahead that no shard has closed yet (every shard
must accept that step before the view is published; see docs/architecture/membership.md).

Everything but leases is durable: with a ``journal`` every change is written to
disk before the call returns, and a restarted coordinator resumes the same jobs
(``coordinator.journal``).

    coord = Coordinator(num_servers=2)
    coord.register_server("127.0.0.1:7071", shard_id=-1)
    reg = coord.register_worker(job, name="host-a", device="cpu")
    view = coord.watch(reg.job_id, after_epoch=0, timeout=30)
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

from ..proto.errors import FailedPrecondition, InvalidArgument, Unavailable, UnknownWorker, WrongJob
from ..proto.defaults import LEASE_S, REPLICA_LEASE_S
from ..runtime.rpc import CONTROL_TIMEOUT_S
from ..proto.messages import (DEFAULT_JOB, JobConfig, MemberInfo, ShardInfo, UpdateMode, View, added_group_jobs,
                              added_group_parent)
from ..proto.plan import DEFAULT_ALIGN, plan_shards
from ..runtime.gauges import JobGauges
from .jobs import JobState, Registration, RollbackRecord
from .placement import Placement
from .restore import Candidates, RestorePoint, choose, list_checkpoints

log = logging.getLogger("shardps.coordinator")

MAX_WATCH_S = 60.0  # longest a WatchMembership call is held open
MAX_JOBS = 64  # named jobs per cluster
MAX_WORKERS_SEEN = 1 << 16  # worker registrations per job over its life (ids are never reused)
MAX_COUNTERS = 32  # fault counters a heartbeat may report
MAX_ADDRESS = 256  # characters of a server address
# A primary's lease runs from its own clock's reading in an answer the coordinator had already received
# when it took ``last_ok`` (server/replica.py), so the lease has run out once the coordinator's clock has
# counted it from ``last_ok``, give or take the two clocks' difference in rate (NTP keeps that under
# 500 ppm; 1 % here). A primary silent that long serves nothing any more: its backup may take over.
LEASE_RATE_MARGIN = 0.01


RESTORE_BACKOFF_S = (0.5, 4.0)  # restore_lost lists checkpoints again after this long, doubling (same servers)


class Coordinator:
    def __init__(self, num_servers: int, align: int = DEFAULT_ALIGN, shards=None, lease_s: float = LEASE_S,
                 journal=None):
        """``shards``: how to reach shard servers (``coordinator.shards.ShardAdmin``); needed for
        membership changes and rollbacks. ``journal``: where the state is kept (None: memory only)."""
        if num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {num_servers}")
        self.num_servers, self.align, self.shards = num_servers, align, shards
        self.lease_s = lease_s
        self.servers: dict[int, str] = {}  # shard_id -> address
        self.jobs: dict[str, JobState] = {}  # by name
        self._next_worker_id = 0  # unique across the cluster's jobs, never reused
        self.generation = 1  # bumped by every restart from the journal; shards refuse older coordinators
        self.replica_lease_s = REPLICA_LEASE_S
        self.last_ok: dict[int, float] = {}  # server -> when it last acknowledged its replica placement
        self.down: set[int] = set()  # servers declared dead (replicated jobs), until they answer again
        self._placing_since: float | None = None  # the first placement round (a server's silence counts from it)
        self.placement_due = threading.Event()  # set: the placement loop sends a round now (a failover)
        self.rounds_started = self.rounds_sent = 0  # placement rounds begun / answered (coordinator.main)
        self.cond = threading.Condition()
        # restore_lost's last listing that found no restore point: (servers then, when to list again, backoff)
        self._restore_failed: tuple[dict[int, str], float, float] | None = None
        self.journal = journal
        if journal is not None:
            journal.restore(self)
            self.generation += 1 if self.jobs or self.servers else 0
            self._persist()

    def _persist(self) -> None:
        """Write the durable state (under the lock) before the change is acknowledged."""
        if self.journal is not None:
            self.journal.write(self)

    # ------------------------------------------------------------------ jobs

    def job(self, job_id: str) -> JobState:
        """The job with id ``job_id`` (under the lock); WrongJob if there is none."""
        for state in self.jobs.values():
            if state.job_id == job_id:
                return state
        raise WrongJob(f"job {job_id[:64]!r} is not one of this cluster's jobs "
                       f"({', '.join(repr(j.job_id) for j in self.jobs.values()) or 'none yet'})")

    def named(self, name: str) -> JobState | None:
        return self.jobs.get(name or DEFAULT_JOB)

    # ------------------------------------------------------------------ servers

    def register_server(self, address: str, shard_id: int = -1) -> int:
        """Record where shard ``shard_id`` is served (-1: the lowest free id). Returns the id."""
        if not address or ":" not in address or len(address) > MAX_ADDRESS:
            raise InvalidArgument(f"server address must be host:port (at most {MAX_ADDRESS} characters), "
                                  f"got {address[:80]!r}")
        with self.cond:
            if shard_id == -1:
                free = [i for i in range(self.num_servers) if i not in self.servers]
                if not free:
                    raise FailedPrecondition(
                        f"all {self.num_servers} shard ids are taken; restart a server with its --shard-id"
                    )
                shard_id = free[0]
            elif not 0 <= shard_id < self.num_servers:
                raise InvalidArgument(f"shard id {shard_id} is outside 0..{self.num_servers - 1}")
            restarted = shard_id in self.servers
            self.servers[shard_id] = address
            if restarted:  # its process is new: the copies it held are gone (replicated jobs fail over now),
                self._lose(shard_id)  # but it is alive: it is placed again as a backup
                self.last_ok[shard_id] = time.monotonic()
                self._orphaned(shard_id)
            for state in self.jobs.values():
                self._replan(state)
            self._persist()
            self.cond.notify_all()
            return shard_id

    # ------------------------------------------------------------------ workers

    def register_worker(self, job: JobConfig, name: str = "", device: str = "") -> Registration:
        with self.cond:
            if len(self.servers) < self.num_servers:
                raise Unavailable(
                    f"waiting for shard servers: {len(self.servers)}/{self.num_servers} registered"
                )
            state = self.named(job.name)
            initializer = state is None
            if initializer:
                state = self._define(job)
            else:
                differences = state.job.differences(job)
                if differences:
                    raise WrongJob(f"refused by job {state.name!r}: " + "; ".join(differences))
            if len(state.registered_ids) >= MAX_WORKERS_SEEN:
                raise FailedPrecondition(f"job {state.name!r} has had {MAX_WORKERS_SEEN} workers; start a new job")
            member = MemberInfo(self._next_worker_id, -1, name[:256], device[:64])
            self._next_worker_id += 1
            state.registered_ids.append(member.worker_id)
            state.last_seen[member.worker_id] = time.monotonic()
            self._admit(state, member)
            self._persist()
            return Registration(state.job_id, member.worker_id, state.job, list(state.plan), initializer)

    def resume(self, job_id: str, job: JobConfig, step: int) -> None:
        """Run a job resumed from a checkpoint: it is defined before any worker registers (nobody
        uploads parameters: the servers restore them) and training starts at ``step``."""
        with self.cond:
            if self.named(job.name) is not None:
                raise FailedPrecondition(f"this coordinator already runs a job named {job.name!r}")
            self._define(job, job_id).start_step = step
            self._persist()

    def _define(self, job: JobConfig, job_id: str = "") -> JobState:
        if len(self.jobs) >= MAX_JOBS:
            raise FailedPrecondition(f"this cluster already runs {MAX_JOBS} jobs; start another cluster")
        if job.replicas > self.num_servers:
            raise FailedPrecondition(f"a job with {job.replicas} replicas needs as many servers; this cluster has "
                                     f"{self.num_servers} (lower replicas or add servers)")
        ranges = plan_shards(job.layout.numel, self.num_servers, self.align)
        plan = [ShardInfo(r, self.servers.get(r.shard_id, "")) for r in ranges]
        state = JobState(job.name, job_id or uuid.uuid4().hex[:16], job, plan, job.first_step)
        if job.replicas > 1:
            state.placement = Placement.initial(self.num_servers, job.replicas)
            self._replan(state)
        self.jobs[job.name] = state
        return state

    def _replan(self, state: JobState) -> None:
        """The plan's addresses from the servers and (replicated jobs) the placement (under the lock)."""
        p = state.placement
        if p is None:
            state.plan = [ShardInfo(s.range, self.servers.get(s.range.shard_id, "")) for s in state.plan]
            return
        state.plan = [ShardInfo(s.range, self.servers.get(p.primary(s.range.shard_id), ""),
                                tuple(self.servers.get(b, "") for b in p.replicas[s.range.shard_id][1:]))
                      for s in state.plan]

    # ------------------------------------------------------------------ replicated shards

    def _lose(self, server: int, reason: str = "dead") -> None:
        """The copies ``server`` held are gone (under the lock): each replicated job's shards fail over to
        in-sync backups. The caller replans and persists."""
        for state in self.jobs.values():
            if state.placement is None:
                continue
            for f in state.placement.lose(server, reason):
                log.warning("job %s: shard %d fails over from server %d to server %d (placement epoch %d)",
                            state.name, f.shard_id, f.from_server, f.to_server, f.epoch)

    def _orphaned(self, server: int) -> None:
        """``server`` restarted (under the lock): shards it is still primary of had no backup in sync
        (``Placement.lose`` moved the others), so no live copy of them is left; ``restore_lost`` restores
        the job from checkpoints once every server answers. Not before training starts: the initializer's
        upload (retried) still makes the shard, as for an unreplicated server (``ShardNode.restore_latest``)."""
        for state in self.jobs.values():
            if state.placement is not None and state.views and (gone := state.placement.restarted(server)):
                log.error("job %s: server %d restarted while no backup of shard(s) %s was in sync: no live copy "
                          "is left; the job will roll back to the newest common checkpoint", state.name, server,
                          sorted(gone))

    def restore_lost(self) -> list[RollbackRecord]:
        """Replicated jobs with a lost shard (no live copy, ``_orphaned``): once every server is registered
        and answers, find the newest checkpoint version common to the job and which server holds each
        shard's (``coordinator.restore``: a primary checkpoints whichever shard it serves, so that may not
        be the shard's home server), make that server the shard's primary (``Placement.restore_homes``),
        tell every server (no lease: a job with a lost shard gets none until it is restored, see
        ``replica_calls``, so no replica serves or copies a stale state meanwhile), then roll the job back
        as for an unreplicated server's restart (``_roll_back``). Called a few times a second; blocks
        while it rolls back (up to a minute per server); raises (and is called again) when a server cannot
        be reached or no checkpoint version is common to every shard."""
        with self.cond:
            due = [s for s in self.jobs.values() if s.placement is not None and s.placement.lost]
            if not due or self.shards is None or len(self.servers) < self.num_servers or self.down:
                return []  # (a server that is down cannot restore its home shard: wait for it)
            addresses = dict(self.servers)
            failed = self._restore_failed
            if failed is not None and failed[0] == addresses and time.monotonic() < failed[1]:
                return []  # the same servers found no restore point a moment ago: list them again later
            candidates = {s.job_id: self._candidates(self._family(s)) for s in due}
        # Outside the lock: a restarted server holds no replica of the job and answers from its disk.
        try:
            points = {job_id: choose(jobs, list_checkpoints(self.shards, jobs, addresses))
                      for job_id, jobs in candidates.items()}
        except Exception:  # unreachable, or no common version: every shard on every server is asked again,
            # after 0.5 s, doubling to 4 s while the same servers keep failing (not four times a second)
            backoff = min(RESTORE_BACKOFF_S[1], 2 * failed[2]) if failed is not None and failed[0] == addresses \
                else RESTORE_BACKOFF_S[0]
            with self.cond:
                self._restore_failed = (addresses, time.monotonic() + backoff, backoff)
            raise
        with self.cond:
            self._restore_failed = None
        with self.cond:
            if self.down or self.servers != addresses:
                return []  # a server died or moved meanwhile: the next call lists again
            changed = [s.placement.restore_homes(self.num_servers, s.job.replicas, points[s.job_id].sources[s.job_id])
                       for s in due]
            if any(changed):
                self.replanned()
            calls, epochs = self._placement_rows(due), {s.job_id: s.placement.epoch for s in due}
        for address, rows in calls.values():  # outside the lock: a server placed anew asks for the job (GetJob)
            self.shards.set_replicas(address, rows, self.replica_lease_s, timeout=CONTROL_TIMEOUT_S)
        out = []
        with self.cond:
            for state in due:
                p = state.placement
                if not p.lost or p.epoch != epochs[state.job_id] or self.down:
                    continue  # the placement changed meanwhile: the next call places it again
                point = points[state.job_id]
                log.warning("job %s: restoring lost shard(s) %s from the checkpoints of version %d on servers %s",
                            state.name, sorted(p.lost), point.target, point.sources[state.job_id])
                out.append(self._roll_back(state, min(p.lost), point))
                p.lost.clear()
                self._persist()
        return out

    def _candidates(self, family: list[JobState]) -> list[Candidates]:
        """Which servers may restore each shard of ``family`` (under the lock): an unreplicated shard its
        own server; a replicated job with a lost shard, any server (home first: placed anew); any other
        replicated job, its primary (its copy lives there)."""
        out = []
        for s in family:
            p = s.placement
            if p is None:
                out.append(Candidates.own(s.job_id, s.job.name, sorted(self.servers)))
            elif p.lost:
                out.append(Candidates(s.job_id, s.job.name, {k: [k, *(j for j in sorted(self.servers) if j != k)]
                                                            for k in p.replicas}, True))
            else:
                out.append(Candidates(s.job_id, s.job.name, {k: [p.primary(k)] for k in p.replicas}, True))
        return out

    def declare_dead(self, sid: int, why: str, reason: str) -> None:
        """Server ``sid`` is dead (under the lock): its shards fail over (``Placement.lose``); the caller
        replans, persists and sends the placement."""
        log.warning("server %d %s: declared dead", sid, why)
        self.down.add(sid)
        self._lose(sid, reason)

    def replica_calls(self) -> dict[int, tuple[str, list]]:
        """server -> (address, [(job_id, shard, placement epoch, primary, backup addresses)]): what every
        server is to hold now. Empty when no job is replicated (nothing to renew)."""
        with self.cond:
            jobs = [s for s in self.jobs.values() if s.placement is not None]
            if not jobs:
                return {}
            # A job with a lost shard renews no lease (its primaries stop serving) until ``restore_lost``
            # has rolled it back; every server is still called (its answers are its liveness).
            jobs = [s for s in jobs if not s.placement.lost]
            self.rounds_started += 1
            if self._placing_since is None:
                self._placing_since = time.monotonic()
            return self._placement_rows(jobs)

    def _placement_rows(self, jobs: list[JobState]) -> dict[int, tuple[str, list]]:
        """server -> (address, its SetReplicas rows) for ``jobs`` (under the lock)."""
        out = {}
        for sid, address in sorted(self.servers.items()):
            rows = []
            for state in jobs:
                for k, primary, backups in state.placement.held_by(sid):
                    rows.append((state.job_id, k, state.placement.epoch, primary,
                                 [self.servers.get(b, "") for b in backups]))
            out[sid] = (address, rows)
        return out

    def replicas_renewed(self, answers: dict[int, tuple[float, list] | None]) -> bool:
        """The servers' answers to one round of placement calls (None: no answer): record who is
        alive and in sync, drop unreachable backups, fail over dead primaries, heal and rebalance.
        Returns whether the placement changed (the servers should hear of it now)."""
        with self.cond:
            now, changed = time.monotonic(), False
            by_address = {a: sid for sid, a in self.servers.items()}
            for sid, answer in answers.items():
                if answer is None:
                    continue
                acked, reports = answer
                self.last_ok[sid] = acked
                self.down.discard(sid)
                for job_id, shard, in_sync, unreachable in reports:
                    try:
                        state = self.job(job_id)
                    except WrongJob:  # answered for a job this coordinator does not run: nothing to learn
                        continue
                    if (state.placement is None or shard not in state.placement.replicas
                            or state.placement.primary(shard) != sid):
                        continue
                    # Journaled: a restarted coordinator must know which backups it may promote.
                    if state.placement.learn_in_sync(shard, {by_address[a] for a in in_sync if a in by_address}):
                        changed = True
                    for address in unreachable:
                        if address in by_address and state.placement.drop(shard, by_address[address]):
                            log.warning("job %s: shard %d's primary cannot reach server %d; it is no longer a "
                                        "backup", state.name, shard, by_address[address])
                            changed = True
            for sid in sorted(self.servers):
                # A server that has not answered once since this coordinator started placing gets longer
                # (its first answer may wait for torch to load; its lease's start is unknown); one that
                # answered, its lease (LEASE_RATE_MARGIN).
                seen = self.last_ok.get(sid)
                silent = now - (seen if seen is not None else self._placing_since or now)
                allowed = (self.replica_lease_s * (1 + LEASE_RATE_MARGIN) if seen is not None
                           else max(10.0, 4 * self.replica_lease_s))
                if sid not in self.down and silent > allowed:
                    self.declare_dead(sid, f"has not answered for {silent:.2f}s", "dead")
                    changed = True
            live = {sid for sid, answer in answers.items() if answer is not None}  # answered just now
            for state in self.jobs.values():
                if state.placement is not None and state.placement.heal(live, self.num_servers, state.job.replicas):
                    changed = True
            if changed:
                self.replanned()
            return changed

    def replanned(self) -> None:
        """The placement changed (under the lock): new plans, journaled; the placement loop sends them
        in its next round (at once when this came from its own round; ``placement_due`` otherwise)."""
        for state in self.jobs.values():
            self._replan(state)
        self._persist()
        self.cond.notify_all()

    def round_sent(self, number: int) -> None:
        """Placement round ``number`` (``rounds_started`` when it began) has been answered or given up."""
        with self.cond:
            self.rounds_sent = max(self.rounds_sent, number)
            self.cond.notify_all()

    def _admit(self, state: JobState, member: MemberInfo) -> None:
        if state.views and state.job.mode is not UpdateMode.ASYNC:
            state.pending.append(member)  # joins at a step boundary: reconfigure()
            return
        if state.views:  # async job already running: join now
            current = state.latest().members
            self._new_view(state, (*current, MemberInfo(member.worker_id, len(current), member.name, member.device)))
            return
        state.pending.append(member)
        if len(state.pending) >= state.job.min_workers:
            ranked = _ranked(state.pending)
            state.pending.clear()
            self._new_view(state, ranked, start_step=state.start_step)

    def _new_view(self, state: JobState, members: tuple[MemberInfo, ...], start_step: int = 0) -> None:
        state.views.append(View(len(state.views) + 1, start_step, members))
        self.cond.notify_all()

    def leave(self, job_id: str, worker_id: int) -> None:
        """A worker is done. Async jobs get a view without it; sync views stay fixed."""
        with self.cond:
            state = self.job(job_id)
            self._check_worker(state, worker_id)
            if worker_id in state.left:
                return
            state.left.append(worker_id)
            state.pending = [m for m in state.pending if m.worker_id != worker_id]
            if state.views and state.job.mode is UpdateMode.ASYNC:
                rest = [m for m in state.latest().members if m.worker_id != worker_id]
                self._new_view(state, _ranked(rest))
            self._persist()

    def _check_worker(self, state: JobState, worker_id: int) -> None:
        if worker_id < 0 or not state.registered(worker_id):
            raise UnknownWorker(f"worker {worker_id} never registered with job {state.name!r}")

    # ------------------------------------------------------------------ leases and membership changes

    def heartbeat(self, job_id: str, worker_id: int, step: int, counters: dict[str, int]) -> tuple[int, float]:
        """Renew ``worker_id``'s lease; returns (newest epoch, lease seconds). ``job(job_id).waiting_for``
        and ``.abandoned`` say why the job cannot go on, when it cannot."""
        if len(counters) > MAX_COUNTERS or any(len(k) > 64 for k in counters):
            raise InvalidArgument(f"a heartbeat reports at most {MAX_COUNTERS} counters with names of at most 64 "
                                  "characters")
        with self.cond:
            state = self.job(job_id)
            if worker_id in state.expired:
                raise UnknownWorker(f"worker {worker_id}'s lease ran out and it was removed from the job; "
                                    "register again to rejoin")
            self._check_worker(state, worker_id)
            state.last_seen[worker_id] = time.monotonic()
            state.reports[worker_id] = (step, dict(counters))
            return state.latest().epoch, self.lease_s

    def reconfigure(self) -> list[View]:
        """Apply due membership changes in every job (called a few times a second): remove members
        whose lease ran out, add workers that registered after training started. Returns the new views."""
        out = []
        with self.cond:
            for state in list(self.jobs.values()):
                view = self._reconfigure(state)
                if view is not None:
                    out.append(view)
                    self._persist()
        return out

    def _reconfigure(self, state: JobState) -> View | None:
        if not state.views:
            return None
        now = time.monotonic()
        current = state.latest().members
        dead = [m for m in current if m.worker_id not in state.left
                and now - state.last_seen.get(m.worker_id, now) > self.lease_s]
        gone = [m for m in current if m.worker_id in state.left]  # left normally: they push no more steps
        alive = [m for m in current if m not in dead and m not in gone]
        if state.job.mode is UpdateMode.ASYNC:
            if dead:
                state.expired += [m.worker_id for m in dead]
                self._new_view(state, _ranked(alive))
            return state.latest() if dead else None
        if (dead or gone) and len(alive) + len(state.pending) < state.job.min_workers:
            why = [f"worker {m.worker_id} left" for m in gone] + [f"the lease of worker {m.worker_id} ran out"
                                                                  for m in dead]
            state.waiting_for = (f"only {len(alive)} of min_workers {state.job.min_workers} workers are in the job "
                                 f"({'; '.join(why)}); start another worker" if alive else "")
            state.abandoned = bool(alive) and not dead
            return None
        state.waiting_for, state.abandoned = "", False
        view, members = None, list(state.latest().members)
        if (dead or gone) and alive:  # from the open step: a leaver's last step closed before it could leave
            state.expired += [m.worker_id for m in dead]
            view = self._install(state, _ranked(alive), from_open_step=True)
            members = list(alive)
        elif dead or gone:  # nobody is left: the joiners' view below replaces them all at once
            members = []
        if state.pending:
            joiners, state.pending = state.pending, []
            # With nobody left in the job no shard can close another step, so the joiners start at the
            # open step (a shard that closed it already takes them from its own open step); with members
            # still training they start a few steps ahead, at a step no shard has closed.
            try:
                view = self._install(state, _ranked([*members, *joiners]), from_open_step=not members)
            except Exception:
                state.pending = joiners + state.pending  # try again next time
                raise
            if not alive:
                state.expired += [m.worker_id for m in dead if m.worker_id not in state.expired]
        return view

    def _install(self, state: JobState, members: tuple[MemberInfo, ...], from_open_step: bool) -> View:
        """Have every shard install the next view, then publish it (under the lock).

        A removal takes effect at the lowest open step (shards that closed it already apply it
        from their own open step: the dead worker's last step may be made up differently on
        different shards, as with backup workers). A join must start at a step no shard has
        closed, so that every shard waits for the new worker there: the coordinator proposes a
        step a few ahead of the furthest shard and proposes again if any shard is already past it.
        """
        epoch = len(state.views) + 1
        margin = 3 + state.job.staleness_bound
        # A server declared dead (replicated jobs: its shards are served elsewhere) is left out; it learns
        # the views from its primaries' copies when it comes back.
        servers = sorted((sid, a) for sid, a in self.servers.items() if sid not in self.down)
        for _ in range(20):
            versions = self._shard_versions(state, servers)
            start = min(versions.values()) if from_open_step else max(versions.values()) + margin
            view = View(epoch, start, members)
            answers = [self.shards.set_membership(a, state.job_id, view, from_open_step) for _, a in servers]
            if all(accepted for accepted, _ in answers):
                state.views.append(view)
                self.cond.notify_all()
                return view
            margin *= 2
        raise Unavailable(f"could not agree on a step for membership epoch {epoch} with the shards; retrying")

    def _shard_versions(self, state: JobState, servers: list[tuple[int, str]]) -> dict[int, int]:
        """shard -> its version now (under the lock): each live server's own shard; for a replicated job, each
        shard's at its primary (a restarted server's own replica may be an empty backup waiting for its copy:
        its 0 is no shard's step)."""
        p = state.placement
        if p is None:
            return {sid: self.shards.checkpoints(a, state.job_id).version for sid, a in servers}
        live = dict(servers)
        versions = {k: self.shards.checkpoints(live[p.primary(k)], state.job_id, k).version
                    for k in sorted(p.replicas) if p.primary(k) in live}
        # (every primary down: no shard's step is known; the live servers' own replicas are all there is)
        return versions or {sid: self.shards.checkpoints(a, state.job_id).version for sid, a in servers}

    # ------------------------------------------------------------------ views

    def watch(self, job_id: str, after_epoch: int, timeout: float) -> View:
        """Block until a view newer than ``after_epoch`` exists or ``timeout`` s pass; return the latest."""
        with self.cond:
            state = self.job(job_id)
            self.cond.wait_for(lambda: state.latest().epoch > after_epoch,
                               timeout=max(0.0, min(timeout, MAX_WATCH_S)))
            return state.latest()

    def view(self, job_id: str, epoch: int) -> View:
        """The view of ``epoch`` (0: the latest)."""
        with self.cond:
            state = self.job(job_id)
            if epoch == 0:
                return state.latest()
            if not 1 <= epoch <= len(state.views):
                raise FailedPrecondition(f"membership epoch {epoch} does not exist (latest is {len(state.views)})")
            return state.views[epoch - 1]

    def collective(self, job_id: str, worker_id: int, name: str, round_: int, payload: bytes,
                   timeout: float) -> tuple[tuple[bytes, ...] | None, int]:
        """Contribute to round ``round_`` of collective ``name`` (``coordinator.collectives``) and wait
        up to ``timeout`` s (capped) for every member of the latest view. Returns (payloads by rank,
        epoch), or (None, epoch) if the round is still open: the caller asks again with the same
        payload. A membership change wakes the wait (a member that left no longer counts)."""
        with self.cond:
            state = self.job(job_id)
            self._check_worker(state, worker_id)
            key = (name, round_)
            r = state.rounds.contribute(state.latest(), worker_id, name, round_, payload)
            if r.result is not None:
                self.cond.notify_all()  # this contribution closed it: wake the others
            else:
                self.cond.wait_for(lambda: state.rounds.close_if_complete(state.latest(), key),
                                   timeout=max(0.0, min(timeout, MAX_WATCH_S)))
            return r.result, (r.epoch if r.result is not None else state.latest().epoch)

    # ------------------------------------------------------------------ recovery

    def report_restore(self, job_id: str, shard_id: int, version: int) -> RollbackRecord:
        """Shard ``shard_id`` restarted and restored its checkpoint of ``version``. Roll every shard
        back to the newest version all of them have a checkpoint of, and start a new membership
        epoch there (same members): workers whose pushes name the old epoch are told to pull and
        go on from that step. A job and the jobs of the param groups added to it (``<job>.g<k>``,
        whose versions are its steps) roll back together, to a step all of them have a checkpoint of:
        one optimizer's parameters at one step. Returns the reported job's rollback. Holds the
        coordinator's lock throughout, so nothing else changes membership meanwhile."""
        with self.cond:
            state = self.job(job_id)
            if not 0 <= shard_id < self.num_servers:
                raise InvalidArgument(f"shard id {shard_id} is outside 0..{self.num_servers - 1}")
            if self.shards is None:
                raise FailedPrecondition("this coordinator cannot reach shard servers to roll them back")
            if len(self.servers) < self.num_servers:
                raise Unavailable(f"waiting for shard servers: {len(self.servers)}/{self.num_servers} registered")
            if not self.shards.checkpoints(self.servers[shard_id], job_id).awaiting_rollback:
                raise FailedPrecondition(f"shard {shard_id} restored no checkpoint that waits for a rollback")
            return self._roll_back(state, shard_id)

    def _roll_back(self, state: JobState, shard_id: int, point: RestorePoint | None = None) -> RollbackRecord:
        """``state``'s job and the jobs of the param groups added to it (``_family``) back to the newest
        version every shard of every one of them has a checkpoint of (``point``, or listed now from the
        servers that may restore each shard: ``_candidates``); returns ``state``'s record (under the lock)."""
        family = self._family(state)
        if point is None:
            jobs = self._candidates(family)
            point = choose(jobs, list_checkpoints(self.shards, jobs, self.servers))
        records = {s.name: self._roll_back_job(s, shard_id, point) for s in family}
        self._persist()
        return records[state.name]

    def _family(self, state: JobState) -> list[JobState]:
        """``state``'s job and the started jobs of the param groups added to it (its parent's, for one of
        those), parent first: they roll back together (under the lock). An async job's versions count pushes,
        not steps: it rolls back on its own."""
        parent = self.jobs.get(added_group_parent(state.name), state)
        if parent.job.mode is UpdateMode.ASYNC:
            return [state]
        groups = [self.jobs[n] for n in added_group_jobs(parent.name, self.jobs)]
        return [parent] + [g for g in groups if g.views or g is state]

    def _roll_back_job(self, state: JobState, shard_id: int, point: RestorePoint) -> RollbackRecord:
        """Each shard of ``state``'s job restores its checkpoint of ``point.target`` on the server ``point``
        chose (an unreplicated one: its own server; a replicated one: its primary, by shard id), and a new
        membership epoch (same members) starts there; recorded as caused by ``shard_id``. The server of
        ``shard_id`` goes last: were another unreachable, a retry finds it as it was."""
        epoch, target = len(state.views) + 1, point.target
        from_version = max(c.version for c in point.listings[state.job_id].values())
        by_shard = state.placement is not None
        for shard, server in sorted(point.sources[state.job_id].items(), key=lambda item: (item[0] == shard_id, item[0])):
            from_version = max(from_version, self.shards.rollback(self.servers[server], state.job_id, target, epoch,
                                                                  shard if by_shard else None))
        if state.placement is not None:  # a lost shard's copies are gone: the workers' steps say how far it got
            from_version = max([from_version, target, *(step for step, _ in state.reports.values())])
        if state.views:
            self._new_view(state, state.latest().members, start_step=target)
        else:  # a resumed job, before training started: the first view starts there
            state.start_step = target
        record = RollbackRecord(shard_id, from_version, target, epoch, time.time())
        state.rollbacks.append(record)
        return record

    # ------------------------------------------------------------------ batch balancing

    def report_throughput(self, job_id: str, worker_id: int, window: int, rate: float,
                          global_batch: int) -> tuple[int, ...]:
        """Record ``rate`` (samples/s over window - 1) and return window's batch size per rank."""
        with self.cond:
            state = self.job(job_id)
            if not state.job.balance_every:
                raise FailedPrecondition("this job keeps equal batches; start its workers with --balance-every N")
            members = state.latest().members
            if worker_id not in {m.worker_id for m in members}:
                raise UnknownWorker(f"worker {worker_id} is not in the job's current view; register first")
            if not (0 <= window < 1 << 40) or not (0 <= rate < float("inf")) or not 0 < global_batch < 1 << 30:
                raise InvalidArgument(f"window ({window}), samples_per_second ({rate}) and global_batch "
                                      f"({global_batch}) must be >= 0, finite and in range")
            known = window in state.balancer.splits
            sizes = state.balancer.report(members, worker_id, window, rate, global_batch)
            if not known:
                self._persist()  # a decided split must survive a restart: every worker must see the same
            return sizes

    def gauges(self) -> list[JobGauges]:
        """Every job, copied under the coordinator's lock: what a metrics scrape reads
        (``runtime.metrics.CoordinatorCollector``)."""
        with self.cond:
            return [JobGauges(job=name, epoch=state.latest().epoch, members=len(state.latest().members),
                              pending=len(state.pending), lease_expiries=len(state.expired),
                              rollbacks=len(state.rollbacks), steps_rolled_back=sum(r.steps for r in state.rollbacks),
                              worker_faults={worker: dict(counters) for worker, (_, counters) in state.reports.items()})
                    for name, state in self.jobs.items()]


def _ranked(members) -> tuple[MemberInfo, ...]:
    """``members`` renumbered 0..n-1 in order."""
    return tuple(MemberInfo(m.worker_id, r, m.name, m.device) for r, m in enumerate(members))
