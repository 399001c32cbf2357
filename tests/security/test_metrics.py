"""Every role serves Prometheus metrics, and their values move as training runs."""
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardps import LocalCluster
from shardps.worker.train import TrainConfig, train


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_roles_serve_the_named_metrics_and_they_move_as_training_runs():
    with LocalCluster(servers=2, metrics=True, checkpoint_every=5) as cluster:
        worker = f"127.0.0.1:{free_port()}"
        config = TrainConfig(cluster=cluster.address, steps=40, eval_every=0, slowdown=4.0,
                             metrics_port=int(worker.split(":")[1]))
        trainer = threading.Thread(target=train, args=(config,))
        trainer.start()
        deadline = time.monotonic() + 120
        while True:
            try:
                first = scrape(worker)
                if value(first, "shardps_worker_steps_total") >= 3:
                    break
            except (OSError, KeyError):
                pass
            assert time.monotonic() < deadline, "the worker never served metrics"
            time.sleep(0.1)
        shard_before = scrape(cluster.metrics_address("server-0"))
        time.sleep(1.0)
        later = scrape(worker)
        assert value(later, "shardps_worker_steps_total") > value(first, "shardps_worker_steps_total")
        assert value(later, "shardps_worker_step_seconds_count", phase="compute") >= 3
        assert value(later, "shardps_worker_samples_per_second") > 0
        trainer.join(timeout=120)
        shard = scrape(cluster.metrics_address("server-0"))
        coord = scrape(cluster.metrics_address("coordinator"))
    version = {"shard": "0", "job": "default"}
    assert value(shard, "shardps_shard_version", **version) == 40 > value(shard_before, "shardps_shard_version", **version)
    assert value(shard, "shardps_shard_pushes_total", shard="0", job="default", outcome="received") == 40
    assert value(shard, "shardps_shard_bytes_total", shard="0", job="default", direction="in") > 0
    assert value(shard, "shardps_shard_staleness_count", shard="0", job="default") == 40
    assert value(shard, "shardps_shard_checkpoints_total", shard="0", job="default") >= 8  # version 0, then every 5
    assert value(shard, "shardps_shard_apply_seconds_total", shard="0", job="default") > 0
    assert value(coord, "shardps_membership_epoch", job="default") == 1
    assert value(coord, "shardps_workers", job="default", state="member") == 1
    job = (("job", "default"),)
    assert ("shardps_rollbacks_total", job) in coord and ("shardps_lease_expiries_total", job) in coord
