"""Docker Swarm for real: a single-node swarm on the test's engine, the stack of deploy/swarm/ deployed
with `docker stack deploy` (the token as a Swarm secret, restart policies, checkpoint volumes, and
Prometheus from deploy/swarm/metrics.yml), `digits` trained across the services, a server container
killed and replaced by Swarm from its checkpoint volume, Prometheus asked for the shards' series over
the stack's network. Leaves the swarm it created, and everything else it made, when done."""
import json
import os
import subprocess

import pytest

from dockerenv import ROOT, sh, wait_for

STEPS = 1500  # with SLOWDOWN, long enough for the kill, the restart and the rollback to land mid-run
STACK = f"shardpsswarm{os.getpid()}"
# The overlay networks' addresses: a blackhole route keeps this range from leaving the machine.
ADDRESS_POOL = "10.241.0.0/16"

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]


def swarm_state() -> str:
    return sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()


@pytest.fixture
def swarm(engine):
    """A single-node swarm on 127.0.0.1, created and left by this fixture (never one it found)."""
    if swarm_state() != "inactive":
        pytest.skip("this Docker engine is already part of a swarm this test did not create; leaving it alone")
    had_gwbridge = sh("docker", "network", "inspect", "docker_gwbridge", check=False).returncode == 0
    route = sh("ip", "route", "add", "blackhole", ADDRESS_POOL, check=False).returncode == 0
    try:
        sh("docker", "swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377",
           "--default-addr-pool", ADDRESS_POOL, timeout=120)
        yield
    finally:
        sh("docker", "swarm", "leave", "--force", check=False, timeout=120)
        if not had_gwbridge:  # Swarm made it for its containers; it outlives the swarm otherwise
            sh("docker", "network", "rm", "docker_gwbridge", check=False)
        if route:
            sh("ip", "route", "del", "blackhole", ADDRESS_POOL, check=False)


def container_of(service: str) -> str:
    """The running container of ``service``'s task (one task per role service)."""
    ids = sh("docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_{service}").stdout.split()
    return ids[0] if len(ids) == 1 else ""


def in_container(service: str, *cmd, timeout=60, check=True) -> subprocess.CompletedProcess:
    name = wait_for(lambda: container_of(service), f"a running {service} task", timeout=120)
    return sh("docker", "exec", name, *cmd, timeout=timeout, check=check)


def status() -> dict:
    res = in_container("coordinator", "shardps", "status", "--cluster", "coordinator:7070", "--json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def versions() -> list[int]:
    return [s.get("version", -1) for s in status().get("shards", [])] or [-1]


def tasks(service: str) -> list[str]:
    """Current states of every task ``service`` ever had ("Running 3 seconds ago", "Complete ...", "Failed ...")."""
    return sh("docker", "service", "ps", f"{STACK}_{service}", "--format", "{{.CurrentState}}").stdout.splitlines()


def prometheus(expr: str) -> list[dict]:
    """Ask the stack's Prometheus, from the coordinator's container over the stack's network."""
    code = ("import json, sys, urllib.parse, urllib.request; print(urllib.request.urlopen("
            "'http://prometheus:9090/api/v1/query?' + urllib.parse.urlencode({'query': sys.argv[1]}), timeout=10)"
            ".read().decode())")
    res = in_container("coordinator", "python3", "-c", code, expr, check=False)
    return json.loads(res.stdout)["data"]["result"] if res.returncode == 0 else []


def test_a_swarm_stack_trains_across_services_and_swarm_replaces_a_killed_server(swarm, image, prometheus_image):
    env = {**os.environ, "SHARDPS_IMAGE": image, "SHARDPS_PROMETHEUS_IMAGE": prometheus_image,
           "SHARDPS_STEPS": str(STEPS), "SHARDPS_SLOWDOWN": "3", "SHARDPS_CHECKPOINT_EVERY": "20",
           "SHARDPS_EVAL_EVERY": "0", "SHARDPS_WORKERS": "2"}
    sh("docker", "secret", "create", "shardps_auth_token", "-", stdin="swarm-ci-token\n")
    sh("docker", "secret", "create", "shardps_cluster_token", "-", stdin="swarm-ci-cluster-token\n")
    try:
        sh("docker", "stack", "deploy", "-c", ROOT / "deploy" / "swarm" / "stack.yml", "-c",
           ROOT / "deploy" / "swarm" / "metrics.yml", STACK, env=env, timeout=300)
        wait_for(lambda: min(versions()) >= 40, "training to start across the services", timeout=300)
        st = status()
        assert st["job"]["mode"] == "sync" and len(st["membership"]["workers"]) == 2
        # Services share no /dev/shm (they may run on other nodes): every push crosses the overlay network on
        # the servers' byte links.
        assert {t for s in st["shards"] for t in s["transport"].values()} == {"tcp"}, st["shards"]

        killed = container_of("server-1")
        sh("docker", "kill", killed)  # no SIGTERM, no final checkpoint: Swarm's restart policy brings it back
        replaced = wait_for(lambda: (lambda c: c and c != killed and c)(container_of("server-1")),
                            "Swarm to start a new server-1 task", timeout=120)
        rollbacks = wait_for(lambda: status().get("rollbacks"), "the rollback to the checkpoint", timeout=180)
        assert rollbacks[0]["shard_id"] == 1 and rollbacks[0]["to_version"] % 20 == 0  # from the volume
        # The job went back below the end and (checked at the end) trained on to it: no race with a fast run.
        assert rollbacks[0]["to_version"] < STEPS
        assert sum(state.startswith("Running") for state in tasks("server-1")) == 1 and len(tasks("server-1")) == 2

        # DNS service discovery finds the replaced server's new address within its refresh interval.
        shards = wait_for(lambda: {r["metric"]["shard"] for r in prometheus("shardps_shard_version")} == {"0", "1"},
                          "Prometheus to scrape both shards", timeout=120)
        assert shards
        assert wait_for(lambda: prometheus("shardps_worker_steps_total"), "Prometheus to scrape the workers",
                        timeout=120)

        wait_for(lambda: all(s.startswith("Complete") for s in tasks("worker")) and len(tasks("worker")) == 2,
                 "both workers to finish", timeout=600, every=3)
        final = status()
        assert [s["version"] for s in final["shards"]] == [STEPS, STEPS]
        assert len(final["rollbacks"]) == 1 and container_of("server-1") == replaced
    except AssertionError:
        for service in ("coordinator", "server-1", "worker"):
            print(sh("docker", "service", "logs", "--tail", "30", f"{STACK}_{service}", check=False).stdout[-3000:])
        raise
    finally:
        sh("docker", "stack", "rm", STACK, check=False, timeout=120)
        wait_for(lambda: not sh("docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}"
                                ).stdout.strip(), "the stack's containers to go", timeout=120)
        sh("docker", "secret", "rm", "shardps_auth_token", "shardps_cluster_token", check=False)
        for volume in ("server-0-checkpoints", "server-1-checkpoints"):
            sh("docker", "volume", "rm", f"{STACK}_{volume}", check=False)
