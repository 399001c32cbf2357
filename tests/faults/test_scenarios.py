"""`shardps run --scenario`: faults fired by step and time, across real network namespaces, with a
report; and scenario files checked before anything starts."""
import json
from pathlib import Path

import pytest

from shardps.chaos.netns import available
from shardps.client.run import RunConfig, run
from shardps.chaos.scenario import ScenarioError, load
from shardps.client.sdk import load_model_file, train_single_process

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"


def assert_same_model_as_the_fault_free_run(summary, steps):
    single = train_single_process("digits", workers=2, steps=steps)
    trained = load_model_file(summary["model_file"])
    for name, p in single["model"].state_dict().items():
        assert (trained[name] - p).abs().max().item() < 1e-4, name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_lossy_slow_link_then_a_10s_server_partition_across_namespaces_and_the_run_completes(tmp_path):
    ok, reason = available()
    if not ok:
        pytest.skip(reason)
    steps = 150
    # transport="tcp": the bytes on the servers' byte links (namespaces share /dev/shm, where "auto"
    # would take shared memory), so the lossy link and the partition cut pushes mid-frame.
    summary = run(RunConfig(hosts=True, steps=steps, eval_every=0, out=str(tmp_path / "run"), transport="tcp",
                            scenario=str(EXAMPLES / "flaky-network.toml")))
    assert summary["steps"] == steps and summary["updates_per_shard"] == [steps, steps]
    assert "tcp" in summary["transports"], summary["transports"]  # (a worker whose links failed during the
    # partition pushes over gRPC for LINK_BACKOFF_S before it tries a link again)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [(e["action"], e["target"], e["ok"]) for e in report["timeline"]] == [
        ("link", "worker-0", True), ("unlink", "worker-0", True), ("partition", "server-1", True),
        ("heal", "server-1", True)]
    cut, healed = report["timeline"][2]["unix"], report["timeline"][3]["unix"]
    assert healed - cut >= 10
    steps_at = sorted(r["time"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                      if r["kind"] == "step")
    assert max(b - a for a, b in zip(steps_at, steps_at[1:])) >= 8  # the partition really stopped training
    assert (tmp_path / "run" / "faults.png").stat().st_size > 0
    assert_same_model_as_the_fault_free_run(summary, steps)  # sync, exactly-once: nothing lost, nothing doubled


@pytest.mark.slow
def test_the_server_crash_scenario_reports_its_rollback_and_ends_where_the_fault_free_run_ends(tmp_path):
    steps = 120
    summary = run(RunConfig(steps=steps, eval_every=0, out=str(tmp_path / "run"),
                            scenario=str(EXAMPLES / "server-crash.toml")))
    counters = summary["report"]["counters"]
    assert counters["rollbacks"] == 1 and counters["steps_rolled_back"] >= 1
    assert counters["process_faults"] == {"kill/server-1": 1, "restart/server-1": 1}
    text = (tmp_path / "run" / "report.md").read_text()
    assert "rollback: shard 1 restarted; every shard went back from version" in text
    assert_same_model_as_the_fault_free_run(summary, steps)


@pytest.mark.parametrize("text, words", [
    ('[[fault]]\nat_step = 3\naction = "explode"\ntarget = "server-0"', "action must be one of"),
    ('[[fault]]\nat_step = 3\naction = "kill"\ntarget = "server-7"', "target 'server-7' is not one of"),
    ('[[fault]]\naction = "kill"\ntarget = "server-0"', "say when"),
    ('[[fault]]\nfrom_s = 5\nto_s = 2\naction = "pause"\ntarget = "server-0"', "must end after it starts"),
    ('[[fault]]\nfrom_s = 1\nto_s = 2\naction = "kill"\ntarget = "server-0"', "happens at one moment"),
    ('[[fault]]\nat_s = 1\naction = "link"\ntarget = "worker-0"', "link needs"),
    ('[[fault]]\nat_s = 1\naction = "rpc"\ntarget = "servers"\nloss = 3', "does not take"),
    ('[[fault]]\nat_s = 1\nfor_s = 2\naction = "cut"\ntarget = "server-0"', "cut needs peer = another host"),
    ('[[fault]]\nat_s = 1\nfor_s = 2\naction = "cut"\ntarget = "server-0"\npeer = "server-0"', "cut needs peer"),
    ('[[fault]]\nat_s = 1\nfor_s = 2\naction = "cut"\ntarget = "server-0"\npeer = "server-9"', "cut needs peer"),
    ('name = "x"', "has no"),
    ('[[fault]\n', "not valid TOML"),
])
def test_bad_scenarios_are_refused_with_a_message_naming_the_fix(tmp_path, text, words):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=words):
        load(path, workers=2, servers=2)


def test_every_shipped_scenario_parses_and_network_faults_need_hosts():
    for path in EXAMPLES.glob("*.toml"):
        assert load(path, workers=3, servers=2).faults
    for name in ("flaky-network.toml", "replica-partitions.toml"):
        with pytest.raises(ValueError, match="add --hosts"):
            RunConfig(scenario=str(EXAMPLES / name))


@pytest.mark.slow
def test_shardps_chaos_kill_and_restart_a_server_of_a_running_run(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    shardps = [sys.executable, "-m", "shardps"]
    proc = subprocess.Popen([*shardps, "run", "--steps", "800", "--eval-every", "0", "--checkpoint-every", "20",
                             "--out", str(out), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 100:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        for action in ("kill", "restart"):
            res = subprocess.run([*shardps, "chaos", action, "server-1", "--run", str(out)], capture_output=True,
                                 text=True, timeout=120)
            assert res.returncode == 0 and json.loads(res.stdout)["ok"], res.stderr
        res = subprocess.run([*shardps, "chaos", "kill", "worker-7", "--run", str(out)], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 1 and "kill worker-7 failed" in res.stderr
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout)
    assert summary["steps"] == 800 and summary["report"]["counters"]["rollbacks"] == 1
    text = (out / "report.md").read_text()
    assert "| kill | server-1 | ok |" in text and "| restart | server-1 | ok |" in text
    res = subprocess.run([*shardps, "chaos", "kill", "server-1", "--run", str(out)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and ("not running" in res.stderr or "no `shardps run`" in res.stderr)  # a bad --run
