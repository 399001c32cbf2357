"""The run directory's pictures (matplotlib, the optional ``[plots]`` extra, Agg backend).

Each function raises ``MissingExtra`` (one line naming ``pip install 'shardps[plots]'``)
when matplotlib is not installed; ``maybe`` turns that into a note for the summary,
since a plot is a side product of a run, never a reason to fail it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .extras import MissingExtra, require


def _pyplot():
    matplotlib = require("matplotlib", "the run's plots")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "the run's plots")


def maybe(draw: Callable, *args, notes: list[str]) -> bool:
    """Call ``draw(*args)``; when matplotlib is missing, append why to ``notes`` and return False."""
    try:
        draw(*args)
        return True
    except MissingExtra as exc:
        notes.append(f"{Path(args[-1]).name} not drawn: {exc}")
        return False


def training_plot(records: list[dict], summary: dict, path: Path) -> None:
    """training.png: train loss (mean of workers) and the held-out metric over steps."""
    plt = _pyplot()
    steps: dict[int, list[float]] = {}
    for r in records:
        if r.get("kind") == "step":
            steps.setdefault(r["step"], []).append(r["loss"])
    evals = [r for r in records if r.get("kind") == "eval"]
    metric = summary["metric"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = sorted(steps)
    ax.plot(xs, [sum(steps[s]) / len(steps[s]) for s in xs], color="tab:blue", label="train loss (mean of workers)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", color="tab:orange",
                 label=f"held-out {metric}")
        ax2.set_ylabel(f"held-out {metric}", color="tab:orange")
    c = summary["config"]
    ax.set_title(f"shardps {summary['workload']}: {c['mode']}, {c['servers']} servers x {c['workers']} workers; "
                 f"held-out {metric} {summary['held_out'][metric]:.4g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def faults_plot(series: dict, timeline, scenario, path: Path) -> None:
    """faults.png: loss and samples/s over time, faults marked (lines; windows shaded)."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax.plot(series["t"], series["loss"], color="tab:blue")
    ax.set_ylabel("train loss")
    ax2.plot(series["t"], series["samples_per_s"], color="tab:green")
    ax2.set_ylabel("samples/s")
    ax2.set_xlabel("seconds since training started")
    starts: dict[tuple, float] = {}
    for e in timeline:
        t = e.unix - series.get("t0_unix", e.unix)
        color = "tab:red" if e.ok else "black"
        if e.action in ("pause", "partition", "link", "rpc"):
            starts[(e.action, e.target)] = t
        undo = {"resume": "pause", "heal": "partition", "unlink": "link", "unrpc": "rpc"}.get(e.action)
        if undo and (undo, e.target) in starts:
            began = starts.pop((undo, e.target))
            for a in (ax, ax2):
                a.axvspan(began, t, color="tab:orange", alpha=0.2)
        for a in (ax, ax2):
            a.axvline(t, color=color, linestyle=":", linewidth=1)
        ax.annotate(f"{e.action} {e.target}", (t, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=7, va="top", ha="right")
    ax.set_title(f"scenario: {scenario.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
