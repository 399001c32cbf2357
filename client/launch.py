"""``shardps launch``: torchrun for parameter servers.

    shardps launch --nproc 4 train.py --epochs 3           # an embedded cluster (2 servers) and 4 workers
    shardps launch --cluster HOST:7070 --nproc 2 train.py  # workers of a cluster that runs elsewhere
    shardps launch --nproc 4 --restart-on-failure 3 train.py

Starts a ``LocalCluster`` unless ``cluster`` is given, then N copies of the script
(``python script.py ARGS``) with what ``ShardedOptimizer`` reads from the environment,
so the script passes no address:

    SHARDPS_CLUSTER                 the coordinator, host:port
    SHARDPS_MIN_WORKERS             N (or min_workers): training starts when this many registered
    SHARDPS_NPROC                   N
    SHARDPS_WORKER_NAME             worker-<i> (worker-<i>.r<k> after its k-th restart)
    SHARDPS_LOCAL_RANK, LOCAL_RANK  i, the process index on this machine (pick cuda:LOCAL_RANK)
    SHARDPS_RESTART_COUNT           k
    SHARDPS_AUTH_TOKEN, SHARDPS_TLS_*   the cluster's credentials (an embedded cluster makes up a token)

The data rank is not among them: the coordinator hands it out (``opt.rank``,
``opt.world_size``) and it changes when the membership does. Each worker runs in its
own process group, so a signal reaches its data-loader children too. Every line a
worker prints is echoed as ``[worker-i] ...`` and kept in ``LOG_DIR/worker-i.log``.
SIGINT and SIGTERM are forwarded to the workers (SIGKILL after ``grace_s``). A worker
that fails is started again up to K times: its new ``ShardedOptimizer`` registers and
joins the running job at a step boundary, so the loop must read
``while opt.steps_taken < steps:`` to resume at the job's step. The launcher then stops
everything it started and exits with the first unrecovered failure's code (128 + N for
signal N), or 0.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..proto import defaults as D
from .local import LocalCluster

POLL_S = 0.1  # how often the launcher looks at its workers


@dataclass(frozen=True)
class LaunchConfig:
    script: str  # the training script (a .py file), or a module name with module=True
    args: tuple[str, ...] = ()  # the script's own arguments
    nproc: int = 1  # worker processes on this machine
    servers: int = 2  # shard servers of the embedded cluster
    cluster: str = ""  # join this coordinator (host:port) instead of starting a cluster
    min_workers: int = 0  # SHARDPS_MIN_WORKERS for the scripts; 0: nproc (with --cluster across hosts: the total)
    restart_on_failure: int = 0  # start each failed worker again up to this many times
    lease_seconds: float = D.LEASE_S  # embedded cluster: a dead worker leaves the membership after this long
    checkpoint_every: int = 0  # embedded cluster: servers checkpoint every N steps (0: off)
    log_dir: str = ""  # worker and cluster logs, launch.json; default runs/launch-<time>
    module: bool = False  # run ``python -m script`` instead of a file
    grace_s: float = 10.0  # after forwarding SIGINT/SIGTERM (or a failure), SIGKILL what is left this late

    def __post_init__(self):
        if self.nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {self.nproc}")
        if self.servers < 1:
            raise ValueError(f"--servers must be at least 1, got {self.servers}")
        if self.restart_on_failure < 0 or self.min_workers < 0 or self.checkpoint_every < 0:
            raise ValueError("--restart-on-failure, --min-workers and --checkpoint-every must not be negative")
        if self.lease_seconds <= 0 or self.grace_s <= 0:
            raise ValueError("--lease-seconds and the grace period must be positive")
        if not self.module and not Path(self.script).is_file():
            raise ValueError(f"no script {self.script!r}: give the path of a Python file (or -m MODULE)")


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)  # of each run, as a shell reports them
    pids: list[int] = field(default_factory=list)  # of each run
    reader: threading.Thread | None = None
    finished: bool = False  # exited 0

    @property
    def name(self) -> str:
        return f"worker-{self.index}"


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it: -N (killed by signal N) becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class Launcher:
    def __init__(self, config: LaunchConfig):
        self.config = config
        self.log_dir = Path(config.log_dir or f"runs/launch-{time.strftime('%Y%m%d-%H%M%S')}")
        self.workers = [Worker(i) for i in range(config.nproc)]
        self.cluster: LocalCluster | None = None
        self.address = config.cluster
        self._signal = 0  # the first SIGINT/SIGTERM received
        self._print = threading.Lock()  # one prefixed line at a time

    def say(self, message: str) -> None:
        with self._print:
            print(f"[launch] {message}", file=sys.stderr, flush=True)

    def run(self) -> int:
        """Start, supervise and stop everything; returns the launcher's exit code."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        code, started = 1, time.monotonic()
        try:
            env = self._environment()
            for w in self.workers:
                if not self._signal:  # a signal during cluster start-up starts no worker
                    self._start(w, env)
            code = self._supervise(env)
        finally:
            self._stop_workers()
            if self.cluster is not None:
                self.cluster.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._write_summary(code)
        restarts = sum(w.restarts for w in self.workers)
        self.say(f"{'done' if code == 0 else f'exit code {code}'} after {time.monotonic() - started:.1f}s, "
                 f"{restarts} restart(s); logs in {self.log_dir}")
        return code

    def _on_signal(self, signum, frame) -> None:
        if self._signal:  # a second signal: stop waiting
            self._kill_all(signal.SIGKILL)
            return
        self._signal = signum
        self._kill_all(signum)  # forward at once; the supervising loop then waits for the workers

    def _environment(self) -> dict[str, str]:
        c = self.config
        env = dict(os.environ)
        if not c.cluster:
            # An embedded cluster on 127.0.0.1 takes only callers with its token (others on this host may dial it).
            token = os.environ.get("SHARDPS_AUTH_TOKEN") or secrets.token_hex(16)
            self.cluster = LocalCluster(servers=c.servers, log_dir=self.log_dir / "cluster",
                                        lease_seconds=c.lease_seconds, checkpoint_every=c.checkpoint_every,
                                        checkpoint_dir=self.log_dir / "checkpoints" if c.checkpoint_every else None,
                                        auth_token=token).start()
            self.address = self.cluster.address
            env = {k: v for k, v in env.items() if not k.startswith(("SHARDPS_AUTH_TOKEN", "SHARDPS_TLS_"))}
            env.update(self.cluster.security.env())
            self.say(f"cluster at {self.address}: coordinator and {c.servers} server(s), logs in "
                     f"{self.log_dir / 'cluster'}")
        env.update(SHARDPS_CLUSTER=self.address, SHARDPS_MIN_WORKERS=str(c.min_workers or c.nproc),
                   SHARDPS_NPROC=str(c.nproc), PYTHONUNBUFFERED="1")
        if c.nproc > 1:
            env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N processes must not each take every core
        return env

    def _start(self, w: Worker, env: dict[str, str]) -> None:
        c = self.config
        cmd = [sys.executable, *(["-m"] if c.module else []), c.script, *c.args]
        name = w.name + (f".r{w.restarts}" if w.restarts else "")
        child_env = {**env, "SHARDPS_WORKER_NAME": name, "SHARDPS_LOCAL_RANK": str(w.index),
                     "LOCAL_RANK": str(w.index), "SHARDPS_RESTART_COUNT": str(w.restarts)}
        w.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=child_env, start_new_session=True)
        w.pids.append(w.proc.pid)
        w.reader = threading.Thread(target=self._relay, args=(w.name, w.proc.stdout), daemon=True)
        w.reader.start()

    def _relay(self, name: str, stream) -> None:
        """Echo a worker's output as ``[name] line`` and append it to LOG_DIR/name.log."""
        with open(self.log_dir / f"{name}.log", "ab") as log:
            for line in iter(stream.readline, b""):
                log.write(line)
                log.flush()
                with self._print:
                    sys.stdout.write(f"[{name}] {line.decode(errors='replace').rstrip()}\n")
                    sys.stdout.flush()
        stream.close()

    def _supervise(self, env: dict[str, str]) -> int:
        """Wait for every worker to succeed; restart failed ones while allowed. Returns the exit code."""
        while True:
            if self._signal:
                return 128 + self._signal
            if self.cluster is not None:
                for name, proc in self.cluster.procs.items():
                    if proc.poll() is not None:
                        self.say(f"{name} of the cluster died with code {proc.returncode} "
                                 f"(see {self.log_dir / 'cluster' / (name + '.log')}); stopping")
                        return 1
            for w in self.workers:
                code = w.proc.poll()
                if code is None or w.finished:
                    continue
                w.exit_codes.append(exit_code(code))
                if code == 0:
                    w.finished = True
                elif w.restarts < self.config.restart_on_failure:
                    w.restarts += 1
                    self.say(f"{w.name} exited with code {exit_code(code)}; restarting it "
                             f"({w.restarts}/{self.config.restart_on_failure})")
                    self._start(w, env)
                else:
                    again = f" after {w.restarts} restart(s)" if w.restarts else ""
                    self.say(f"{w.name} exited with code {exit_code(code)}{again}; stopping the others")
                    return exit_code(code)
            if all(w.finished for w in self.workers):
                return 0
            time.sleep(POLL_S)

    def _kill_all(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                try:
                    os.killpg(w.proc.pid, signum)  # the worker's whole process group (its own session)
                except ProcessLookupError:
                    pass

    def _stop_workers(self) -> None:
        """SIGTERM the workers still running (unless a forwarded signal is on its way), SIGKILL after grace."""
        running = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        if not self._signal:
            self._kill_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_s
        for w in running:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{w.name} did not stop within {self.config.grace_s:.0f}s; killing it")
            try:  # its group too: what it started (data loaders) must not outlive the launch
                os.killpg(w.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            w.proc.wait(timeout=30)
        for w in self.workers:
            if w.reader is not None:
                w.reader.join(timeout=5)

    def _write_summary(self, code: int) -> None:
        summary = {"cluster": self.address, "embedded_cluster": self.cluster is not None, "exit_code": code,
                   "signal": self._signal or None,
                   "workers": {w.name: {"pids": w.pids, "exit_codes": w.exit_codes, "restarts": w.restarts}
                               for w in self.workers}}
        (self.log_dir / "launch.json").write_text(json.dumps(summary, indent=2) + "\n")


def launch(config: LaunchConfig) -> int:
    return Launcher(config).run()
