"""What the ``shardps`` command shows a person: a live progress display, summaries, status tables."""
from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..coordinator.placement import REASONS

console = Console()


@contextlib.contextmanager
def live_progress(config):
    """Yields a callback that redraws step, loss, samples/s and per-shard versions."""
    started = time.time()
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        live.update(f"starting a coordinator, {config.servers} shard servers and {config.workers} workers...")

        def show(p):
            table = Table(title=f"shardps run: {config.workload}, {config.mode}, "
                                f"{config.servers} servers x {config.workers} workers", title_justify="left")
            for col in ("step", "train loss", "samples/s", "shard versions", "held-out", "elapsed"):
                table.add_column(col)
            held_out = ", ".join(f"{k} {v:.4g}" for k, v in p.evaluation.items()) or "-"
            table.add_row(
                f"{p.step + 1}/{p.steps or '?'}",
                f"{p.loss:.4f}" if p.loss is not None else "-",
                f"{p.samples_per_s:,.0f}",
                " ".join(str(v) for v in p.versions) or "-",
                held_out,
                f"{time.time() - started:.1f}s",
            )
            live.update(table)

        yield show


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def print_summary(s: dict) -> None:
    table = Table(title="summary", show_header=False, title_justify="left")
    metric = s["metric"]
    rows = [
        ("workload", f"{s['workload']} ({s['numel']:,} parameters)"),
        ("steps", str(s["steps"])),
        ("final train loss", f"{s['final_train_loss']:.4f}"),
        (f"held-out {metric}", f"{s['held_out'][metric]:.4f}"),
        ("held-out loss", f"{s['held_out']['loss']:.4f}"),
        ("wall time", f"{s['wall_s']:.1f} s"),
        ("samples/s (training)", f"{s['samples_per_s']:,.0f}"),
        ("updates per shard", " ".join(str(v) for v in s["updates_per_shard"])
         + (f" ({', '.join(s['fragments'])}: each one's shards in turn)" if s.get("fragments") else "")),
        ("bytes over gRPC", f"{_bytes(s['bytes_in'])} pushed, {_bytes(s['bytes_out'])} pulled"),
        ("bytes through shared memory", (f"{_bytes(s.get('shm_bytes_in', 0))} pushed, "
                                         f"{_bytes(s.get('shm_bytes_out', 0))} pulled")),
        ("run directory", s["out"]),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    for note in s.get("notes", []):
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)  # [plots] is no markup


def print_status(st: dict) -> None:
    job = st["job"]
    if not job:
        console.print(f"coordinator {st['coordinator']}: no job yet ({st['num_servers']} servers expected)")
    else:
        console.print(f"job {st['job_id']}: {job['mode']}, {job['optimizer']} {job['optimizer_kwargs']}, "
                      f"{job['numel']:,} parameters, min_workers {job['min_workers']}")
    if st.get("fragments"):
        console.print(f"streaming DiLoCo: the model in {len(st['fragments'])} fragments, each a job of its own: "
                      f"{', '.join(st['fragments'])} (shardps status --job NAME for one)")
    if st.get("added_groups"):
        console.print(f"param groups added during training, each a job of its own: {', '.join(st['added_groups'])} "
                      "(shardps status --job NAME)")
    m = st["membership"]
    workers = Table(title=f"membership (epoch {m['epoch']})", title_justify="left")
    for col in ("worker", "rank", "name", "device", "last push", "heartbeat", "step", "retries", "timeouts",
                "rollbacks"):
        workers.add_column(col)
    for w in m["workers"]:
        seen = f"{time.time() - w['last_seen_unix']:.1f}s ago" if w["last_seen_unix"] else "-"
        beat = m.get("heartbeat_age_s", {}).get(str(w["worker_id"]))
        c = m.get("worker_counters", {}).get(str(w["worker_id"]), {})
        workers.add_row(str(w["worker_id"]), str(w["rank"]), w["name"], w["device"], seen,
                        f"{beat:.1f}s ago" if beat is not None else "-",
                        *(str(c.get(k, "-")) for k in ("step", "retries", "timeouts", "rollbacks")))
    console.print(workers)
    if m.get("waiting_for"):
        console.print(f"[bold yellow]waiting:[/] {m['waiting_for']}")
    if m.get("expired"):
        console.print(f"lease expired (removed): workers {m['expired']}")
    for role, counts in st.get("faults_injected", {}).items():
        console.print(f"injected RPC faults on {role}: {counts}")
    for rb in st.get("rollbacks", []):
        console.print(f"rollback: shard {rb['shard_id']} restarted; all shards went from version "
                      f"{rb['from_version']} back to {rb['to_version']} ({rb['steps']} steps), epoch {rb['epoch']}")
    for f in st.get("failovers", []):
        console.print(f"shard {f['shard_id']}: primary moved from server {f['from_server']} to server "
                      f"{f['to_server']} ({REASONS.get(f['reason'], f['reason'])}), "
                      f"placement epoch {f['placement_epoch']}")
    shards = Table(title="shards", title_justify="left")
    columns = ("shard", "address", "range", "version", "pushes", "dedup", "dropped", "rejected", "in", "out",
               "staleness", "checkpoint", "rollbacks")
    for col in columns:
        shards.add_column(col)
    for s in st["shards"]:
        label = f"{s['job']}/{s['shard_id']}" if "job" in s else str(s["shard_id"])  # fragments: per job
        if "error" in s or "range" not in s:
            shards.add_row(label, s["address"], s.get("error", "not registered"), *[""] * (len(columns) - 3))
            continue
        stale = s["staleness"]
        stale_text = f"mean {stale['mean']:.2f} max {stale['max']}" if stale.get("count") else "-"
        ckpt = s.get("last_checkpoint_version", -1)
        ckpt_text = "-" if ckpt is None or ckpt < 0 else f"v{ckpt}"
        if s.get("checkpoint_failures"):
            ckpt_text += f" ({s['checkpoint_failures']} failed)"
        shards.add_row(label, s["address"], f"[{s['range'][0]}, {s['range'][1]})", str(s["version"]),
                       str(s["pushes"]), str(s["duplicates"]), str(s["dropped"]), str(s["rejected"]),
                       _bytes(s["bytes_in"]), _bytes(s["bytes_out"]), stale_text, ckpt_text,
                       f"{s.get('rollbacks', 0)} ({s.get('steps_rolled_back', 0)} steps)")
    console.print(shards)
