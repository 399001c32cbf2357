"""The coordinator's durable state: one JSON file, rewritten atomically at every change.

What the coordinator knows (servers, every job's spec, plan, membership views,
rollbacks, decided batch splits, the worker id counter) changes a few times per job
(registrations, joins, lease expiries, rollbacks), never per step, and is small. So
each change rewrites the whole file the way checkpoints are written: a temporary
file, fsync, rename over ``coordinator.json``, fsync of the directory. A crash at any
point leaves the previous state or the new one, never half of one, and a restarted
coordinator (``--state-dir``) resumes the same jobs: workers and servers reattach
without being told. Leases are not kept: a restarted coordinator gives every member a
fresh lease, and a worker that died meanwhile is removed when that runs out.

Only one coordinator may act on a state directory: the journal holds an exclusive
``flock`` on ``coordinator.lock`` for as long as the process lives, and a second one
is refused at start (for a volume shared across hosts, the orchestrator must run one
replica: a Kubernetes Deployment with ``strategy: Recreate`` and a ReadWriteOnce
volume). Each restart also bumps the coordinator's *generation*, which rides on its
calls to the shards; a shard refuses calls from an older generation, so a stale
coordinator that wakes up after being replaced cannot change anything.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
from pathlib import Path

from ..proto.gen import shardps_pb2 as pb
from ..proto.messages import MemberInfo, ShardInfo, View, job_from_pb, job_to_pb
from ..proto.plan import plan_shards

FORMAT = "shardps-coordinator/1"
STATE_FILE = "coordinator.json"
LOCK_FILE = "coordinator.lock"


class JournalError(RuntimeError):
    """The state directory cannot be used (taken by another coordinator, unreadable, another cluster)."""


def _members(members) -> list:
    return [[m.worker_id, m.rank, m.name, m.device] for m in members]


def _from_members(rows) -> tuple[MemberInfo, ...]:
    return tuple(MemberInfo(int(w), int(r), str(n), str(d)) for w, r, n, d in rows)


class Journal:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATE_FILE
        self._lock = open(self.dir / LOCK_FILE, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise JournalError(f"another coordinator is running on {self.dir} (it holds {LOCK_FILE}); stop it "
                               "first: two coordinators acting on one cluster would split its brain") from None

    def close(self) -> None:
        self._lock.close()

    # ------------------------------------------------------------------ write

    def write(self, coord) -> None:
        data = {
            "format": FORMAT, "num_servers": coord.num_servers, "align": coord.align,
            "generation": coord.generation, "next_worker_id": coord._next_worker_id,
            "servers": {str(k): v for k, v in coord.servers.items()},
            "jobs": [self._job(state) for state in coord.jobs.values()],
        }
        tmp = self.dir / f".{STATE_FILE}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _job(state) -> dict:
        return {
            "name": state.name, "job_id": state.job_id, "start_step": state.start_step,
            "spec": base64.b64encode(job_to_pb(state.job).SerializeToString()).decode(),
            "views": [[v.epoch, v.start_step, _members(v.members)] for v in state.views],
            "pending": _members(state.pending), "left": state.left, "expired": state.expired,
            "registered": state.registered_ids,
            "rollbacks": [[r.shard_id, r.from_version, r.to_version, r.epoch, r.unix_time] for r in state.rollbacks],
            "balancer": state.balancer.to_dict(),
            "placement": state.placement.to_dict() if state.placement is not None else None,
        }

    # ------------------------------------------------------------------ read

    def restore(self, coord) -> None:
        """Load the saved state into a fresh ``coord`` (nothing to load: nothing changes)."""
        if not self.path.exists():
            return
        from .placement import Placement
        from .splitter import BatchSplitter
        from .jobs import JobState, RollbackRecord

        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r} is not {FORMAT!r}")
            if int(data["num_servers"]) != coord.num_servers:
                raise JournalError(f"the state in {self.dir} is of a cluster of {data['num_servers']} servers; "
                                   f"start the coordinator with --num-servers {data['num_servers']} (or another "
                                   "--state-dir for a new cluster)")
            coord.generation = int(data["generation"])
            coord._next_worker_id = int(data["next_worker_id"])
            coord.servers = {int(k): str(v) for k, v in data["servers"].items()}
            for j in data["jobs"]:
                job = job_from_pb(pb.JobSpec.FromString(base64.b64decode(j["spec"])))
                plan = [ShardInfo(r, coord.servers.get(r.shard_id, ""))
                        for r in plan_shards(job.layout.numel, coord.num_servers, int(data["align"]))]
                state = JobState(j["name"], j["job_id"], job, plan, int(j["start_step"]))
                state.views = [View(int(e), int(s), _from_members(m)) for e, s, m in j["views"]]
                state.pending = list(_from_members(j["pending"]))
                state.left, state.expired = [int(w) for w in j["left"]], [int(w) for w in j["expired"]]
                state.registered_ids = [int(w) for w in j["registered"]]
                state.rollbacks = [RollbackRecord(int(a), int(b), int(c), int(d), float(t)) for a, b, c, d, t in
                                   j["rollbacks"]]
                state.balancer = BatchSplitter.from_dict(j["balancer"])
                if j.get("placement"):
                    state.placement = Placement.from_dict(j["placement"])
                    coord._replan(state)
                coord.jobs[state.name] = state
        except JournalError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise JournalError(f"cannot read the coordinator state {self.path}: {exc}; move it away to start a "
                               "new cluster") from None
        import time

        now = time.monotonic()
        for state in coord.jobs.values():  # every member gets a fresh lease
            for w in state.registered_ids:
                if w not in state.left and w not in state.expired:
                    state.last_seen[w] = now
