"""Run a scenario on a real cluster: a coordinator, 2 shard servers and 2 worker processes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="module")
def cluster():
    from shardps import LocalCluster

    with LocalCluster(servers=2, step_timeout=60) as c:
        yield c


@pytest.fixture
def sharded(cluster, tmp_path):
    """``sharded(name)`` runs scenario ``name`` on 2 worker processes; returns their results by rank."""

    def run(name: str, timeout: float = 240):
        procs = []
        for i in range(2):
            log = open(tmp_path / f"{name}-{i}.log", "wb")
            cmd = [sys.executable, str(HERE / "worker.py"), name, "--cluster", cluster.address,
                   "--out", str(tmp_path / f"{name}-{i}.pt")]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        try:
            for i, (proc, log) in enumerate(procs):
                code = proc.wait(timeout=timeout)
                log.close()
                text = (tmp_path / f"{name}-{i}.log").read_text()
                assert code == 0, f"worker {i} of {name} exited {code}:\n{text[-4000:]}"
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        results = [torch.load(tmp_path / f"{name}-{i}.pt", weights_only=False) for i in range(2)]
        return sorted(results, key=lambda r: r["rank"])

    return run
