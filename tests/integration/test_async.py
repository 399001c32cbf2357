"""Async training with 2 worker processes converges and records plausible staleness."""
import json
import sys
from pathlib import Path

import pytest
import torch

from shardps import LocalCluster
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.gen import shardps_pb2_grpc as pb_grpc
from shardps.runtime.rpc import open_channel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from task import global_batch, loss_fn, make_model  # noqa: E402

STEPS = 60


def held_out_loss(params):
    model = make_model(0)
    model.load_state_dict(params)
    x, y = global_batch(10_000, 512)
    with torch.no_grad():
        return loss_fn(model, x, y).item()


@pytest.mark.slow
def test_async_workers_converge_and_record_staleness(run_workers):
    with LocalCluster(servers=2) as cluster:
        results = run_workers(cluster, 2, mode="async", optimizer="sgd", kwargs=json.dumps({"lr": 0.2, "momentum": 0.5}),
                              sizes="32,32", steps=STEPS)
        statuses = []
        for shard_id in range(2):
            with open_channel(cluster.server_address(shard_id)) as ch:
                statuses.append(pb_grpc.ShardServiceStub(ch).GetShardStatus(pb.GetShardStatusRequest(), timeout=10))
    start = held_out_loss(results[0]["initial"])
    end = held_out_loss(results[0]["final"])
    # A shard that ignored pushes, flipped the sign or applied only one worker's stream stays far above this.
    assert end < 0.25 * start, (start, end)
    for s in statuses:
        assert s.version == 2 * STEPS  # every push applied exactly once
        assert sum(s.staleness_counts.values()) == 2 * STEPS
        assert min(s.staleness_counts) >= 0 and max(s.staleness_counts) <= 2 * STEPS
        assert sorted(s.workers_seen) == [0, 1]
    # Interleaved workers see their peer's updates: some pushes are stale by >= 1.
    worker_staleness = [v for r in results for step in r["staleness"] for v in step]
    assert max(worker_staleness) >= 1 and min(worker_staleness) >= 0
