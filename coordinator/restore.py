"""Where a job rolls back to, and which server restores each of its shards (``Coordinator._roll_back``).

An unreplicated job's shard k lives on server k, and only server k's disk holds its checkpoints.
A replicated job's primary checkpoints whichever shard it serves, on its own disk: after a failover
the newest checkpoints of shard k are on the server that took it over, and the home server's stop
where it lost the shard (its oldest may be pruned by then). Where every server has a disk of its own,
restoring a lost shard from its home server would roll the job back further than it must, or find
no version common to every shard at all (the job would never come back). So a lost replicated
shard's candidates are every server: ``list_checkpoints`` asks each for its checkpoints of each
shard, and ``choose`` picks the newest version that every shard of every job rolling back together
has on some server, and, per shard, the server that restores it (its home server when it holds that
version, else the lowest-numbered one that does). The coordinator makes that server the shard's
primary (``Placement.restore_homes``) before it rolls the job back.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..proto.errors import FailedPrecondition
from .shards import Checkpoints


@dataclass(frozen=True)
class Candidates:
    """One job of those rolling back together, and which servers may restore each of its shards."""

    job_id: str
    name: str
    servers: dict[int, list[int]]  # shard -> servers that may restore it, preferred first
    by_shard: bool  # ask each server for a shard by id (replicated jobs); else every server for its own shard

    @classmethod
    def own(cls, job_id: str, name: str, servers: list[int]) -> "Candidates":
        """An unreplicated job: shard k from server k."""
        return cls(job_id, name, {sid: [sid] for sid in servers}, False)


@dataclass(frozen=True)
class RestorePoint:
    target: int  # the version every shard goes back to
    sources: dict[str, dict[int, int]]  # job_id -> shard -> the server that restores it
    listings: dict[str, dict[tuple[int, int], Checkpoints]]  # job_id -> (shard, server) -> what it listed


def list_checkpoints(admin, jobs: list[Candidates], addresses: dict[int, str]) -> dict:
    """job_id -> (shard, server) -> that server's checkpoints of that shard. Blocks for one call per
    pair (``ShardAdmin.checkpoints``, each with a deadline); raises the first that fails."""
    out: dict[str, dict[tuple[int, int], Checkpoints]] = {}
    for job in jobs:
        listed = out.setdefault(job.job_id, {})
        for shard, servers in sorted(job.servers.items()):
            for server in servers:
                listed[shard, server] = (
                    admin.checkpoints(addresses[server], job.job_id, shard, job.name) if job.by_shard
                    else admin.checkpoints(addresses[server], job.job_id))
    return out


def choose(jobs: list[Candidates], listings: dict) -> RestorePoint:
    """The newest version every shard of every job has a checkpoint of on one of its candidate servers,
    and who restores each shard; FailedPrecondition naming what each server holds when there is none."""
    have = {(job.job_id, shard): {v for s in servers for v in listings[job.job_id][shard, s].versions}
            for job in jobs for shard, servers in job.servers.items()}
    common = set.intersection(*have.values()) if have else set()
    if not common:
        many = len(jobs) > 1
        raise FailedPrecondition(
            "no checkpoint version is common to every shard: "
            + "; ".join(f"{f'job {job.name}, ' if many else ''}shard {shard}"
                        + (f" has {listings[job.job_id][shard, servers[0]].versions}" if not job.by_shard else
                           " has " + ", ".join(f"{listings[job.job_id][shard, s].versions} on server {s}"
                                               for s in servers))
                        for job in jobs for shard, servers in sorted(job.servers.items()))
            + " (checkpoint every shard at the same versions: --checkpoint-every)")
    target = max(common)
    sources = {job.job_id: {shard: next(s for s in servers if target in listings[job.job_id][shard, s].versions)
                            for shard, servers in job.servers.items()} for job in jobs}
    return RestorePoint(target, sources, listings)
