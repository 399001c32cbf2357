"""A plain `pip install <checkout>` (not editable, no extras) runs `shardps run` end to end, as a new
user's first command would, and names the install command of each optional piece it left out."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a clean checkout does not have: this machine's venv, caches, build outputs, run directories.
NOT_IN_A_CHECKOUT = shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__",
                                           ".pytest_cache", "*.whl")


def run(*cmd, timeout, cwd=None, env=None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert res.returncode == 0, (f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout[-3000:]}\n"
                                 f"{res.stderr[-3000:]}")
    return res


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_plain_pip_install_runs_the_default_workload_and_names_the_missing_extras(tmp_path):
    checkout = tmp_path / "shardps"
    shutil.copytree(ROOT, checkout, ignore=NOT_IN_A_CHECKOUT)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    run(sys.executable, "-m", "venv", venv, timeout=120)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    run(*pip, "torch==2.13.0", timeout=600, env=env)  # the CPU wheel on disk; never an unpinned torch
    run(*pip, checkout, timeout=600, env=env)
    listed = run(venv / "bin" / "python", "-m", "pip", "list", "--format=json", timeout=60, env=env).stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert "shardps" in installed and not {"matplotlib", "tensorboard"} & installed  # a core install only

    out = tmp_path / "run"
    res = run(venv / "bin" / "shardps", "run", "--steps", "30", "--out", out, timeout=300, cwd=tmp_path, env=env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["held_out"]["accuracy"] > 0.5
    assert (out / "model.safetensors").exists() and (out / "metrics.jsonl").exists()
    assert not (out / "training.png").exists()
    assert "training.png not drawn: the run's plots needs matplotlib: pip install 'shardps[plots]'" in res.stdout
    assert "pip install 'shardps[tb]'" in res.stdout  # TensorBoard events left out, and how to get them
    assert "Traceback" not in res.stdout + res.stderr
