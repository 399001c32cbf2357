"""shardps check: a clean history passes; each planted violation is named with the events behind it.

The histories are written by the real recorder (runtime/history.py), as the roles write them; the
last test records one from a real cluster and plants a violation in it."""
import json

import pytest
import torch

from shardps import LocalCluster, ShardedOptimizer
from shardps.chaos.checker import check_events, check_run, load
from shardps.runtime.history import History

JOB = "job-1"


class Run:
    """A history written event by event through the recorder, one file per process."""

    def __init__(self, tmp_path):
        self.dir = tmp_path / "history"
        self.procs: dict[str, History] = {}

    def of(self, name: str) -> History:
        if name not in self.procs:
            self.procs[name] = History.open(self.dir, name)
        return self.procs[name]

    def job(self, proc="server-0", shard=0, backup_workers=0):
        self.of(proc).record("job", job=JOB, shard=shard, own=True, mode="sync", backup_workers=backup_workers)

    def restored(self, proc, version, why="initialized", shard=0, placement=0):
        self.of(proc).record("restored", job=JOB, shard=shard, version=version, why=why, placement=placement)

    def applied(self, proc, version, pushed, members=(0, 1), shard=0, placement=0, kind="applied"):
        step = version - 1
        self.of(proc).record(kind, job=JOB, shard=shard, version=version, step=step,
                             pushed={str(w): s for w, s in pushed.items()}, members=list(members),
                             table={str(w): s for w, s in pushed.items()}, placement=placement)

    def step(self, proc, version, workers=(0, 1), **kw):
        self.applied(proc, version, dict.fromkeys(workers, version - 1), **kw)

    def acked(self, worker, version, shard=0):
        self.of(f"worker-{worker}").record("acked", job=JOB, shard=shard, worker=worker, step=version - 1,
                                           version=version, duplicate=False, dropped=False)

    def replayed(self, proc, version, table, shard=0, placement=1):
        self.of(proc).record("replayed", job=JOB, shard=shard, version=version, skipped=False,
                             table={str(w): s for w, s in table.items()}, placement=placement)

    def verdict(self):
        return check_run(self.dir)  # every line is in its file once recorded (line-buffered)


def clean_run(run: Run, steps=5):
    run.job()
    run.restored("server-0", 0)
    for v in range(1, steps + 1):
        run.step("server-0", v)
        run.acked(0, v)
        run.acked(1, v)
    return run


def replicated_run(run: Run):
    """server-0 the primary of placement 1, server-1 its backup (a copy at version 0)."""
    run.job()
    run.restored("server-0", 0, placement=1)
    run.restored("server-1", 0, why="copy", placement=1)
    return run


def promises(verdict):
    return sorted({v.promise for v in verdict.violations})


def test_a_clean_history_passes_and_counts_what_it_checked(tmp_path):
    verdict = clean_run(Run(tmp_path)).verdict()
    assert verdict.ok, verdict.violations
    assert verdict.counts["updates"] == 5 and verdict.counts["acks"] == 10


def test_a_step_applied_twice_without_a_rollback_is_named(tmp_path):
    run = clean_run(Run(tmp_path))
    run.step("server-0", 6)
    run.applied("server-0", 7, {0: 5, 1: 6})  # worker 0's step-5 push again
    verdict = run.verdict()
    assert "applied once" in promises(verdict)
    twice = next(v for v in verdict.violations if v.promise == "applied once")
    assert "worker 0's push for step 5" in twice.what and len(twice.events) == 2


def test_a_rollback_lets_the_job_replay_its_undone_steps(tmp_path):
    run = clean_run(Run(tmp_path))
    run.restored("server-0", 3, why="rollback")
    for v in (4, 5, 6):
        run.step("server-0", v)
    verdict = run.verdict()
    assert verdict.ok, verdict.violations
    assert verdict.counts["rollbacks"] == 1


def test_a_sync_step_made_of_other_workers_than_its_view_is_named(tmp_path):
    run = clean_run(Run(tmp_path))
    run.step("server-0", 6, workers=(0,))  # worker 1 is a member, no backup workers: the step closed without it
    run.step("server-0", 7, workers=(0, 1, 9))  # worker 9 is no member
    verdict = run.verdict()
    assert promises(verdict) == ["sync view"] and len(verdict.violations) == 2


def test_a_step_closed_without_a_backup_worker_is_not_a_violation(tmp_path):
    run = Run(tmp_path)
    run.job(backup_workers=1)
    run.restored("server-0", 0)
    run.step("server-0", 1, workers=(0,))
    assert run.verdict().ok


def test_an_acknowledged_version_that_the_shard_lost_is_named(tmp_path):
    run = clean_run(Run(tmp_path))
    run.acked(0, 9)  # the worker was told version 9; the shard never got past 5, and nothing rolled back
    verdict = run.verdict()
    assert promises(verdict) == ["acknowledged"]
    assert "version 9" in verdict.violations[0].what


def test_an_acknowledged_version_undone_by_a_recorded_rollback_is_not_lost(tmp_path):
    run = clean_run(Run(tmp_path))
    run.restored("server-0", 2, why="rollback")
    assert run.verdict().ok


def test_two_primaries_in_one_placement_are_named(tmp_path):
    run = clean_run(Run(tmp_path))
    run.step("server-1", 6)  # another process makes the next version, same placement, no rollback
    run.step("server-0", 7)  # and the first goes on
    verdict = run.verdict()
    assert "one primary" in promises(verdict)


def test_a_failover_to_a_newer_placement_is_one_primary_at_a_time(tmp_path):
    run = replicated_run(Run(tmp_path))
    for v in (1, 2):
        run.replayed("server-1", v, {0: v - 1, 1: v - 1})
        run.step("server-0", v, placement=1)
    run.step("server-1", 3, placement=2)  # server-0 died; its backup was promoted in placement 2
    assert run.verdict().ok
    run.step("server-0", 4, placement=1)  # the old primary woke and applied: split brain
    verdict = run.verdict()
    assert "one primary" in promises(verdict)


def test_a_backup_that_replays_another_sequence_than_its_primary_is_named(tmp_path):
    run = replicated_run(Run(tmp_path))
    run.replayed("server-1", 1, {0: 0, 1: 7})
    run.step("server-0", 1, placement=1)
    run.replayed("server-1", 3, {0: 2, 1: 2})  # skipped version 2
    verdict = run.verdict()
    assert promises(verdict) == ["backups"] and len(verdict.violations) == 2


def test_a_version_that_jumps_within_one_process_is_named(tmp_path):
    run = clean_run(Run(tmp_path))
    run.step("server-0", 8)
    assert "versions" in promises(run.verdict())


def test_a_torn_last_line_of_a_killed_process_is_skipped_and_a_torn_middle_one_is_reported(tmp_path):
    run = clean_run(Run(tmp_path))
    run.verdict()
    path = next(run.dir.glob("server-0-*.jsonl"))
    path.write_text(path.read_text() + '{"t": 1, "kind": "appl')  # SIGKILL mid-write
    events, incomplete = load(run.dir)
    assert not incomplete and check_events(events).ok
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ["garbage"] + lines[3:]) + "\n")
    assert any("not JSON" in line for line in check_run(run.dir).incomplete)


def test_a_history_stops_at_its_size_cap_and_says_so(tmp_path):
    history = History.open(tmp_path / "h", "server", max_bytes=400)
    for v in range(50):
        history.record("applied", job=JOB, shard=0, version=v)
    history.close()
    lines = next((tmp_path / "h").glob("*.jsonl")).read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "truncated" and len(lines) < 10
    assert check_run(tmp_path / "h").incomplete


def test_check_names_a_missing_history_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--history-dir"):
        check_run(tmp_path)


@pytest.mark.slow
def test_a_real_clusters_history_passes_and_a_planted_duplicate_is_caught(tmp_path):
    with LocalCluster(servers=2, log_dir=tmp_path / "logs") as cluster:
        model = torch.nn.Linear(30, 4)
        opt = ShardedOptimizer(model, cluster=cluster.address, optimizer="adam", lr=0.01,
                               history_dir=cluster.history_dir)
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(8, 30)).pow(2).mean().backward()
            opt.step(batch_size=8)
        opt.close()
    verdict = check_run(tmp_path / "logs")
    assert verdict.ok, verdict.violations
    assert verdict.counts["updates"] == 12 and verdict.counts["acks"] == 12
    # plant: the server of shard 1 applies its step 3 once more, as a lost dedup table would
    path = next(p for p in (tmp_path / "logs" / "history").glob("server-*.jsonl")
                if '"shard":1' in p.read_text() and '"applied"' in p.read_text())
    applied = [json.loads(line) for line in path.read_text().splitlines() if '"kind":"applied"' in line]
    again = dict(applied[3], version=applied[-1]["version"] + 1, n=10 ** 6, t=applied[-1]["t"] + 1)
    path.write_text(path.read_text() + json.dumps(again) + "\n")
    verdict = check_run(tmp_path / "logs")
    assert "applied once" in promises(verdict)
    assert any("step 3" in v.what for v in verdict.violations)
