"""Static checks of what deploys shardps: the Dockerfile, the compose file and the Kubernetes
manifests, against the code (env variables the CLI reads, ports, probes). The compose file is also
checked by docker-compose's own `config` when the tool is installed."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shardps.client.local import GLIBC_TUNABLES

ROOT = Path(__file__).resolve().parents[2]


def env_vars_the_cli_reads() -> set[str]:
    """Every command's option variables (typer's envvar, from proto/defaults.py), plus what the
    CLI and runtime/security.py read themselves (the token files, the TLS settings)."""
    import typer.main

    from shardps.client.cli import app

    def options(command):
        for sub in getattr(command, "commands", {}).values():
            yield from options(sub)
        yield from (p for p in getattr(command, "params", []) if p.param_type_name == "option")

    names = {o.envvar for o in options(typer.main.get_command(app)) if isinstance(o.envvar, str)}
    text = (ROOT / "client" / "cli.py").read_text() + (ROOT / "runtime" / "security.py").read_text()
    return names | set(re.findall(r"SHARDPS_[A-Z_]+", text))


def test_the_dockerfile_builds_from_a_base_argument_sets_the_malloc_tunables_and_probes_health():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M) and re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert f"GLIBC_TUNABLES={GLIBC_TUNABLES}" in text  # the same settings LocalCluster uses
    assert 'CMD shardps probe "127.0.0.1:${SHARDPS_PORT:-7070}"' in text
    for folder in re.findall(r"^COPY (\w+)/ /src/shardps/", text, re.M):
        assert (ROOT / folder / "__init__.py").exists()
    for folder in ("proto", "runtime", "server", "coordinator", "worker", "client"):
        assert f"COPY {folder}/ /src/shardps/{folder}/" in text  # every part of the package goes in


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_compose_cluster_is_wired_as_the_code_expects(compose):
    services = compose["services"]
    known = env_vars_the_cli_reads()
    for name, svc in services.items():
        for var in svc.get("environment", {}):
            assert var in known, f"{name} sets {var}, which no shardps command reads"
    assert [svc["command"] for svc in services.values() if "profiles" not in svc] == [
        ["coordinator"], ["server"], ["server"], ["worker"]]  # the default stack needs no GPU and no registry
    for shard in (0, 1):
        svc = services[f"server-{shard}"]
        env = svc["environment"]
        assert env["SHARDPS_SHARD_ID"] == str(shard) and env["SHARDPS_ADVERTISE"] == f"server-{shard}:7071"
        assert env["SHARDPS_COORDINATOR"] == "coordinator:7070" and env["SHARDPS_CHECKPOINT_DIR"] == "/checkpoints"
        assert any(v.endswith(":/checkpoints") for v in svc["volumes"])  # checkpoints survive the container
        assert svc["healthcheck"]["test"] == ["CMD", "shardps", "probe", "127.0.0.1:7071"]
        assert svc["depends_on"]["coordinator"]["condition"] == "service_healthy"
        assert svc["init"] is True  # SIGTERM reaches the server, which checkpoints
    assert services["coordinator"]["healthcheck"]["test"] == ["CMD", "shardps", "probe", "127.0.0.1:7070"]
    assert {k: v["condition"] for k, v in services["worker"]["depends_on"].items()} == {
        "server-0": "service_healthy", "server-1": "service_healthy"}
    assert "container_name" not in services["worker"]  # so --scale worker=N works
    gpu = services["worker-gpu"]
    assert set(gpu["profiles"]) == {"gpu", "hetero"} and gpu["environment"]["SHARDPS_DEVICE"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    example = (ROOT / "deploy" / "compose.env.example").read_text()
    for var in re.findall(r"^#? ?(SHARDPS_[A-Z_]+)=", example, re.M):
        assert var in known or var in ("SHARDPS_IMAGE",), var


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose is not installed")
def test_docker_compose_accepts_the_file_with_and_without_profiles():
    for profile in ("", "gpu", "hetero", "metrics"):
        env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "COMPOSE_PROFILES": profile}
        res = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert res.returncode == 0, (profile, res.stderr)


@pytest.fixture(scope="module")
def manifests():
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "shardps.yaml").read_text()) if d]


def containers(doc):
    spec = doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "StatefulSet", "Job") else None
    return spec["containers"] if spec else []


def test_the_kubernetes_manifests_hold_together(manifests):
    by_kind = {}
    for doc in manifests:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), doc.get("kind")
        by_kind.setdefault(doc["kind"], []).append(doc)
    known = env_vars_the_cli_reads()
    for doc in manifests:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            selector = doc["spec"].get("selector", {}).get("matchLabels", labels)
            assert selector.items() <= labels.items(), f"{doc['metadata']['name']}: selector does not match its pods"
        for c in containers(doc):
            ports = {p["containerPort"] for p in c.get("ports", [])}
            for var in c.get("env", []):
                assert var["name"] in known or not var["name"].startswith("SHARDPS_"), var["name"]
            port_env = next((int(v["value"]) for v in c.get("env", []) if v["name"] == "SHARDPS_PORT"), None)
            if port_env is not None:  # serving roles: probed on the port they serve
                assert port_env in ports
                for probe in ("readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"]["port"] == port_env
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    sts = by_kind["StatefulSet"][0]
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"  # stable per-pod names: shardps-server-K
    assert headless["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    server_args = " ".join(containers(sts)[0]["args"])
    assert '--shard-id "${HOSTNAME##*-}"' in server_args  # the pod ordinal is the shard id
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in containers(sts)[0]["volumeMounts"]}
    replicas = sts["spec"]["replicas"]
    coordinator = containers(by_kind["Deployment"][0])[0]
    assert {v["name"]: v.get("value") for v in coordinator["env"]}["SHARDPS_NUM_SERVERS"] == str(replicas)
    cluster = {v["name"]: v.get("value") for v in containers(by_kind["Job"][0])[0]["env"]}["SHARDPS_CLUSTER"]
    assert cluster.split(":")[0] in services
