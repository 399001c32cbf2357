"""Container-level chaos for a docker-compose cluster: the same faults as a local cluster's.

    shardps chaos kill server-1 --compose shardps          # docker kill
    shardps chaos restart server-1 --compose shardps       # docker start (the server restores its checkpoint)
    shardps chaos pause server-0 --compose shardps         # docker pause (SIGSTOP for every process in it)
    shardps chaos link server-1 --partition --compose shardps   # docker network disconnect
    shardps chaos link server-1 --heal --compose shardps        # connect again, under its service name

A target is a compose service ("server-1"; the first container of a scaled service like
"worker", or "worker-2" for its second) or a container name. Everything goes through the
``docker`` command, so it works wherever ``docker ps`` shows the project.
"""
from __future__ import annotations

import json
import shutil
import subprocess

DOCKER_TIMEOUT_S = 60


class ComposeError(RuntimeError):
    """A docker command failed; the message quotes it."""


def _docker(*args: str) -> str:
    if not shutil.which("docker"):
        raise ComposeError("the docker command is not installed here")
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=DOCKER_TIMEOUT_S)
    if res.returncode != 0:
        raise ComposeError(f"docker {' '.join(args)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


class ComposeCluster:
    def __init__(self, project: str):
        self.project = project

    def container(self, target: str) -> tuple[str, str]:
        """(container name, service) for a service name, ``service-N`` of a scaled service, or a container name."""
        rows = _docker("ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}", "--format",
                       '{{.Names}}\t{{.Label "com.docker.compose.service"}}\t{{.Label "com.docker.compose.container-number"}}')
        entries = [line.split("\t") for line in rows.splitlines() if line.strip()]
        if not entries:
            raise ComposeError(f"no containers of compose project {self.project!r}; is it up? (docker-compose -p NAME)")
        for name, service, number in entries:
            if target in (name, service if number in ("1", "") else None, f"{service}-{number}"):
                return name, service
        raise ComposeError(f"no container {target!r} in project {self.project!r}; it has: "
                           + ", ".join(sorted(n for n, _, _ in entries)))

    def network(self) -> str:
        return f"{self.project}_default"

    def do(self, action: str, target: str, params: dict | None = None) -> str:
        name, service = self.container(target)
        if action == "kill":
            _docker("kill", name)
        elif action == "pause":
            _docker("pause", name)
        elif action == "resume":
            _docker("unpause", name)
        elif action == "restart":
            state = json.loads(_docker("inspect", "--format", "{{json .State}}", name))
            if state.get("Paused"):
                _docker("unpause", name)
            _docker("restart" if state.get("Running") else "start", name)
        elif action == "partition":
            _docker("network", "disconnect", self.network(), name)
        elif action == "heal":
            _docker("network", "connect", "--alias", service, self.network(), name)
        else:
            raise ComposeError(f"{action} is not a container fault; use kill, pause, resume, restart, partition or heal")
        return name
