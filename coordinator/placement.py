"""Where a replicated job's shard copies live, and how that changes when servers die and come back.

Pure bookkeeping over server ids (no network, no lock: ``Coordinator`` holds its lock
around these). Shard k of a job with r replicas starts on servers k, k+1, ..., k+r-1
(mod S), the first being its primary. When a server is declared dead, each shard it was
primary of is handed to a backup its primary last reported *in sync* (one that
acknowledged every update the primary answered), and it is dropped as a backup
elsewhere; each change starts a new placement epoch. A server that answers again is
added back as a backup where copies are missing (its primary sends it a whole copy),
and once it is in sync with the shard it is home to, it takes that shard's primary
back (the plan rebalances). A primary that restarts while no backup is in sync took the
shard's only copy with it: the shard is *lost*, and the coordinator restores the job from
checkpoints (``Coordinator.restore_lost``), each shard on the server holding the newest
checkpoint common to the job (its home server when that one does).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

# A backup dropped because its primary cannot reach it (a cut link) is not placed back on that shard for
# this long, doubled at each drop in a row up to the maximum: placed back at once, it would cost the
# primary a copy attempt that hangs until its deadline, round after round.
DROP_BACKOFF_S, MAX_DROP_BACKOFF_S = 1.0, 8.0

# Why a shard's primary moved (``Failover.reason``), for people; all but "rebalance" are failovers.
REASONS = {"dead": "its primary was silent for its lease", "refused": "its primary's port refused connections",
           "rebalance": "handed back", "rollback": "no live copy was left: restored from a checkpoint"}


@dataclass(frozen=True)
class Failover:
    shard_id: int
    from_server: int
    to_server: int
    epoch: int  # the placement epoch it started
    unix_time: float
    # "dead" (the primary stopped answering for its lease), "refused" (its port refused the coordinator
    # after a worker reported its connection refused or reset: the process is gone) or "rebalance"
    # (a server took its shard back) or "rollback" (every copy was lost: restored from a checkpoint)
    reason: str = "dead"


@dataclass
class Placement:
    replicas: dict[int, list[int]]  # shard -> server ids holding a copy, primary first
    epoch: int = 1
    in_sync: dict[int, set[int]] = field(default_factory=dict)  # shard -> backups its primary reported in sync
    failovers: list[Failover] = field(default_factory=list)
    # (shard, server) -> (monotonic time it may be placed back, backoff): dropped as unreachable (not journaled)
    shunned: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    # shards whose only copies were on a primary that restarted before a backup was in sync: nobody holds
    # them until the job is restored from checkpoints (journaled: a restarted coordinator must still do it)
    lost: set[int] = field(default_factory=set)

    @classmethod
    def initial(cls, num_servers: int, replicas: int) -> "Placement":
        return cls({k: [(k + i) % num_servers for i in range(replicas)] for k in range(num_servers)})

    def to_dict(self) -> dict:
        return {"replicas": {str(k): v for k, v in self.replicas.items()}, "epoch": self.epoch,
                "in_sync": {str(k): sorted(v) for k, v in self.in_sync.items()},
                "failovers": [[f.shard_id, f.from_server, f.to_server, f.epoch, f.unix_time, f.reason]
                              for f in self.failovers], "lost": sorted(self.lost)}

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        return cls({int(k): [int(s) for s in v] for k, v in d["replicas"].items()}, int(d["epoch"]),
                   in_sync={int(k): {int(s) for s in v} for k, v in d.get("in_sync", {}).items()},
                   failovers=[Failover(int(a), int(b), int(c), int(e), float(t), str(r))
                              for a, b, c, e, t, r in d.get("failovers", [])],
                   lost={int(k) for k in d.get("lost", [])})

    def primary(self, shard_id: int) -> int:
        return self.replicas[shard_id][0]

    def held_by(self, server: int) -> list[tuple[int, bool, list[int]]]:
        """(shard, is primary, backups) for every copy ``server`` holds."""
        return [(k, reps[0] == server, reps[1:] if reps[0] == server else [])
                for k, reps in sorted(self.replicas.items()) if server in reps]

    def lose(self, server: int, reason: str = "dead") -> list[Failover]:
        """``server`` is dead: promote an in-sync backup of each shard it was primary of, drop it as a
        backup. A shard with no in-sync backup keeps it as primary (it waits for the server to come
        back, or for its checkpoint). Returns the failovers; bumps the epoch if anything changed."""
        out, changed = [], False
        for k, reps in self.replicas.items():
            if server not in reps:
                continue
            if reps[0] == server:
                candidates = [b for b in reps[1:] if b in self.in_sync.get(k, set())]
                if not candidates:
                    continue
                new = candidates[0]
                self.replicas[k] = [new] + [b for b in reps if b not in (server, new)]
                out.append(Failover(k, server, new, self.epoch + 1, time.time(), reason))
                # The other in-sync backups acknowledged every update the lost primary answered: they stay
                # promotable (one may lack an update the new primary has; it gets a copy, never answers less).
                self.in_sync[k] = self.in_sync.get(k, set()) - {new, server}
            else:
                self.replicas[k] = [b for b in reps if b != server]
                self.in_sync.get(k, set()).discard(server)
            changed = True
        if changed:
            self.epoch += 1
            self.failovers.extend(out)
        return out

    def restarted(self, server: int) -> set[int]:
        """``server`` restarted (after ``lose``): the shards it is still primary of had no backup in sync,
        so their only copy died with its process. They are lost; returns them."""
        gone = {k for k, reps in self.replicas.items() if reps[0] == server}
        self.lost |= gone
        return gone

    def restore_homes(self, num_servers: int, want: int, primaries: dict[int, int] | None = None) -> bool:
        """Place every shard as at the start (shard k's primary on server k, the backups after it), or
        with ``primaries``, shard k's primary on ``primaries[k]`` (the server whose disk holds the
        checkpoint the job goes back to; ``coordinator.restore``) and the rest of its home copies after
        it; none in sync: the job rolls back to a checkpoint, and every backup gets a whole copy of the
        restored primary (a shard away from home goes back once its home copy is in sync, ``heal``).
        Returns whether anything changed (a new epoch)."""
        home = Placement.initial(num_servers, want).replicas
        for k, primary in (primaries or {}).items():
            home[k] = [primary, *(s for s in home[k] if s != primary)][:want]
        out = [Failover(k, reps[0], home[k][0], self.epoch + 1, time.time(), "rollback")
               for k, reps in sorted(self.replicas.items()) if reps[0] != home[k][0]]
        changed = home != self.replicas or any(self.in_sync.values()) or bool(out)
        self.replicas, self.in_sync = home, {}
        self.shunned.clear()
        if changed:
            self.epoch += 1
            self.failovers.extend(out)
        return changed

    def learn_in_sync(self, shard_id: int, reported: set[int]) -> bool:
        """The primary reports the backups it knows hold its version. A backup joins the set once
        reported; it leaves only by being dropped or lost: a new primary reports none until it has
        shipped to them, but they acknowledged every update that was ever answered."""
        merged = (self.in_sync.get(shard_id, set()) | reported) & set(self.replicas[shard_id][1:])
        for server in merged:  # reachable again: a later drop starts from the shortest backoff
            self.shunned.pop((shard_id, server), None)
        if merged == self.in_sync.get(shard_id, set()):
            return False
        self.in_sync[shard_id] = merged
        return True

    def drop(self, shard_id: int, server: int) -> bool:
        """Shard ``shard_id``'s primary cannot reach backup ``server``: it stops being one."""
        reps = self.replicas[shard_id]
        if server not in reps[1:]:
            return False
        reps.remove(server)
        self.in_sync.get(shard_id, set()).discard(server)
        _, backoff = self.shunned.get((shard_id, server), (0.0, DROP_BACKOFF_S / 2))
        backoff = min(2 * backoff, MAX_DROP_BACKOFF_S)
        self.shunned[(shard_id, server)] = (time.monotonic() + backoff, backoff)
        self.epoch += 1
        return True

    def heal(self, live: set[int], num_servers: int, want: int, now: float | None = None) -> bool:
        """Add live servers as backups where copies are missing (home server first; not one its primary
        could not reach, until its backoff ends at ``now``, monotonic seconds); hand a shard back to its
        home server once that one is in sync. Returns whether anything changed."""
        changed, now = False, time.monotonic() if now is None else now
        for k, reps in self.replicas.items():
            for i in range(num_servers):
                if len(reps) >= want:
                    break
                candidate = (k + i) % num_servers
                if candidate in live and candidate not in reps and now >= self.shunned.get((k, candidate), (0.0,))[0]:
                    reps.append(candidate)
                    changed = True
            if reps[0] != k and k in reps and k in self.in_sync.get(k, set()) and reps[0] in live:
                old = reps[0]
                self.replicas[k] = [k] + [b for b in reps if b != k]
                self.failovers.append(Failover(k, old, k, self.epoch + 1, time.time(), "rebalance"))
                self.in_sync[k] = (self.in_sync[k] - {k}) | {old}  # the old primary holds every answered version
                changed = True
        if changed:
            self.epoch += 1
        return changed
