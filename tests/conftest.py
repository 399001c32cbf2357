import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parent / "helpers"


class Workers:
    """train_worker.py processes started by a test; ``wait`` collects their results."""

    def __init__(self, tmp_path, procs, outs, logs):
        self.tmp_path, self.procs, self.outs, self.logs = tmp_path, procs, outs, logs

    def wait(self, timeout=240):
        import torch

        try:
            for i, (proc, log) in enumerate(self.procs):
                code = proc.wait(timeout=timeout)
                log.close()
                text = self.logs[i].read_text()
                assert code == 0, f"worker {i} exited {code}:\n{text[-3000:]}"
        finally:
            self.kill()
        return sorted((torch.load(o) for o in self.outs), key=lambda r: r["rank"])

    def kill(self):
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def spawn_workers(tmp_path):
    """Start ``n`` train_worker.py processes (``script``: another helper, e.g. diloco_worker.py; options as
    keyword arguments); returns ``Workers``."""
    started = []

    def spawn(cluster, n, script="train_worker.py", **opts):
        procs, outs, logs = [], [], []
        first = sum(len(w.procs) for w in started)  # files of later spawns never clobber earlier ones'
        for i in range(first, first + n):
            out = tmp_path / f"worker{i}.pt"
            args = [sys.executable, str(HELPERS / script), "--cluster", cluster.address,
                    "--out", str(out), "--init-seed", str(100 + i)]
            for key, value in opts.items():
                if value is False:
                    continue
                flag = "--" + key.replace("_", "-")
                args += [flag] if value is True else [flag, str(value)]
            logs.append(tmp_path / f"worker{i}.log")
            log = open(logs[-1], "wb")
            # each worker appends its replies to the cluster's history, which shardps check reads
            env = dict(os.environ, SHARDPS_HISTORY_DIR=getattr(cluster, "history_dir", "") or "")
            if getattr(cluster, "network", None) is not None:  # hosts=True: worker i runs on host worker-<i>
                proc = cluster.worker_popen(i, args, stdout=log, stderr=subprocess.STDOUT, env=env)
            else:
                proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
            procs.append((proc, log))
            outs.append(out)
        started.append(Workers(tmp_path, procs, outs, logs))
        return started[-1]

    yield spawn
    for workers in started:  # a failed test must not leave workers behind
        workers.kill()


@pytest.fixture
def run_workers(spawn_workers):
    """Start one train_worker.py process per entry of ``sizes``; wait; return their results."""

    def run(cluster, n, timeout=240, **opts):
        return spawn_workers(cluster, n, **opts).wait(timeout)

    return run


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 kB tmpfs (root only; skips otherwise): a disk or /dev/shm that fills up."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {res.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
