"""``shardps check RUN``: prove or refute shardps' promises over a run's recorded history.

Every role appends what it did to the run's history folder (``runtime/history.py``); this merges
the files and checks, shard by shard, naming the events behind any violation:

- **applied once**: each (job, worker, step) is applied at most once per shard, and each version
  of a shard is made once, except after a recorded rollback (a restore to an earlier version,
  which the job then replays);
- **sync steps are their view's**: a sync step aggregates members of the view governing it
  only, all of them but at most ``backup_workers``, each pushing that step (a step applied in parts
  that a member left midway is recorded ``torn`` and counted: its first parts had that member);
- **nothing acknowledged is lost**: a version a worker was answered with is still there at the end,
  unless a recorded rollback went back past it;
- **versions grow** per process and per shard, by one per update, except at recorded restores;
- **one primary at a time**: the process applying a shard's steps changes only with a new
  placement epoch (a failover) or after a rollback (a restarted server), and a primary of an
  older placement never applies after a newer one did;
- **backups follow their primary**: a backup replays versions in order, and each version it
  replays carries the dedup table its primary applied with (same placement).

The checker reads versions and tables, not times: the processes of one run share a clock, which
orders events across files, but no verdict depends on how close two times are.

    verdict = check_run("runs/x/history")
    verdict.ok, verdict.violations, verdict.counts
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

LINEAGE_RESTORES = ("initialized", "replaced", "checkpoint", "rollback")  # a "copy" only brings a backup level


@dataclass
class Violation:
    promise: str  # which promise: "applied once", "sync view", "acknowledged", "versions", "one primary", "backups"
    what: str  # for people
    events: list[dict]  # the events behind it

    def __str__(self) -> str:
        where = "; ".join(f"{e.get('role')}[{e.get('pid')}]#{e.get('n')} {e.get('kind')} v{e.get('version')}"
                          for e in self.events)
        return f"[{self.promise}] {self.what} ({where})"


@dataclass
class Verdict:
    violations: list[Violation] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # what was checked: events, updates, acks, rollbacks, ...
    incomplete: list[str] = field(default_factory=list)  # files that stopped early (truncated, unreadable lines)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict:
        return {"ok": self.ok, "violations": [str(v) for v in self.violations], "counts": self.counts,
                "incomplete": self.incomplete}


def load(directory: str | Path) -> tuple[list[dict], list[str]]:
    """Every event of the run, ordered by time (file order within a file); and the files that are
    incomplete (truncated at their size cap, or with a torn last line from a killed process)."""
    events, incomplete = [], []
    for path in sorted(Path(directory).glob("*.jsonl")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                if i != len(lines) - 1:  # only a killed process's last line may be torn
                    incomplete.append(f"{path.name}: line {i + 1} is not JSON")
                continue
            event["file"] = path.name
            if event.get("kind") == "truncated":
                incomplete.append(f"{path.name}: stopped at its size cap")
            events.append(event)
    events.sort(key=lambda e: (e.get("t", 0.0), e["file"], e.get("n", 0)))
    return events, incomplete


class _Shard:
    """What the checker knows of one (job, shard) while it walks the events."""

    def __init__(self) -> None:
        self.applied: dict[int, dict] = {}  # version -> the event that made it, since the last lineage restore
        self.pushes: dict[tuple[int, int], dict] = {}  # (worker, step) -> the event that applied it, likewise
        self.version: int | None = None  # the shard's newest version (made or restored)
        self.by_process: dict[str, int] = {}  # process -> the version it holds
        self.primary: str | None = None  # the process that made the newest version
        self.placement = 0  # the newest placement epoch a primary applied in
        self.restored_since_handover = False
        self.rollbacks: list[dict] = []  # lineage restores, in order
        self.primary_tables: dict[tuple[int, int], dict | None] = {}  # (version, placement) -> table applied with
        self.replayed: list[dict] = []


def _process(e: dict) -> str:
    return f"{e.get('role')}[{e.get('pid')}]"


def check_events(events: list[dict]) -> Verdict:
    verdict = Verdict()
    shards: dict[tuple[str, int], _Shard] = defaultdict(_Shard)
    jobs: dict[str, dict] = {}
    acks: list[dict] = []
    bad = verdict.violations.append
    counts: defaultdict[str, int] = defaultdict(int)
    for e in events:
        kind = e.get("kind")
        counts["events"] += 1
        if kind == "job":
            jobs[e["job"]] = e
        elif kind == "acked":
            acks.append(e)
            counts["acks"] += 1
        elif kind == "fault":
            counts["faults"] += 1
        elif kind == "torn":  # a member left a step applied in parts after some parts took its gradient
            counts["torn"] += 1
        elif kind in ("applied", "skipped"):
            counts["updates"] += 1
            _applied(shards[(e["job"], e["shard"])], e, jobs.get(e["job"]), bad)
        elif kind == "replayed":
            counts["replayed"] += 1
            _replayed(shards[(e["job"], e["shard"])], e, bad)
        elif kind == "restored":
            s = shards[(e["job"], e["shard"])]
            s.by_process[_process(e)] = e["version"]
            if e.get("why") in LINEAGE_RESTORES:
                counts["rollbacks" if e.get("why") in ("rollback", "checkpoint") else "starts"] += 1
                _restore(s, e)
    for (_job, shard), s in shards.items():
        for r in s.replayed:  # a backup's update against its primary's (the primary ships before it applies)
            mine = s.primary_tables.get((r["version"], r.get("placement", 0)))
            if mine is not None and mine != r.get("table"):
                bad(Violation("backups", f"shard {shard}: the backup replayed version {r['version']} with another "
                                         f"dedup table than its primary applied it with", [r]))
    _check_acks(shards, acks, bad)
    verdict.counts = dict(counts)
    return verdict


def _restore(s: _Shard, e: dict) -> None:
    v = e["version"]
    s.applied = {k: ev for k, ev in s.applied.items() if k <= v}
    s.pushes = {k: ev for k, ev in s.pushes.items() if ev["version"] <= v}
    s.version = v
    s.restored_since_handover = True
    s.rollbacks.append(e)


def _applied(s: _Shard, e: dict, job: dict | None, bad) -> None:
    v, who, shard = e["version"], _process(e), e["shard"]
    held = s.by_process.get(who)
    if held is not None and v != held + 1:
        bad(Violation("versions", f"shard {shard}: {who} made version {v} while it held {held}", [e]))
    s.by_process[who] = v
    if v in s.applied:
        first = s.applied[v]
        promise = "one primary" if _process(first) != who else "applied once"
        bad(Violation(promise, f"shard {shard}: version {v} was made twice with no rollback between", [first, e]))
    placement = e.get("placement", 0)
    if s.primary is not None and who != s.primary:
        if placement < s.placement or (placement == s.placement and not s.restored_since_handover):
            bad(Violation("one primary", f"shard {shard}: {who} applied in placement {placement} after {s.primary} "
                                         f"had applied in placement {s.placement}, with no failover or rollback "
                                         f"between", [s.applied.get(v - 1) or e, e]))
        s.restored_since_handover = False
    elif placement < s.placement:
        bad(Violation("one primary", f"shard {shard}: a primary of placement {placement} applied after placement "
                                     f"{s.placement} began", [e]))
    s.primary, s.placement = who, max(s.placement, placement)
    s.applied[v] = e
    s.version = v if s.version is None else max(s.version, v)
    s.primary_tables[(v, placement)] = e.get("table")
    pushed = {int(w): step for w, step in (e.get("pushed") or {}).items()}
    for w, step in pushed.items():
        if (w, step) in s.pushes:
            bad(Violation("applied once", f"shard {shard}: worker {w}'s push for step {step} was applied twice",
                          [s.pushes[(w, step)], e]))
        s.pushes[(w, step)] = e
    step, members = e.get("step"), e.get("members")
    if step is not None and members is not None and e.get("kind") == "applied":
        backup = (job or {}).get("backup_workers", 0)
        strangers = sorted(set(pushed) - set(members))
        wrong_step = sorted(w for w, s_ in pushed.items() if s_ != step)
        if strangers or wrong_step or len(pushed) < len(members) - backup:
            bad(Violation("sync view", f"shard {shard}: step {step} aggregated workers {sorted(pushed)} (steps "
                                       f"{pushed}); its view's members are {members} with {backup} backup workers",
                          [e]))


def _replayed(s: _Shard, e: dict, bad) -> None:
    v, who = e["version"], _process(e)
    held = s.by_process.get(who)
    if held is not None and v != held + 1:
        bad(Violation("backups", f"shard {e['shard']}: backup {who} replayed version {v} while it held {held}", [e]))
    s.by_process[who] = v
    s.version = v if s.version is None else max(s.version, v)
    s.replayed.append(e)


def _check_acks(shards: dict, acks: list[dict], bad) -> None:
    for a in acks:
        s = shards.get((a["job"], a["shard"]))
        v = a["version"]
        if s is None:
            continue
        undone = any(r["version"] < v and (r.get("t", 0), r.get("n", 0)) >= (a.get("t", 0), 0) for r in s.rollbacks)
        if not undone and (s.version is None or s.version < v):
            bad(Violation("acknowledged", f"shard {a['shard']}: worker {a['worker']} was answered with version {v}, "
                                          f"but the shard ends at {s.version} and no rollback undid it", [a]))


def check_run(directory: str | Path) -> Verdict:
    """Load a run's history folder (or a run folder holding ``history/``) and check it."""
    folder = Path(directory)
    for inner in ("history", "logs/history"):  # a LocalCluster's log folder, a `shardps run` folder
        if (folder / inner).is_dir():
            folder = folder / inner
            break
    if not folder.is_dir() or not any(folder.glob("*.jsonl")):
        raise FileNotFoundError(f"{directory}: no history here (a run writes one to <run>/history; start roles "
                                f"with --history-dir or SHARDPS_HISTORY_DIR)")
    events, incomplete = load(folder)
    verdict = check_events(events)
    verdict.incomplete = incomplete
    return verdict
