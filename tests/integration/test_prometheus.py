"""A real Prometheus server (Debian's package) scrapes a LocalCluster's coordinator and shard servers
and a worker process while they train; its HTTP API answers for the shard and worker series, and
every query of the Grafana dashboard evaluates. Prometheus runs on 127.0.0.1 from a generated
config and a temporary store, and is stopped by its PID."""
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from shardps import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is missing: apt-get install -y prometheus (.ci/run does)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def wait_for(predicate, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def prometheus(tmp_path):
    """Start prometheus with ``targets`` (job -> [host:port]); yields its API's query function."""
    procs = []

    def start(targets: dict[str, list[str]]):
        port = free_port()
        jobs = "\n".join(f"  - job_name: {job}\n    static_configs:\n      - targets: {json.dumps(addrs)}"
                         for job, addrs in targets.items())
        config = tmp_path / "prometheus.yml"
        config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}\n")
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=5).status == 200, "prometheus to be ready")

        def query(expr: str) -> list[dict]:
            answer = get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]

        query.targets = lambda: get(f"{base}/api/v1/targets")["data"]["activeTargets"]
        return query

    yield start
    for proc in procs:  # only the server this test started, by its PID
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def by_label(result: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def test_prometheus_scrapes_every_role_while_training_and_the_dashboard_queries_evaluate(tmp_path, prometheus):
    with LocalCluster(servers=2, metrics=True, checkpoint_every=50) as cluster:
        worker_port = free_port()
        worker = subprocess.Popen(
            [sys.executable, "-m", "shardps", "worker", "--cluster", cluster.address, "--steps", "100000",
             "--eval-every", "0", "--slowdown", "4", "--metrics-port", str(worker_port)],
            stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            roles = [cluster.metrics_address(n) for n in ("coordinator", "server-0", "server-1")]
            query = prometheus({"shardps": roles, "shardps-workers": [f"127.0.0.1:{worker_port}"]})
            wait_for(lambda: len(query.targets()) == 4 and all(t["health"] == "up" for t in query.targets()),
                     "every target to be scraped")
            first = wait_for(lambda: (lambda v: len(v) == 2 and min(v.values()) > 0 and v)(
                by_label(query("shardps_shard_version"), "shard")), "shard versions")
            assert set(first) == {"0", "1"}
            later = wait_for(lambda: (lambda v: min(v.values()) > max(first.values()) and v)(
                by_label(query("shardps_shard_version"), "shard")), "the versions to move while training runs")
            assert worker.poll() is None  # still training
            steps = by_label(query("shardps_worker_steps_total"), "job")
            assert steps["shardps-workers"] >= min(first.values())
            pushes = by_label(query('shardps_shard_pushes_total{outcome="received"}'), "shard")
            assert set(pushes) == {"0", "1"} and min(pushes.values()) >= min(first.values())
            phases = wait_for(lambda: by_label(query("sum by (phase) (rate(shardps_worker_step_seconds_count[5s]))"),
                                               "phase"), "step-time rates")
            assert set(phases) == {"compute", "push_pull"} and min(phases.values()) > 0
            assert by_label(query("shardps_workers"), "state")["member"] == 1
            assert min(later.values()) > 0

            dashboard = json.loads((ROOT / "deploy" / "grafana" / "shardps.json").read_text())
            empty = []
            for panel in dashboard["panels"]:
                for target in panel["targets"]:  # Grafana fills $__rate_interval in; PromQL must parse
                    if not query(target["expr"].replace("$__rate_interval", "10s")):
                        empty.append(f"{panel['title']}: {target['expr']}")
            # Families with no sample until something happens: no fault was injected, and the coordinator
            # may not have a heartbeat's counters yet. Every other query must return data.
            assert all("shardps_faults_injected" in e or "shardps_worker_faults" in e for e in empty), empty
        finally:
            worker.kill()
            worker.wait(timeout=30)
