"""docker-compose for real: build the image offline (a debootstrap-made base and a wheelhouse, since
no registry can be reached), bring the stack up, train `digits` across containers, read
`shardps status` from the coordinator's container, then kill and restart a server container, pause
one, cut one off the network, and check the job survives all of it. Tears down everything it
started, the Docker engine included. Runs after the rest of the suite (scripts/test.sh)."""
import json
import os
import sys
import time

import pytest

from dockerenv import ROOT, sh, wait_for

STEPS = 15000  # digits steps through shared memory take milliseconds: long enough for every fault to land mid-run

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1200)]


def test_a_compose_cluster_trains_across_containers_and_survives_container_faults(image):
    project = f"shardpsci{os.getpid()}"
    env = {**os.environ, "SHARDPS_IMAGE": image, "SHARDPS_STEPS": str(STEPS), "SHARDPS_SLOWDOWN": "3",
           "SHARDPS_AUTH_TOKEN": "ci-token", "SHARDPS_CLUSTER_TOKEN": "ci-cluster-token",
           "SHARDPS_CHECKPOINT_EVERY": "20", "SHARDPS_EVAL_EVERY": "0"}
    compose = ["docker-compose", "-p", project, "-f", ROOT / "docker-compose.yml"]
    chaos = [sys.executable, "-m", "shardps", "chaos"]

    def status() -> dict:
        res = sh(*compose, "exec", "-T", "coordinator", "shardps", "status", "--cluster", "coordinator:7070", "--json",
                 env=env, timeout=60)
        return json.loads(res.stdout)

    def polled() -> dict:
        try:
            return status()
        except AssertionError:  # the coordinator not reachable yet (start-up, a restart): ask again
            return {}

    def versions() -> list[int]:
        return [s.get("version", -1) for s in polled().get("shards", [])] or [-1]

    try:
        sh(*compose, "up", "-d", "--scale", "worker=2", env=env, timeout=300)
        wait_for(lambda: min(versions()) >= 40, "training to start")
        job_id = status()["job_id"]
        # The servers and workers share the compose file's /dev/shm volume: pushes skip the network.
        assert {t for s in status()["shards"] for t in s["transport"].values()} == {"shm"}, status()["shards"]
        for action in ("kill", "restart"):  # the coordinator resumes the same job from its state volume
            sh(*chaos, action, "coordinator", "--compose", project)
        wait_for(lambda: polled().get("coordinator_generation") == 2, "the coordinator to come back")
        assert status()["job_id"] == job_id
        for action in ("kill", "restart"):  # the server restores its checkpoint; the job rolls back
            sh(*chaos, action, "server-1", "--compose", project)
        wait_for(lambda: polled().get("rollbacks"), "the rollback")
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
