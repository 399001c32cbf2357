"""The report of a run with a fault scenario: what was injected when, and what it did.

Writes into the run directory:

    report.json   scenario, fault timeline, counters (per role), and per-step series
    report.md     the same for people: timeline table, counters, the plot
    faults.png    loss and samples/s over time, faults marked (lines; windows shaded)
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..coordinator.placement import REASONS
from .scenario import CHAOS_KINDS


def _series(records: list[dict]) -> dict:
    """Per-step loss (mean of workers), samples/s and cumulative worker counters, against time."""
    steps = [r for r in records if r.get("kind") == "step"]
    if not steps:
        return {"t": [], "loss": [], "samples_per_s": []}
    t0 = min(r["time"] - r["compute_s"] - r["push_pull_s"] for r in steps)
    by_step: dict[tuple[int, int], list[dict]] = {}  # (epoch, step): a rollback replays steps in a new epoch
    for r in steps:
        by_step.setdefault((r.get("epoch", 0), r["step"]), []).append(r)
    order = sorted(by_step, key=lambda s: max(r["time"] for r in by_step[s]))
    return {
        "t": [max(r["time"] for r in by_step[s]) - t0 for s in order],
        "step": [s for _, s in order],
        "loss": [sum(r["loss"] for r in by_step[s]) / len(by_step[s]) for s in order],
        "samples_per_s": [sum(r["samples"] / max(1e-9, r["compute_s"] + r["push_pull_s"]) for r in by_step[s])
                          for s in order],
        "t0_unix": t0,
    }


def _worker_counters(records: list[dict]) -> dict:
    """The last counters each worker process reported (retries, timeouts, rollbacks)."""
    last: dict[int, dict] = {}
    for r in records:
        if r.get("kind") == "step" and "retries" in r:
            last[r["worker_id"]] = {k: r[k] for k in ("retries", "timeouts", "gave_up", "rollbacks")}
    return last


def _mean_staleness(shards: list[dict]) -> float:
    counted = [s["staleness"] for s in shards if s.get("staleness", {}).get("count")]
    total = sum(st["count"] for st in counted)
    return round(sum(st["mean"] * st["count"] for st in counted) / total, 3) if total else 0.0


def chaos_pacing(timeline: list[dict]) -> dict:
    """What the failures of a timeline (``asdict`` of its events) were like, as they happened: a failure is
    a kill, pause or partition, and it lasted until the restart, resume or heal of its target after it
    returned (for a worker, its process started: joining the job takes longer). Returns the failures
    counted, the realised MTBF (mean time between consecutive failures' starts), downtime (mean and max)
    and healthy running between one failure's end and the next failure (mean and min), in seconds; the
    step at the first failure and at the last end, and the seconds between them (None where undefined)."""
    failures = [i for i, e in enumerate(timeline) if e["action"] in CHAOS_KINDS]
    spans = []  # (failure event, end event or None)
    for i in failures:
        e = timeline[i]
        end = next((x for x in timeline[i + 1:] if x["target"] == e["target"]
                    and x["action"] == CHAOS_KINDS[e["action"]]), None)
        spans.append((e, end))
    ended = [(e, end["time_s"] + end.get("took_s", 0.0)) for e, end in spans if end is not None]
    down = [t - e["time_s"] for e, t in ended]
    starts = [e["time_s"] for e, _ in spans]
    healthy = [nxt[0]["time_s"] - (end["time_s"] + end.get("took_s", 0.0))
               for (_, end), nxt in zip(spans, spans[1:]) if end is not None]

    def mean(xs):
        return round(sum(xs) / len(xs), 3) if xs else None

    window = (ended[-1][1] - starts[0]) if ended else None
    last_end = next((end for _, end in reversed(spans) if end is not None), None)
    return {"failures": len(spans), "mtbf_s": round((starts[-1] - starts[0]) / (len(starts) - 1), 3)
            if len(starts) > 1 else None,
            "downtime_s": mean(down), "downtime_max_s": round(max(down), 3) if down else None,
            "healthy_s": mean(healthy), "healthy_min_s": round(min(healthy), 3) if healthy else None,
            "window_s": round(window, 3) if window is not None else None,
            "steps_in_window": (last_end["step"] - spans[0][0]["step"]) if last_end is not None else None}


def write_report(out: Path, scenario, timeline, records: list[dict], status: dict, faults: dict,
                 summary: dict, draw: Callable[..., bool] | None = None) -> dict:
    """Write report.json and report.md; ``draw(series, timeline, scenario, path)`` draws faults.png
    (returning False when it cannot, e.g. without matplotlib)."""
    series = _series(records)
    workers = _worker_counters(records)
    shards = status.get("shards", [])
    counters = {
        "retries": sum(w["retries"] for w in workers.values()),
        "timeouts": sum(w["timeouts"] for w in workers.values()),
        "rollbacks": len(status.get("rollbacks", [])),
        "steps_rolled_back": sum(r["steps"] for r in status.get("rollbacks", [])),
        "failovers": sum(f["reason"] not in ("rebalance", "rollback") for f in status.get("failovers", [])),
        "shards_handed_back": sum(f["reason"] == "rebalance" for f in status.get("failovers", [])),
        "deduplicated_pushes": sum(s.get("duplicates", 0) for s in shards),
        "dropped_pushes": sum(s.get("dropped", 0) for s in shards),
        "rejected_pushes": sum(s.get("rejected", 0) for s in shards),
        "lease_expiries": len(status.get("membership", {}).get("expired", [])),
        "membership_epoch": status.get("membership", {}).get("epoch", 0),
        "injected_rpc_faults": sum(n for role in faults.get("rpc_injected", {}).values() if isinstance(role, dict)
                                   for n in role.values()),
        "process_faults": faults.get("process", {}),
        "checkpoints_written": sum(s.get("checkpoints_written", 0) for s in shards),
        "staleness_max": max((s.get("staleness", {}).get("max", 0) for s in shards), default=0),
        "staleness_mean": _mean_staleness(shards),
    }
    report = {
        "scenario": scenario.name,
        "faults": [f.describe() for f in scenario.faults],
        "timeline": [asdict(e) for e in timeline],
        "counters": counters,
        "per_worker": workers,
        "per_shard": [{k: s.get(k) for k in ("shard_id", "version", "duplicates", "dropped", "rejected", "rollbacks",
                                             "steps_rolled_back", "checkpoints_written", "checkpoint_failures")}
                      for s in shards],
        "rollbacks": status.get("rollbacks", []),
        "failovers": status.get("failovers", []),
        "network": faults.get("network", {}),
        "rpc_injected": faults.get("rpc_injected", {}),
        "result": {"steps": summary["steps"], "held_out": summary["held_out"], "wall_s": summary["wall_s"]},
        "history": summary.get("history"),  # shardps check's verdict over the run's recorded history
        "pacing": chaos_pacing([asdict(e) for e in timeline]),  # the failures as they happened
        "series": series,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["plot"] = "faults.png" if draw is not None and draw(series, timeline, scenario, out / "faults.png") else ""
    (out / "report.md").write_text(_markdown(report))
    return {"path": str(out / "report.md"), "counters": counters}


def _markdown(r: dict) -> str:
    lines = [f"# Fault report: {r['scenario']}", "", "## Scenario", ""]
    lines += [f"- {f}" for f in r["faults"]]
    lines += ["", "## Timeline", "", "| time (s) | step | action | target | outcome |", "|---|---|---|---|---|"]
    for e in r["timeline"]:
        lines.append(f"| {e['time_s']:.1f} | {e['step']} | {e['action']} | {e['target']} | "
                     f"{'ok' if e['ok'] else 'FAILED: ' + e['error']} |")
    pacing = r["pacing"]
    if pacing["failures"]:
        lines += ["", "## Failures as they happened", "",
                  (f"- {pacing['failures']} failures; mean time between their starts {pacing['mtbf_s']} s; down "
                  f"{pacing['downtime_s']} s on average (longest {pacing['downtime_max_s']} s, until the restart, "
                  f"resume or heal returned); healthy between one's end and the next {pacing['healthy_s']} s on "
                  f"average (shortest {pacing['healthy_min_s']} s)")]
    lines += ["", "## What the system counted", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in r["counters"].items()]
    for rb in r["rollbacks"]:
        lines.append(f"- rollback: shard {rb['shard_id']} restarted; every shard went back from version "
                     f"{rb['from_version']} to {rb['to_version']} ({rb['steps']} steps replayed), epoch {rb['epoch']}")
    for f in r.get("failovers", []):
        lines.append(f"- shard {f['shard_id']}: primary moved from server {f['from_server']} to server {f['to_server']} "
                     f"({REASONS.get(f['reason'], f['reason'])}, placement epoch "
                     f"{f['placement_epoch']}); nothing rolled back")
    verdict = r.get("history")
    if verdict is not None:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(verdict["counts"].items()))
        lines += ["", "## Verdict (shardps check)", "",
                  f"- {'every promise held' if verdict['ok'] else 'VIOLATED'} over the recorded history: {counts}"]
        lines += [f"- {v}" for v in verdict["violations"]] + [f"- incomplete: {i}" for i in verdict["incomplete"]]
    res = r["result"]
    lines += ["", "## Result", "", f"- steps: {res['steps']}, wall: {res['wall_s']:.1f} s",
              f"- held-out: {json.dumps(res['held_out'])}", ""]
    if r.get("plot"):
        lines += [f"![faults]({r['plot']})", ""]
    return "\n".join(lines)
