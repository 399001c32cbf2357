"""The chaos loop: a [chaos] table becomes seeded kill + restart pairs, bad tables are refused with
the fix, and a short MTBF run (bench/chaos.py, the benchmark itself) survives every failure with
no step lost for good, no push applied twice and the fault-free run's final model."""
import dataclasses
import sys
import time
from pathlib import Path

import pytest

from shardps.chaos.report import chaos_pacing
from shardps.chaos.scenario import ScenarioError, ScenarioRunner, load

ROOT = Path(__file__).resolve().parents[2]
STEPS = "1200"  # the benchmark's runs: long enough to outlast two paced failures on a busy machine


def chaos(tmp_path, body: str, workers=2, servers=2):
    path = tmp_path / "chaos.toml"
    path.write_text("[chaos]\n" + body)
    return load(path, workers=workers, servers=servers).faults


def test_a_chaos_table_is_seeded_kill_and_restart_pairs_over_the_named_roles(tmp_path):
    body = "every_s = 5\nfailures = 40\ndown_s = 1.5\nstart_s = 2\nseed = {}\ntargets = [\"servers\", \"worker-1\"]\n"
    faults = chaos(tmp_path, body.format(3))
    assert [(f.action, f.start) for f in faults[:4]] == [("kill", 2.0), ("restart", 3.5), ("kill", 7.0),
                                                         ("restart", 8.5)]
    kills, restarts = faults[0::2], faults[1::2]
    assert all(k.action == "kill" and r.action == "restart" and k.target == r.target and not k.by_step
               for k, r in zip(kills, restarts))
    assert {k.target for k in kills} == {"server-0", "server-1", "worker-1"}  # groups expand; 40 draws hit all
    assert [f.target for f in chaos(tmp_path, body.format(3))] == [f.target for f in faults]  # same seed, same run
    assert [f.target for f in chaos(tmp_path, body.format(4))] != [f.target for f in faults]


def test_a_failure_whose_end_was_still_due_when_training_ended_is_ended_at_the_end(tmp_path):
    # A run that ends between a kill and its restart (or a pause and its resume) must not leave the role
    # dead or stopped (the run's report asks the coordinator for the job's status next); a failure whose
    # end already landed is left alone.
    path = tmp_path / "chaos.toml"
    path.write_text("[chaos]\nevery_s = 100\nfailures = 2\ndown_s = 30\nstart_s = 0\nseed = 1\n"
                    "targets = [\"coordinator\"]\nkinds = [\"kill\", \"pause\"]\n")
    done = []

    def recorder(action):
        def do(target, params):
            done.append((action, target))
            return ""
        return do

    scenario = load(path, workers=2, servers=2)
    first = scenario.faults[0].action
    runner = ScenarioRunner(scenario, {a: recorder(a) for a in ("kill", "restart", "pause", "resume")})
    runner.tick(1)  # training started: the first failure is due at once, its end in 30 s
    assert done == [(first, "coordinator")]
    runner.finish(2)
    assert done == [(first, "coordinator"), ({"kill": "restart", "pause": "resume"}[first], "coordinator")]
    runner.finish(2)  # nothing twice
    assert len(done) == 2 and len(runner.timeline) == 2


def test_a_slow_restart_delays_the_failures_behind_it_instead_of_firing_them_back_to_back(tmp_path):
    # On loaded cores a restart (which returns once the role is healthy) can take far longer than every_s:
    # the failures scheduled meanwhile must not pile up and fire ~10 ms apart when it returns. Each failure
    # ends down_s after it was done, and the next one waits for every_s - down_s of healthy running after
    # that end returned; the timeline says when each action started and how long it took.
    path = tmp_path / "chaos.toml"
    every, down, slow = 0.2, 0.05, 0.6
    path.write_text(f"[chaos]\nevery_s = {every}\nfailures = 4\ndown_s = {down}\nstart_s = 0\nseed = 1\n"
                    "targets = [\"server-0\"]\n")

    def act(action):
        def do(target, params):
            if action == "restart":
                time.sleep(slow)  # a restart that waits for the role to be healthy again, on a busy machine
            return ""
        return do

    scenario = load(path, workers=1, servers=1)
    runner = ScenarioRunner(scenario, {a: act(a) for a in ("kill", "restart")})
    give_up = time.monotonic() + 60
    while not all(f.applied for f in scenario.faults) and time.monotonic() < give_up:
        runner.tick(1)
        time.sleep(runner.poll_s())
    events = [(e.action, e.time_s, e.took_s) for e in runner.timeline]
    assert [a for a, _, _ in events] == ["kill", "restart"] * 4
    assert all(took >= slow for a, _, took in events if a == "restart")
    for (_, kill_at, kill_took), (_, restart_at, _) in zip(events[0::2], events[1::2]):
        assert restart_at - (kill_at + kill_took) >= down - 0.01, events  # down_s after the kill was done
    for (_, restart_at, took), (_, next_kill_at, _) in zip(events[1::2], events[2::2]):
        assert next_kill_at - (restart_at + took) >= every - down - 0.01, events  # healthy between failures
    pacing = chaos_pacing([dataclasses.asdict(e) for e in runner.timeline])
    assert pacing["failures"] == 4 and pacing["downtime_s"] >= down + slow and pacing["healthy_min_s"] >= every - down - 0.01
    assert pacing["mtbf_s"] >= every + slow - 0.01  # the realised MTBF, not the asked-for 0.2 s


def test_a_chaos_table_with_kinds_draws_kills_and_pauses_each_ended_down_s_later(tmp_path):
    body = "every_s = 2\nfailures = 60\ndown_s = 0.5\nseed = 5\nkinds = [\"kill\", \"pause\"]\n"
    faults = chaos(tmp_path, body)
    pairs = list(zip(faults[0::2], faults[1::2]))
    assert {(a.action, b.action) for a, b in pairs} == {("kill", "restart"), ("pause", "resume")}
    assert all(a.target == b.target and b.start - a.start == 0.5 for a, b in pairs)
    assert [f.action for f in chaos(tmp_path, body)] == [f.action for f in faults]  # seeded


def test_a_chaos_table_with_partitions_draws_partition_and_heal_pairs_and_needs_hosts(tmp_path):
    path = tmp_path / "chaos.toml"
    path.write_text("[chaos]\nevery_s = 2\nfailures = 30\ndown_s = 0.5\nseed = 2\nkinds = [\"kill\", \"partition\"]\n")
    scenario = load(path, workers=2, servers=2)
    pairs = list(zip(scenario.faults[0::2], scenario.faults[1::2]))
    assert {(a.action, b.action) for a, b in pairs} == {("kill", "restart"), ("partition", "heal")}
    assert all(a.target == b.target and b.start - a.start == 0.5 for a, b in pairs)
    assert scenario.needs_hosts  # a partition cuts a role's network-namespace host: shardps run --hosts
    assert not load(ROOT / "examples" / "scenarios" / "chaos.toml", workers=2, servers=2).needs_hosts


def test_a_chaos_table_beside_faults_and_the_shipped_example(tmp_path):
    path = tmp_path / "both.toml"
    path.write_text('[[fault]]\nat_step = 3\naction = "checkpoint"\n[chaos]\nevery_s = 4\nfailures = 2\n')
    faults = load(path, workers=1, servers=1).faults
    assert [f.action for f in faults] == ["checkpoint", "kill", "restart", "kill", "restart"]
    assert faults[1].start == 4.0  # start_s defaults to every_s
    example = load(ROOT / "examples" / "scenarios" / "chaos.toml", workers=2, servers=2).faults
    assert len(example) == 10


@pytest.mark.parametrize("body, words", [
    ("failures = 3\n", "every_s = SECONDS, failures = N"),
    ("every_s = 2\nfailures = 3\ndown_s = 2\n", "0 < down_s < every_s"),
    ("every_s = 2\nfailures = 0\n", "failures must be a whole number"),
    ("every_s = 2\nfailures = 2.5\n", "failures must be a whole number"),
    ("every_s = \"soon\"\nfailures = 2\n", "must be numbers of seconds"),
    ("every_s = 2\nfailures = 2\ntargets = [\"server-9\"]\n", "target 'server-9' is not one of"),
    ("every_s = 2\nfailures = 2\ntargets = []\n", "non-empty list"),
    ("every_s = 2\nfailures = 2\nmtbf = 3\n", "unknown keys"),
    ("every_s = 2\nfailures = 2\nseed = true\n", "seed must be a whole number"),
    ("every_s = 2\nfailures = 2\nkinds = [\"explode\"]\n", "kinds must be a non-empty list of kill, pause"),
])
def test_bad_chaos_tables_are_refused_with_a_message_naming_the_fix(tmp_path, body, words):
    with pytest.raises(ScenarioError, match=words):
        chaos(tmp_path, body)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_chaos_benchmark_kills_servers_and_the_coordinator_and_the_run_ends_as_the_fault_free_one(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import chaos as bench  # bench/chaos.py

    # seed 1 draws server-0, the coordinator, then server-0 again. Failures are paced by the restarts (each
    # waits for 3 s of healthy running after the one before ended): the run is long enough for two of them
    # even where a restart takes seconds.
    result = bench.main(["--failures", "3", "--every", "4", "--start", "2", "--steps", STEPS, "--seed", "1",
                         "--targets", "servers", "coordinator", "--dir", str(tmp_path)])
    assert result["steps"] == int(STEPS) and result["failures_injected"] >= 2  # the run outlasts at least two
    assert result["killed"][:2] == ["server-0", "coordinator"]
    assert result["failures_survived"] == result["failures_injected"]
    assert result["pushes_applied_twice"] == 0
    assert result["history"]["ok"], result["history"]["violations"]  # every promise, event by event
    assert result["rollbacks"] >= 1  # the killed server restored its checkpoint; the job went back with it
    assert result["max_abs_param_diff"] == 0.0  # rollbacks replay exactly; the journal loses nothing


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_with_replicas_the_chaos_benchmark_loses_no_step_to_a_killed_server(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import chaos as bench  # bench/chaos.py

    # training goes on while the killed server restarts: the coordinator's kill comes 3 s after it is back.
    # Two failures: seed 1's third kills server-0 again, and where the run is fast enough to reach it, that
    # kill can land before the restarted server's copy is back in sync: a lost shard, restored by a rollback
    # (tests/faults/test_lost_replicas.py), which is not what this test is about.
    result = bench.main(["--failures", "2", "--every", "4", "--start", "2", "--steps", STEPS, "--seed", "1",
                         "--targets", "servers", "coordinator", "--replicas", "2", "--dir", str(tmp_path)])
    assert result["steps"] == int(STEPS) and result["killed"][:2] == ["server-0", "coordinator"]
    assert result["failures_survived"] == result["failures_injected"]
    assert result["failovers"] >= 1  # server-0's shard moved to its copy on server-1 ...
    assert result["rollbacks"] == 0 and result["steps_rolled_back"] == 0  # ... and nothing was undone
    assert result["pushes_applied_twice"] == 0
    assert result["history"]["ok"], result["history"]["violations"]  # every promise, event by event
    assert result["max_abs_param_diff"] == 0.0
