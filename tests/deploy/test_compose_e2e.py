"""docker-compose for real: build the image offline (a debootstrap-made base and a wheelhouse, since
no registry can be reached), bring the stack up, train `digits` across containers, read
`shardps status` from the coordinator's container, then kill and restart a server container, pause
one, cut one off the network, and check the job survives all of it. Tears down everything it
started, the Docker engine included. Runs after the rest of the suite (scripts/test.sh)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / "deploy" / "wheelhouse"
BASE, IMAGE = "shardps-base:bookworm", "shardps:ci"
STEPS = 6000  # digits steps take milliseconds: long enough for every fault to land mid-run

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1200)]


def sh(*cmd, timeout=600, check=True, env=None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def docker_up() -> bool:
    return shutil.which("docker") is not None and \
        subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the compose end-to-end test needs root (it installs and starts a Docker engine)")
    missing = [t for t in ("docker", "docker-compose", "debootstrap") if not shutil.which(t)]
    if missing:
        if not shutil.which("apt-get"):
            pytest.skip(f"{missing} missing and no apt-get to install them")
        sh("apt-get", "install", "-y", "-qq", "docker.io", "docker-compose", "debootstrap", timeout=900,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    daemon = None
    if not docker_up():
        log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "wb")
        daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not docker_up():
            assert daemon.poll() is None and time.monotonic() < deadline, "dockerd did not start"
            time.sleep(0.5)
    yield
    if daemon is not None:  # only the engine this test started, by its PID
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)


def debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory):
    if sh("docker", "image", "inspect", BASE, check=False).returncode != 0:
        rootfs = tmp_path_factory.mktemp("rootfs")
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-pip", "bookworm", rootfs, debian_mirror(),
           timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True, timeout=300)
        tar.wait(timeout=60)
        shutil.rmtree(rootfs, ignore_errors=True)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    deps = [d for d in deps if not d.startswith("torch") and "python_version" not in d]
    sh(sys.executable, "-m", "pip", "download", "-q", "-d", WHEELHOUSE, "torch==2.13.0", "scikit-learn>=1.3",
       "setuptools>=68", "wheel", *deps, timeout=900)
    try:
        sh("docker", "build", "-q", "-t", IMAGE, "--build-arg", f"BASE={BASE}", "--build-arg",
           "PIP_ARGS=--no-index --find-links /wheelhouse", ROOT, timeout=900)
    finally:
        for wheel in WHEELHOUSE.glob("*.whl"):
            wheel.unlink()
    yield IMAGE


def test_a_compose_cluster_trains_across_containers_and_survives_container_faults(image):
    project = f"shardpsci{os.getpid()}"
    env = {**os.environ, "SHARDPS_IMAGE": image, "SHARDPS_STEPS": str(STEPS), "SHARDPS_SLOWDOWN": "3",
           "SHARDPS_AUTH_TOKEN": "ci-token", "SHARDPS_CHECKPOINT_EVERY": "20", "SHARDPS_EVAL_EVERY": "0"}
    compose = ["docker-compose", "-p", project, "-f", ROOT / "docker-compose.yml"]
    chaos = [sys.executable, "-m", "shardps", "chaos"]

    def status() -> dict:
        res = sh(*compose, "exec", "-T", "coordinator", "shardps", "status", "--cluster", "coordinator:7070", "--json",
                 env=env, timeout=60)
        return json.loads(res.stdout)

    def versions() -> list[int]:
        return [s.get("version", -1) for s in status()["shards"]]

    def wait_for(predicate, what, timeout=240):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(1)

    try:
        sh(*compose, "up", "-d", "--scale", "worker=2", env=env, timeout=300)
        wait_for(lambda: min(versions()) >= 40, "training to start")
        for action in ("kill", "restart"):  # the server restores its checkpoint; the job rolls back
            sh(*chaos, action, "server-1", "--compose", project)
        wait_for(lambda: status()["rollbacks"], "the rollback")
        to_version = status()["rollbacks"][0]["to_version"]
        wait_for(lambda: min(versions()) >= to_version + 20, "training to go on after the restart")
        assert min(versions()) < STEPS - 500, "the run ended before the next faults could land"
        sh(*chaos, "pause", "server-0", "--compose", project)
        time.sleep(4)
        sh(*chaos, "resume", "server-0", "--compose", project)
        sh(*chaos, "link", "server-1", "--partition", "--compose", project)
        time.sleep(4)
        sh(*chaos, "link", "server-1", "--heal", "--compose", project)
        workers = sh("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}",
                     "--filter", "label=com.docker.compose.service=worker").stdout.split()
        assert len(workers) == 2
        codes = sh("docker", "wait", *workers, timeout=600).stdout.split()
        assert codes == ["0", "0"], sh(*compose, "logs", "--tail", "40", env=env, check=False).stdout[-4000:]
        final = status()
        assert [s["version"] for s in final["shards"]] == [STEPS, STEPS]
        assert final["rollbacks"] and final["rollbacks"][0]["shard_id"] == 1
        assert final["job"]["mode"] == "sync" and len(final["membership"]["workers"]) == 2
    finally:
        sh(*compose, "down", "-v", "--timeout", "30", env=env, check=False, timeout=300)
