"""Docker for the `compose`-marked tests (docker-compose and Swarm end to end), shared by both.

No registry can be reached, so images are built offline: a bookworm base made by debootstrap and
`docker import`ed, a wheelhouse pip downloads from the package index, and Prometheus from Debian's
package. The engine is installed (apt) and started if none answers, and only an engine started here
is stopped again, by its PID, once the session ends. These tests run last (scripts/test.sh): a
Docker engine rewrites the root namespace's firewall."""
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from dockerenv import BASE, IMAGE, PROMETHEUS_IMAGE, ROOT, WHEELHOUSE, debian_mirror, docker_up, sh


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the docker end-to-end tests need root (they install and start a Docker engine)")
    missing = [t for t in ("docker", "dockerd", "docker-compose", "debootstrap") if not shutil.which(t)]
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
    if daemon is not None:  # only the engine this session started, by its PID
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)


@pytest.fixture(scope="session")
def base_image(engine, tmp_path_factory):
    """A Debian bookworm base with python3 and pip, made by debootstrap (kept by the engine between runs)."""
    if sh("docker", "image", "inspect", BASE, check=False).returncode != 0:
        rootfs = tmp_path_factory.mktemp("rootfs")
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-pip", "bookworm", rootfs, debian_mirror(),
           timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True, timeout=300)
        tar.wait(timeout=60)
        shutil.rmtree(rootfs, ignore_errors=True)
    return BASE


@pytest.fixture(scope="session")
def image(base_image):
    """The repository's Dockerfile built on the offline base from a wheelhouse."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    deps = [d for d in deps if not d.startswith("torch") and "python_version" not in d]
    sh(sys.executable, "-m", "pip", "download", "-q", "-d", WHEELHOUSE, "torch==2.13.0", "setuptools>=68", "wheel",
       *deps, timeout=900)
    try:
        sh("docker", "build", "-q", "-t", IMAGE, "--build-arg", f"BASE={base_image}", "--build-arg",
           "PIP_ARGS=--no-index --find-links /wheelhouse", ROOT, timeout=900)
    finally:
        for wheel in WHEELHOUSE.glob("*.whl"):
            wheel.unlink()
    return IMAGE


@pytest.fixture(scope="session")
def prometheus_image(base_image):
    """deploy/prometheus.Dockerfile (Debian's prometheus package) on the same base."""
    sh("docker", "build", "-q", "-t", PROMETHEUS_IMAGE, "--build-arg", f"BASE={base_image}", "-f",
       ROOT / "deploy" / "prometheus.Dockerfile", ROOT / "deploy", timeout=900)
    return PROMETHEUS_IMAGE
