import subprocess
import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parent / "helpers"


@pytest.fixture
def run_workers(tmp_path):
    """Start one train_worker.py process per entry of ``sizes``; wait; return their results."""
    import torch

    def run(cluster, n, timeout=240, **opts):
        procs, outs = [], []
        for i in range(n):
            out = tmp_path / f"worker{i}.pt"
            args = [sys.executable, str(HELPERS / "train_worker.py"), "--cluster", cluster.address,
                    "--out", str(out), "--init-seed", str(100 + i)]
            for key, value in opts.items():
                if value is False:
                    continue
                flag = "--" + key.replace("_", "-")
                args += [flag] if value is True else [flag, str(value)]
            log = open(tmp_path / f"worker{i}.log", "wb")
            procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), log))
            outs.append(out)
        try:
            for (proc, log), i in zip(procs, range(n)):
                code = proc.wait(timeout=timeout)
                log.close()
                text = (tmp_path / f"worker{i}.log").read_text()
                assert code == 0, f"worker {i} exited {code}:\n{text[-3000:]}"
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return sorted((torch.load(o) for o in outs), key=lambda r: r["rank"])

    return run
