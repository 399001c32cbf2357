"""TensorBoard event files beside the JSONL metrics (the optional ``[tb]`` extra).

    log = TensorBoardLog("runs/X/tensorboard/worker-0")   # ImportError names pip install 'shardps[tb]'
    log.write({"kind": "step", "step": 3, "loss": 0.41, ...})  # the same records as metrics.jsonl
    log.text("faults", "kill server-1", step=40)

One directory per writer (TensorBoard shows each as a run), so workers of one job
overlay in the same charts: ``tensorboard --logdir runs/X/tensorboard``. Scalars:
``train/loss``, ``train/samples_per_s``, ``time/compute_s``, ``time/push_pull_s``,
``staleness/mean`` and ``staleness/max`` (over the shards' replies), ``held_out/<metric>``;
fault counters that moved (retries, timeouts, rollbacks) become ``faults`` text events.
"""
from __future__ import annotations

import json

FAULT_COUNTERS = ("retries", "timeouts", "gave_up", "rollbacks")
INSTALL = "pip install 'shardps[tb]'"


class TensorBoardLog:
    def __init__(self, logdir: str):
        try:  # torch's writer needs the tensorboard package itself
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(f"TensorBoard event files need tensorboard: {INSTALL}") from None
        self.writer = SummaryWriter(log_dir=logdir)
        self._counters = dict.fromkeys(FAULT_COUNTERS, 0)

    def write(self, record: dict) -> None:
        """One metrics.jsonl record (kinds ``start``, ``step``, ``eval``) as events."""
        kind, step, w = record.get("kind"), record.get("step", 0), self.writer
        if kind == "start":
            w.add_text("config", f"```\n{json.dumps(record.get('config', {}), indent=1)}\n```", record["start_step"])
        elif kind == "step":
            w.add_scalar("train/loss", record["loss"], step)
            w.add_scalar("train/samples_per_s", record["samples_per_s"], step)
            w.add_scalar("time/compute_s", record["compute_s"], step)
            w.add_scalar("time/push_pull_s", record["push_pull_s"], step)
            staleness = record.get("staleness") or []
            if staleness:
                w.add_scalar("staleness/mean", sum(staleness) / len(staleness), step)
                w.add_scalar("staleness/max", max(staleness), step)
            moved = [f"{c} +{record[c] - self._counters[c]} (total {record[c]})" for c in FAULT_COUNTERS
                     if record.get(c, 0) > self._counters[c]]
            if moved:
                self.text("faults", ", ".join(moved), step)
                self._counters.update({c: record[c] for c in FAULT_COUNTERS if c in record})
        elif kind == "eval":
            for name, value in record.items():
                if name not in ("kind", "step", "rank", "time") and isinstance(value, (int, float)):
                    w.add_scalar(f"held_out/{name}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        self.writer.close()
