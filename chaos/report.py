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
