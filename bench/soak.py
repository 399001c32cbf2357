"""Soak: a sync and an async job side by side for a long while; is anything of any role growing?

    python bench/soak.py                                   # 30 min, 8 workers x 4 servers, both jobs
    python bench/soak.py --minutes 3 --workers 2 --servers 2 --every 5    # a short look

Every role of one LocalCluster (coordinator, servers) and every worker process (half of them
train job ``soak-sync``, half ``soak-async``, on scikit-learn's digits) is sampled every
``--every`` seconds: RSS, threads, open file descriptors (``/proc``), and each job's steps per
second (its shards' versions). The report gives each series' least-squares slope per minute over
the second half of the run (the first half warms pools and caches), the first and last values,
and the errors: workers that exited non-zero, pushes the shards rejected. Flat means the slope
times the run's length is small against the value: the report says so per series, and also
whether a step got dearer as the run grew (the throughput slope). Bounded: the workers stop by
themselves after ``--minutes``; the cluster goes with the script. Not in CI (it is long).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

JOBS = {"soak-sync": "sync", "soak-async": "async"}


def worker_main(cluster: str, job: str, mode: str, minutes: float, seed: int, history_dir: str) -> None:
    """One worker: digits MLP, SGD momentum, batch 32, until ``minutes`` have passed."""
    import torch

    from shardps import ShardedOptimizer
    from shardps.worker.workloads import get_workload

    torch.set_num_threads(1)
    work = get_workload("digits", seed=seed)
    model = work.model()
    opt = ShardedOptimizer(model, cluster=cluster, job=job, mode=mode, optimizer="sgd", lr=0.05, momentum=0.9,
                           connect_timeout=300, history_dir=history_dir)
    end = time.monotonic() + minutes * 60
    while time.monotonic() < end:
        x, y = work.global_batch(opt.steps_taken * 64 + seed, 32)  # each worker its own batches
        opt.zero_grad()
        work.loss(model, x, y).backward()
        opt.step(batch_size=len(x))
    opt.close()


def sample(pid: int) -> dict | None:
    """RSS (MiB), threads and open fds of ``pid``; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # exited, not reaped yet
        return None
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]), "fds": fds}


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute (0 for fewer than 3 points)."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mt, mv = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


def soak(args) -> dict:
    from shardps import LocalCluster
    from shardps.client.sdk import cluster_status

    series: dict[str, list[tuple[float, dict]]] = {}
    with LocalCluster(servers=args.servers, log_dir=args.dir, checkpoint_every=0) as cluster:
        procs = {}
        for i in range(args.workers):
            job = list(JOBS)[i % 2]  # alternate: both jobs start together
            cmd = [sys.executable, __file__, "--worker", cluster.address, job, JOBS[job], str(args.minutes), str(i),
                   cluster.history_dir]
            log = open(Path(cluster.log_dir) / f"soak-worker-{i}.log", "wb")
            procs[f"worker-{i} ({JOBS[job]})"] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        roles = {name: cluster.pid(name) for name in cluster.procs} | {n: p.pid for n, p in procs.items()}
        start, last_versions = time.monotonic(), {}
        while all(p.poll() is None for p in procs.values()):  # sampled while every worker trains
            time.sleep(args.every)
            now = time.monotonic() - start
            for name, pid in roles.items():
                point = sample(pid)
                if point is not None:
                    series.setdefault(name, []).append((now, point))
            for job in JOBS:
                try:
                    shards = cluster_status(cluster.address, job)["shards"]
                except Exception:  # noqa: BLE001 - not registered yet, or busy: the next sample counts
                    continue
                version = min((s.get("version", 0) for s in shards), default=0)
                if job in last_versions:
                    t0, v0 = last_versions[job]
                    series.setdefault(f"{job} steps/s", []).append((now, {"steps_per_s": (version - v0) / (now - t0)}))
                last_versions[job] = (now, version)
        for p in procs.values():  # they stop by themselves at --minutes
            p.wait(timeout=args.every + 120)
        errors = {n: p.returncode for n, p in procs.items() if p.returncode}
        rejected = {job: sum(s.get("rejected", 0) for s in cluster_status(cluster.address, job)["shards"])
                    for job in JOBS}
    return summarize(series, errors, rejected, args)


def summarize(series: dict, errors: dict, rejected: dict, args) -> dict:
    rows = {}
    for name, points in series.items():
        half = [p for p in points if p[0] >= points[-1][0] / 2]
        for key in points[0][1]:
            values = [(t, v[key]) for t, v in half]
            slope = slope_per_minute(values)
            first, last = points[0][1][key], points[-1][1][key]
            growth = slope * (half[-1][0] - half[0][0]) / 60 if len(half) > 1 else 0.0
            if key == "steps_per_s":  # throughput holds unless it falls (a step getting dearer as the run grows)
                early = [v[key] for t, v in points if points[0][0] < t < points[-1][0] / 2]
                later = [v for _, v in values]
                mean = sum(later) / len(later) if later else 0.0
                flat = growth >= -0.05 * abs(mean)
                row = {"first_half_mean": round(sum(early) / len(early), 2) if early else None,
                       "second_half_mean": round(mean, 2)}
            else:
                flat = abs(growth) <= max(0.05 * abs(last), {"rss_mib": 8, "threads": 2, "fds": 4}.get(key, 0))
                row = {}
            rows[f"{name} {key}"] = {"first": round(first, 2), "last": round(last, 2),
                                     "slope_per_min": round(slope, 4), "flat": flat, **row}
    return {"config": vars(args), "machine": machine(), "series": rows, "worker_errors": errors,
            "rejected_pushes": rejected, "all_flat": all(r["flat"] for r in rows.values()),
            "errors": len(errors) + sum(rejected.values())}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        cluster, job, mode, minutes, seed, history = argv[1:7]
        worker_main(cluster, job, mode, float(minutes), int(seed), history)
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=8, help="worker processes per job (each job: sync, async)")
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    ap.add_argument("--dir", help="keep the cluster's logs here")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)
    args.workers *= 2  # --workers per job
    result = soak(args)
    emit("soak", result, args.out)
    return result


if __name__ == "__main__":
    main()
