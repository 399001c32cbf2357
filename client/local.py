"""LocalCluster: a coordinator and S shard servers as real subprocesses on 127.0.0.1.

    from shardps import LocalCluster
    with LocalCluster(servers=2) as cluster:
        ...  # workers use cluster=cluster.address

Every process binds port 0 and reports its port through a file, so clusters never
collide. ``start`` returns once the coordinator and every server answer health
checks and every server has registered. ``stop`` ends only the processes this
object started (SIGTERM, then SIGKILL after a grace period), by PID.

With ``hosts=True`` every role runs in its own Linux network namespace behind a
bridge (``chaos/netns.py``), on its own private address, so the cluster crosses a
real network and ``cluster.network`` can cut, slow or lossify each host's link;
``worker_popen`` starts worker ``i`` on host ``worker-<i>``. Root only.

Process faults, for experiments: ``kill(name)`` (SIGKILL), ``pause(name)``
(SIGSTOP), ``resume(name)`` (SIGCONT) and ``restart(name)`` (same port, same
arguments, so clients reconnect on their own), with names ``"coordinator"``,
``"server-0"``, ``"server-1"``, ... Each is counted in ``faults``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ..runtime.history import ENV as HISTORY_ENV
from ..proto import defaults as D
from ..runtime.rpc import check_health

# glibc malloc settings: keep large gradient buffers out of repeated mmap/munmap
# (a 2x2 push-pull step went from ~222 ms to ~169 ms), and use one arena, so the
# 1 MiB messages that gRPC threads allocate and free reuse the same memory instead
# of fragmenting per-thread arenas (server training-state memory 475 -> 410 MB on
# the 25M benchmark, step time unchanged; bench/RESULTS.md).
GLIBC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:"
                  "glibc.malloc.trim_threshold=1073741824:glibc.malloc.arena_max=1")


class ClusterError(RuntimeError):
    """A cluster process failed to start or died; the message carries its log's tail."""


class LocalCluster:
    def __init__(
        self,
        servers: int = 2,
        *,
        host: str = "127.0.0.1",
        step_timeout: float = D.STEP_TIMEOUT_S,
        startup_timeout: float = 60.0,
        log_dir: str | os.PathLike | None = None,
        log_level: str = "info",
        checkpoint_every: int = D.RUN_CHECKPOINT_EVERY,
        checkpoint_dir: str | os.PathLike | None = None,
        durable: bool = True,
        lease_seconds: float = D.LEASE_S,
        replica_lease_seconds: float | None = None,
        hosts: bool = False,
        worker_hosts: int = 0,
        resume_job: str | os.PathLike | None = None,
        auth_token: str = "",
        cluster_token: str = "",
        tls_dir: str | os.PathLike | None = None,
        mutual_tls: bool = False,
        metrics: bool = False,
        history: bool = True,
        own_disks: bool = False,
    ):
        """Durable by default: the coordinator keeps its state in the log directory (a restarted
        coordinator resumes its jobs), and servers checkpoint their shards at version 0, every
        ``checkpoint_every`` versions (0: only then, on request and on SIGTERM) to ``checkpoint_dir``
        (default: a folder in the log directory), so a restarted server restores its shard and the
        job rolls back to the newest common checkpoint instead of failing. ``durable=False`` keeps
        everything in memory: a killed process then loses its part of the job. ``replica_lease_seconds``:
        for replicated jobs, how long a shard's primary answers after its last renewal (a dead one is
        detected this long (x 1.01) after its last answer, a dead one at once when a worker finds its port
        refusing; None: the coordinator's default, proto/defaults.REPLICA_LEASE_S). ``history``: every role appends what it does to
        ``history_dir`` (``<log dir>/history``), which ``shardps check`` proves the promises over;
        workers record there when given ``history_dir=cluster.history_dir`` (``shardps run``'s do).
        ``own_disks``: each server checkpoints into a folder of its own, ``<checkpoint_dir>/server-<k>``,
        and reads only what it wrote there, as with docker-compose's and Kubernetes' volumes (by default
        the servers share ``checkpoint_dir``, so any of them reads a shard's checkpoints whoever wrote them)."""
        if servers < 1:
            raise ValueError(f"a cluster needs at least one server, got servers={servers}")
        self.num_servers, self.host = servers, host
        self.step_timeout, self.startup_timeout, self.log_level = step_timeout, startup_timeout, log_level
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="shardps-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = ""
        self.server_addresses: dict[int, str] = {}
        self._args: dict[str, list[str]] = {}  # name -> its `python -m shardps` arguments, for restart
        self._ports: dict[str, int] = {}
        self.faults: Counter = Counter()  # "kill/server-1" -> times done
        self.checkpoint_every, self.lease_seconds = checkpoint_every, lease_seconds
        self.replica_lease_seconds = replica_lease_seconds  # None: the coordinator's default (or its env var)
        self.resume_job = resume_job
        self.metrics = metrics  # every role serves Prometheus metrics on a free port: metrics_address(name)
        self.history_dir = str(self.log_dir / "history") if history else ""  # the run's history (shardps check)
        # Who may talk to the cluster. Workers: anyone, unless auth_token is set. Internal and admin
        # calls: only holders of the cluster's credential, made up here unless given (runtime/security.py).
        # tls_dir holds what scripts/dev-certs.sh makes (ca.pem, server.pem/-key.pem, client.pem/-key.pem).
        import secrets

        from ..runtime.security import Security

        tls = Path(tls_dir) if tls_dir is not None else None
        cluster_token = cluster_token or secrets.token_hex(24)
        self.role_security = Security(token=auth_token, cluster_token=cluster_token,
                                      tls_cert=str(tls / "server.pem") if tls else "",
                                      tls_key=str(tls / "server-key.pem") if tls else "",
                                      tls_ca=str(tls / "ca.pem") if tls else "", client_auth=mutual_tls)
        # What workers and tools of this cluster use: never the cluster's credential...
        self.security = Security(token=auth_token, tls_ca=str(tls / "ca.pem") if tls else "",
                                 tls_cert=str(tls / "client.pem") if tls and mutual_tls else "",
                                 tls_key=str(tls / "client-key.pem") if tls and mutual_tls else "")
        # ...and what its operator uses (fault injection, checkpoints on request): with it.
        self.admin_security = Security(auth_token, cluster_token, self.security.tls_cert, self.security.tls_key,
                                       self.security.tls_ca)
        self.token_file = self.log_dir / "cluster.token"
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:  # for `shardps chaos/checkpoint --run DIR`: readable by this user only
            f.write(cluster_token)
        self.network = None
        if hosts:
            from ..chaos.netns import Network

            names = ["coordinator", *(f"server-{i}" for i in range(servers)),
                     *(f"worker-{i}" for i in range(worker_hosts))]
            self.network = Network(names, name="LocalCluster", driver=True)
        self.durable = durable
        self.checkpoint_dir = (None if not durable else Path(checkpoint_dir) if checkpoint_dir is not None
                               else self.log_dir / "checkpoints")
        self.state_dir = self.log_dir / "coordinator-state" if durable else None
        self.own_disks = own_disks

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalCluster":
        try:
            if self.network is not None:
                self.network.start()
            port = self._spawn("coordinator", ["coordinator", "--num-servers", str(self.num_servers),
                                               "--lease-seconds", str(self.lease_seconds),
                                               *(["--replica-lease-seconds", str(self.replica_lease_seconds)]
                                                 if self.replica_lease_seconds is not None else []),
                                               *(["--state-dir", str(self.state_dir)] if self.state_dir else []),
                                               *(["--resume-job", str(self.resume_job)] if self.resume_job else [])])
            self.address = f"{self._host_of('coordinator')}:{port}"
            self._wait_healthy("coordinator", self.address)
            for shard_id in range(self.num_servers):
                name = f"server-{shard_id}"
                args = ["server", "--coordinator", self.address, "--shard-id", str(shard_id),
                        "--step-timeout", str(self.step_timeout),
                        # the servers share this host's cores rather than each running every core's worth of threads
                        "--compute-threads", str(max(1, (os.cpu_count() or 1) // self.num_servers))]
                if self.checkpoint_dir is not None:
                    disk = self.checkpoint_dir / name if self.own_disks else self.checkpoint_dir
                    args += ["--checkpoint-dir", str(disk), "--checkpoint-every", str(self.checkpoint_every)]
                self.server_addresses[shard_id] = f"{self._host_of(name)}:{self._spawn(name, args)}"
            for shard_id, address in self.server_addresses.items():
                self._wait_healthy(f"server-{shard_id}", address)
            self._wait_registered()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, args: list[str], port: int = 0) -> int:
        """Start ``python -m shardps ARGS`` on ``port`` (0: a free one); return the port it bound."""
        port_file = self.log_dir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        if self.metrics and "--metrics-port" not in args:
            args = [*args, "--metrics-port", "0"]
        self._args[name] = args
        cmd = [sys.executable, "-m", "shardps", *args, "--host", self._host_of(name), "--port", str(port),
               "--port-file", str(port_file), "--log-level", self.log_level]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SHARDPS_AUTH_TOKEN", "SHARDPS_CLUSTER_TOKEN", "SHARDPS_TLS_"))}
        env.update({"GLIBC_TUNABLES": GLIBC_TUNABLES, **self.role_security.env()})
        env.pop(HISTORY_ENV, None)
        if self.history_dir:
            env[HISTORY_ENV] = self.history_dir
        log = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = self._popen(name, cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while not port_file.exists():
            self._check_alive(name)
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} did not report its port within {self.startup_timeout:.0f}s{self._tail(name)}")
            time.sleep(0.05)
        self._ports[name] = int(port_file.read_text())
        return self._ports[name]

    def _host_of(self, name: str) -> str:
        """The address ``name`` binds and is reached at."""
        return self.network.address(name) if self.network is not None else self.host

    def _popen(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        if self.network is not None:
            return self.network.popen(name, cmd, **kwargs)
        return subprocess.Popen(cmd, **kwargs)

    def worker_popen(self, index: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start a worker process: on host ``worker-<index>`` with ``hosts=True``, else here."""
        return self._popen(f"worker-{index}", cmd, **kwargs)

    def _wait_healthy(self, name: str, address: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not check_health(address, timeout=1.0, security=self.security):
            self._check_alive(name)
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} at {address} is not healthy after {self.startup_timeout:.0f}s{self._tail(name)}")
            time.sleep(0.05)

    def _wait_registered(self) -> None:
        from ..coordinator.client import CoordinatorClient

        deadline = time.monotonic() + self.startup_timeout
        with CoordinatorClient(self.address, security=self.security) as coord:
            while len(coord.status().servers) < self.num_servers:
                for name in self.procs:
                    self._check_alive(name)
                if time.monotonic() > deadline:
                    raise ClusterError(f"servers did not register within {self.startup_timeout:.0f}s")
                time.sleep(0.05)

    def _check_alive(self, name: str) -> None:
        code = self.procs[name].poll()
        if code is not None:
            raise ClusterError(f"{name} exited with code {code}{self._tail(name)}")

    def _tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"; last lines of {path}:\n" + "\n".join(text)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every process this cluster started, SIGKILL any still alive after ``grace`` s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        if self.network is not None:
            self.network.close()
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    # ------------------------------------------------------------------ process faults

    def _proc(self, name: str) -> subprocess.Popen:
        if name not in self.procs:
            raise ValueError(f"no process named {name!r} in this cluster; choose one of: {', '.join(self.procs)}")
        return self.procs[name]

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` (no checkpoint, no goodbye) and reap it."""
        proc = self._proc(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused process must still die
            proc.kill()
            proc.wait(timeout=30)
        self.faults[f"kill/{name}"] += 1

    def pause(self, name: str) -> None:
        """SIGSTOP ``name``: it keeps its sockets but answers nothing until ``resume``."""
        self._proc(name).send_signal(signal.SIGSTOP)
        self.faults[f"pause/{name}"] += 1

    def resume(self, name: str) -> None:
        """SIGCONT a paused process."""
        self._proc(name).send_signal(signal.SIGCONT)
        self.faults[f"resume/{name}"] += 1

    def restart(self, name: str) -> None:
        """Stop ``name`` if it runs (SIGKILL), start it again with the same arguments on the same
        port, and wait until it is healthy (and, for a server, registered again)."""
        proc = self._proc(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=30)
        port = self._spawn(name, self._args[name], self._ports[name])
        self._wait_healthy(name, f"{self._host_of(name)}:{port}")
        if name.startswith("server-"):
            self._wait_registered()
        self.faults[f"restart/{name}"] += 1

    def alive(self, name: str) -> bool:
        return self._proc(name).poll() is None

    # ------------------------------------------------------------------ inspection

    def metrics_address(self, name: str) -> str:
        """host:port of ``name``'s Prometheus endpoint (with ``metrics=True``)."""
        path = self.log_dir / f"{name}.port.metrics"
        if not self.metrics or not path.exists():
            raise ValueError(f"{name} serves no metrics: start the cluster with metrics=True")
        return f"{self._host_of(name)}:{int(path.read_text())}"

    def pid(self, name: str) -> int:
        """PID of ``"coordinator"`` or ``"server-<k>"``."""
        return self.procs[name].pid

    def server_address(self, shard_id: int) -> str:
        return self.server_addresses[shard_id]
