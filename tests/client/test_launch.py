"""`shardps launch`: a user's own script (written here, no address in it) run as N workers of an
embedded cluster; sync training equals one torch process on the union batch; a failed worker is
restarted and rejoins; failures and SIGTERM stop everything, with the right exit code."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
sys.path.insert(0, str(HELPERS))
from task import reference  # noqa: E402

STEPS = 30
SIZES = [24, 40, 17]  # rank r trains rows [sum(SIZES[:r]), sum(SIZES[:r+1])) of every global batch

# What a user writes: the cluster, min_workers and the worker's name come from the launcher's environment.
SCRIPT = '''
import argparse, os, signal, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {helpers!r})
from task import global_batch, loss_fn, make_model
from shardps import ShardedOptimizer

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int)
ap.add_argument("--sizes")
ap.add_argument("--out")
ap.add_argument("--crash-at", type=int, default=-1)  # local rank 1 exits with code 3 here, once
ap.add_argument("--sleep", type=float, default=0.0)
a = ap.parse_args()
local = int(os.environ["LOCAL_RANK"])
out = Path(a.out)
signal.signal(signal.SIGTERM, lambda *_: ((out / f"sigterm-{{local}}").touch(), os._exit(143)))
sizes = [int(s) for s in a.sizes.split(",")]
torch.set_num_threads(1)
model = make_model(100 + local)  # every worker starts from the job's parameters whatever it made
opt = ShardedOptimizer(model, optimizer="adam", lr=0.01, mode="sync")
initial = {{k: v.detach().clone() for k, v in model.state_dict().items()}}
joined_at = opt.steps_taken
print(f"training from step {{joined_at}} as rank {{opt.rank}} of {{opt.world_size}}", flush=True)
while opt.steps_taken < a.steps:
    step = opt.steps_taken
    lo = sum(sizes[:opt.rank])
    hi = lo + sizes[opt.rank]
    x, y = global_batch(step, sum(sizes))
    opt.zero_grad()
    loss_fn(model, x[lo:hi], y[lo:hi]).backward()
    if local == 1 and step == a.crash_at and not (out / "crashed").exists():
        (out / "crashed").touch()
        os._exit(3)
    time.sleep(a.sleep)
    opt.step(batch_size=hi - lo)
opt.pull()
torch.save({{"initial": initial, "final": model.state_dict(), "versions": opt.versions, "joined_at": joined_at,
            "env": {{k: os.environ.get(k) for k in ("SHARDPS_WORKER_NAME", "SHARDPS_LOCAL_RANK", "SHARDPS_NPROC",
                                                 "SHARDPS_MIN_WORKERS", "SHARDPS_RESTART_COUNT", "OMP_NUM_THREADS")}}}},
           out / f"result-{{local}}.pt")
opt.close()
'''


def launch(tmp_path, *options, steps=STEPS, script_args=(), nproc=3, wait=True):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(helpers=str(HELPERS)))
    cmd = [sys.executable, "-m", "shardps", "launch", "--nproc", str(nproc), "--lease-seconds", "2",
           "--log-dir", str(tmp_path / "logs"), *options, str(script), "--steps", str(steps),
           "--sizes", ",".join(map(str, SIZES[:nproc])), "--out", str(tmp_path), *script_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPS_")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if not wait:
        return proc
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, output


def leftovers(tmp_path) -> list[str]:
    """Live processes whose command line names this test's directory (workers and cluster roles do)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            zombie = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
            if str(tmp_path) in cmdline and not zombie:
                found.append(f"{entry.name}: {cmdline}")
        except OSError:
            pass
    return found


def results(tmp_path, nproc=3):
    return [torch.load(tmp_path / f"result-{i}.pt") for i in range(nproc)]


@pytest.mark.slow
def test_launch_runs_a_user_script_as_3_sync_workers_and_equals_single_process_torch(tmp_path):
    code, output = launch(tmp_path)
    assert code == 0, output[-3000:]
    got = results(tmp_path)
    ref_params, _ = reference(got[0]["initial"], "adam", {"lr": 0.01}, SIZES, False, STEPS)
    for r in got:
        assert r["versions"] == [STEPS, STEPS]
        for key, value in ref_params.items():
            assert (r["final"][key] - value).abs().max().item() <= 1e-5, key
    assert [r["env"] for r in got] == [
        {"SHARDPS_WORKER_NAME": f"worker-{i}", "SHARDPS_LOCAL_RANK": str(i), "SHARDPS_NPROC": "3",
         "SHARDPS_MIN_WORKERS": "3", "SHARDPS_RESTART_COUNT": "0", "OMP_NUM_THREADS": "1"} for i in range(3)]
    for i in range(3):  # every worker's output, prefixed on the launcher's and kept in its log
        assert f"[worker-{i}] training from step 0 as rank" in output
        assert "training from step 0" in (tmp_path / "logs" / f"worker-{i}.log").read_text()
    summary = json.loads((tmp_path / "logs" / "launch.json").read_text())
    assert summary["exit_code"] == 0 and summary["embedded_cluster"]
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_worker_that_fails_is_restarted_rejoins_the_running_job_and_the_job_completes(tmp_path):
    code, output = launch(tmp_path, "--restart-on-failure", "1", script_args=("--crash-at", "8"))
    assert code == 0, output[-3000:]
    assert "[launch] worker-1 exited with code 3; restarting it (1/1)" in output
    got = results(tmp_path)
    assert all(r["versions"] == [STEPS, STEPS] for r in got)  # every step closed, once
    restarted = got[1]
    assert restarted["joined_at"] > 8 and restarted["env"]["SHARDPS_RESTART_COUNT"] == "1"
    assert restarted["env"]["SHARDPS_WORKER_NAME"] == "worker-1.r1"
    for key, value in got[0]["final"].items():  # everyone ends on the job's final parameters
        assert torch.equal(restarted["final"][key], value)
    summary = json.loads((tmp_path / "logs" / "launch.json").read_text())
    assert summary["workers"]["worker-1"]["exit_codes"] == [3, 0] and summary["workers"]["worker-1"]["restarts"] == 1
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_without_restarts_the_launcher_stops_everything_and_exits_with_the_failed_workers_code(tmp_path):
    code, output = launch(tmp_path, nproc=2, script_args=("--crash-at", "3"))
    assert code == 3, output[-3000:]
    assert "[launch] worker-1 exited with code 3; stopping the others" in output
    summary = json.loads((tmp_path / "logs" / "launch.json").read_text())
    assert summary["exit_code"] == 3 and summary["workers"]["worker-1"]["exit_codes"] == [3]
    assert (tmp_path / "sigterm-0").exists()  # the survivor, blocked in its sync step, was told to stop
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_every_worker_and_leaves_no_process_behind(tmp_path):
    proc = launch(tmp_path, nproc=2, steps=100_000, script_args=("--sleep", "0.05"), wait=False)
    try:
        deadline = time.monotonic() + 180
        logs = [tmp_path / "logs" / f"worker-{i}.log" for i in range(2)]
        while not all(p.exists() and "training from step" in p.read_text() for p in logs):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        time.sleep(1)  # a few steps in
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert (tmp_path / "sigterm-0").exists() and (tmp_path / "sigterm-1").exists()  # forwarded, not SIGKILLed
    assert not (tmp_path / "result-0.pt").exists()
    assert leftovers(tmp_path) == []


def test_launch_refuses_a_missing_script_with_a_message_naming_the_fix(tmp_path):
    res = subprocess.run([sys.executable, "-m", "shardps", "launch", "--nproc", "2", str(tmp_path / "nope.py")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no script" in res.stderr and "-m MODULE" in res.stderr
