"""DiLoCo on 2 shard servers x 2 worker processes: H = 1 with inner SGD(eta) and outer SGD(1) is today's
sync SGD(eta); H = 4 with inner AdamW and outer Nesterov SGD equals DiLoCo written out in one process."""
import json
import sys
from pathlib import Path

import pytest
import torch

from shardps import LocalCluster
from shardps.proto import quant

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from task import global_batch, loss_fn, make_model  # noqa: E402
from test_rpc_and_process_faults import wait_for_version  # noqa: E402

PLAIN_OUTER = {"outer_lr": 1.0, "outer_momentum": 0.0, "nesterov": False}


def diloco_reference(initial, sizes, steps, sync_every, inner_kwargs, outer_kwargs, wire_dtype=torch.float32,
                     inner_cls=torch.optim.AdamW, encode=None):
    """DiLoCo in one process: each worker's inner loop (AdamW by default) on its rows, from the same theta each round;
    the sample-weighted mean of the outer gradients (each as ``wire_dtype`` carries it, or as ``encode(rank, delta)``
    says the shards receive it); torch's SGD on the flat parameter vector."""
    encode = encode or (lambda rank, delta: delta.to(wire_dtype).float())
    theta = torch.nn.Parameter(torch.nn.utils.parameters_to_vector(_model(initial).parameters()).detach().clone())
    outer = torch.optim.SGD([theta], **outer_kwargs)
    workers = [_model(initial) for _ in sizes]
    inners = [inner_cls(m.parameters(), **inner_kwargs) for m in workers]
    for start in range(0, steps, sync_every):
        deltas, samples = [], []
        for rank, (model, inner) in enumerate(zip(workers, inners)):
            _load_flat(model, theta.detach())
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            for step in range(start, min(start + sync_every, steps)):
                x, y = global_batch(step, sum(sizes))
                inner.zero_grad()
                loss_fn(model, x[lo:hi], y[lo:hi]).backward()
                inner.step()
            delta = theta.detach() - torch.nn.utils.parameters_to_vector(model.parameters()).detach()
            deltas.append(encode(rank, delta))
            samples.append((min(start + sync_every, steps) - start) * (hi - lo))
        theta.grad = sum(d * (n / sum(samples)) for d, n in zip(deltas, samples))
        outer.step()
    final = _model(initial)
    _load_flat(final, theta.detach())
    return final.state_dict()


@torch.no_grad()
def _load_flat(model, vector):
    """Copy ``vector`` into the parameters (torch's vector_to_parameters would make them views of it)."""
    offset = 0
    for p in model.parameters():
        p.copy_(vector[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def _model(state):
    model = make_model(0)
    model.load_state_dict(state)
    return model


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.slow
def test_diloco_with_one_inner_sgd_step_and_plain_outer_sgd_is_sync_sgd(run_workers):
    sizes, steps, eta = "24,40", 12, 0.1
    with LocalCluster(servers=2) as cluster:
        diloco = run_workers(cluster, 2, script="diloco_worker.py", inner="sgd", inner_kwargs=json.dumps({"lr": eta}),
                             sync_every=1, outer_kwargs=json.dumps(PLAIN_OUTER), sizes=sizes, steps=steps, init_seed=7)
    with LocalCluster(servers=2) as cluster:
        plain = run_workers(cluster, 2, optimizer="sgd", kwargs=json.dumps({"lr": eta}), sizes=sizes, steps=steps,
                            init_seed=7)
    assert max_diff(diloco[0]["initial"], plain[0]["initial"]) == 0.0
    moved = max_diff(plain[0]["final"], plain[0]["initial"])
    assert moved > 1e-2  # the runs trained: equal finals say something
    for d, p in zip(diloco, plain):
        assert len(d["rounds"]) == steps
        assert max_diff(d["final"], p["final"]) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("wire_dtype, transport", [("float32", "auto"), ("bfloat16", "grpc")])
def test_two_workers_diloco_with_adamw_and_nesterov_equals_one_process_diloco(run_workers, wire_dtype, transport):
    sizes, steps, sync_every = [24, 40], 18, 4  # 4 rounds of 4 and a last one of 2 inner steps
    inner_kwargs, outer_kwargs = {"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.7, "momentum": 0.9, "nesterov": True}
    with LocalCluster(servers=2) as cluster:
        results = run_workers(cluster, 2, script="diloco_worker.py", inner="adamw",
                              inner_kwargs=json.dumps(inner_kwargs), sync_every=sync_every,
                              sizes=",".join(map(str, sizes)), steps=steps, wire_dtype=wire_dtype,
                              transport=transport)
    assert max_diff(results[0]["initial"], results[1]["initial"]) == 0.0
    expected = diloco_reference(results[0]["initial"], sizes, steps, sync_every, inner_kwargs, outer_kwargs,
                                getattr(torch, wire_dtype))
    assert max_diff(expected, results[0]["initial"]) > 1e-2
    for r in results:
        assert [round_["versions"] for round_ in r["rounds"]] == [[v, v] for v in range(1, 6)]
        assert max_diff(r["final"], expected) <= 1e-5
    if wire_dtype != "float32":  # the outer gradients did travel rounded: fp32 ones would end elsewhere
        exact = diloco_reference(results[0]["initial"], sizes, steps, sync_every, inner_kwargs, outer_kwargs)
        assert max_diff(results[0]["final"], exact) > 1e-5


def int8_with_error_feedback(ranges, feedback=True):
    """What the shards receive from a worker pushing int8 outer gradients: per shard, (delta + its residual)
    quantised in blocks (``proto/quant.py``); the rounding error is the worker's next residual."""
    residuals = {}

    def encode(rank, delta):
        acc = delta + residuals.get(rank, torch.zeros_like(delta))
        sent = torch.cat([quant.dequantize(*quant.quantize(acc[start:stop])) for start, stop in ranges])
        if feedback:
            residuals[rank] = acc - sent
        return sent
    return encode


@pytest.mark.slow
def test_two_workers_diloco_with_int8_outer_gradients_and_error_feedback_equals_one_process_diloco(run_workers):
    from shardps.client.sdk import shard_status

    sizes, steps, sync_every = [24, 40], 18, 4  # 5 outer steps
    inner_kwargs, outer_kwargs = {"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.7, "momentum": 0.9, "nesterov": True}
    with LocalCluster(servers=2) as cluster:
        results = run_workers(cluster, 2, script="diloco_worker.py", inner="adamw",
                              inner_kwargs=json.dumps(inner_kwargs), sync_every=sync_every,
                              sizes=",".join(map(str, sizes)), steps=steps, wire_dtype="int8")
        shards = [shard_status(a) for a in cluster.server_addresses.values()]
    ranges = results[0]["ranges"]
    run = (results[0]["initial"], sizes, steps, sync_every, inner_kwargs, outer_kwargs)
    expected = diloco_reference(*run, encode=int8_with_error_feedback(ranges))
    assert max_diff(expected, results[0]["initial"]) > 1e-2
    for r in results:
        assert max_diff(r["final"], expected) <= 1e-5
    # Both the rounding and the error feedback show: fp32 outer gradients, or int8 ones without the
    # residual, end elsewhere.
    assert max_diff(results[0]["final"], diloco_reference(*run)) > 1e-4
    assert max_diff(results[0]["final"], diloco_reference(*run, encode=int8_with_error_feedback(ranges, False))) > 1e-4
    for s in shards:  # int8 pushes go over gRPC (no shared memory) with a quarter of fp32's bytes
        numel = s.stop - s.start
        assert s.pushes_received == 2 * 5 and s.shm_bytes_in == 0
        per_push = (s.bytes_in - 4 * numel) / s.pushes_received  # less the initializer's fp32 upload
        assert per_push == numel + 4 * quant.blocks_for(numel)  # int8 values and one fp32 scale per block
        assert per_push / (4 * numel) < 0.26


def streaming_reference(initial, sizes, steps, sync_every, fragments, inner_kwargs, outer_kwargs):
    """Streaming DiLoCo in one process: the workers' inner AdamW steps in lockstep; fragment f (the given
    numbers of parameters, in order) has its outer step after inner step t when (t - f*H/F) % H == 0 and
    once more at the end if it has steps left: torch's Nesterov SGD of its own over the sample-weighted
    mean of the workers' fragment deltas, whose result every worker loads (their other fragments go on)."""
    workers = [_model(initial) for _ in sizes]
    inners = [torch.optim.AdamW(m.parameters(), **inner_kwargs) for m in workers]
    cuts = [sum(fragments[:k]) for k in range(len(fragments) + 1)]
    parts = [[list(m.parameters())[cuts[k]:cuts[k + 1]] for m in workers] for k in range(len(fragments))]
    thetas = [torch.nn.Parameter(torch.nn.utils.parameters_to_vector(part[0]).detach().clone()) for part in parts]
    outers = [torch.optim.SGD([theta], **outer_kwargs) for theta in thetas]
    last = [0] * len(fragments)

    def outer_step(k, t):
        deltas = [thetas[k].detach() - torch.nn.utils.parameters_to_vector(ps).detach() for ps in parts[k]]
        thetas[k].grad = sum(d * (n / sum(sizes)) for d, n in zip(deltas, sizes))  # equal steps: weights by rows
        outers[k].step()
        with torch.no_grad():
            for ps in parts[k]:
                offset = 0
                for p in ps:
                    p.copy_(thetas[k][offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
        last[k] = t

    for t in range(1, steps + 1):
        x, y = global_batch(t - 1, sum(sizes))
        for rank, (model, inner) in enumerate(zip(workers, inners)):
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            inner.zero_grad()
            loss_fn(model, x[lo:hi], y[lo:hi]).backward()
            inner.step()
        for k in range(len(fragments)):
            if (t - k * sync_every // len(fragments)) % sync_every == 0:
                outer_step(k, t)
    for k in range(len(fragments)):
        if last[k] < steps:
            outer_step(k, steps)
    return workers[0].state_dict()


@pytest.mark.slow
def test_two_workers_streaming_diloco_syncs_fragments_at_staggered_steps_as_one_process_does(run_workers):
    sizes, steps, sync_every = [24, 40], 18, 4  # fragment 0 syncs after steps 4, 8, 12, 16 (and 18), 1 after 2, 6, ..
    inner_kwargs, outer_kwargs = {"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.7, "momentum": 0.9, "nesterov": True}
    with LocalCluster(servers=2) as cluster:
        results = run_workers(cluster, 2, script="diloco_worker.py", inner="adamw",
                              inner_kwargs=json.dumps(inner_kwargs), sync_every=sync_every, fragments=2,
                              sizes=",".join(map(str, sizes)), steps=steps)
    fragments = results[0]["fragments"]
    assert fragments == [1, 3]  # the first layer's weight (320 elements); its bias and the second layer (164)
    for r in results:  # one fragment at a time: every 2 steps one job's shards (2 each) move on, in turn
        assert [round_["versions"] for round_ in r["rounds"]] == [
            [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 2, 2], [2, 2, 2, 2], [2, 2, 3, 3], [3, 3, 3, 3], [3, 3, 4, 4],
            [4, 4, 4, 4], [4, 4, 5, 5], [5, 5, 5, 5]]
    expected = streaming_reference(results[0]["initial"], sizes, steps, sync_every, fragments, inner_kwargs,
                                   outer_kwargs)
    assert max_diff(expected, results[0]["initial"]) > 1e-2
    for r in results:
        assert max_diff(r["final"], expected) <= 1e-5
    # Staggered syncs are not DiLoCo's whole-model ones: those end elsewhere.
    whole = diloco_reference(results[0]["initial"], sizes, steps, sync_every, inner_kwargs, outer_kwargs)
    assert max_diff(results[0]["final"], whole) > 1e-4


def replay_async(initial, pushes, ranges, outer_kwargs):
    """Each shard's outer SGD over its slice, one push at a time in the order of the versions its replies
    carried (an async shard applies every push on arrival, so version v is its v-th push)."""
    theta = torch.nn.utils.parameters_to_vector(_model(initial).parameters()).detach().clone()
    for k, (start, stop) in enumerate(ranges):
        piece = torch.nn.Parameter(theta[start:stop].clone())
        outer = torch.optim.SGD([piece], **outer_kwargs)
        ordered = sorted(pushes, key=lambda push: push["versions"][k])
        assert [push["versions"][k] for push in ordered] == list(range(1, len(pushes) + 1))  # each applied once
        for push in ordered:
            piece.grad = push["delta"][start:stop] * push["weight"]
            outer.step()
        theta[start:stop] = piece.detach()
    final = _model(initial)
    _load_flat(final, theta)
    return final.state_dict()


@pytest.mark.slow
def test_async_diloco_applies_each_outer_step_on_arrival_so_a_slow_worker_stalls_nobody(spawn_workers, tmp_path):
    from shardps.client.sdk import export_model, load_model_file

    steps, sync_every, size = 22, 4, 32  # 5 rounds of 4 and a last one of 2 inner steps (weighed 1/2)
    opts = dict(script="diloco_worker.py", mode="async", inner="adamw", inner_kwargs=json.dumps({"lr": 0.01}),
                sync_every=sync_every, sizes=f"{size},{size}", steps=steps)
    with LocalCluster(servers=2) as cluster:
        fast = spawn_workers(cluster, 1, **opts)
        slow = spawn_workers(cluster, 1, sleep=1.0, **opts)
        results = fast.wait() + slow.wait()
        shards = load_model_file(export_model(cluster.address, tmp_path / "final.safetensors")["model"])
    fast_rounds, slow_rounds = results[0]["rounds"], results[1]["rounds"]
    assert len(fast_rounds) == len(slow_rounds) == 6
    # The fast worker took all its outer steps while the slow one (>= 4 s a round) took at most two:
    # under sync steps they would alternate.
    assert fast_rounds[-1]["versions"][0] <= len(fast_rounds) + 2, [r["versions"] for r in fast_rounds]
    assert max(fast_rounds[-1]["versions"]) < max(slow_rounds[-1]["versions"]) == 12
    pushes = [dict(r, weight=r["samples"] / (sync_every * size)) for r in fast_rounds + slow_rounds]
    assert sorted(p["weight"] for p in pushes) == [0.5, 0.5] + [1.0] * 10
    expected = replay_async(results[0]["initial"], pushes, results[0]["ranges"],
                            {"lr": 0.7, "momentum": 0.9, "nesterov": True})
    assert max_diff(expected, results[0]["initial"]) > 1e-2
    assert max_diff(shards, expected) <= 1e-5


def replay_sync(initial, pushes, outer_kwargs):
    """Sync outer steps in one process: step v is the sample-weighted mean of the pushes answered with v."""
    theta = torch.nn.Parameter(torch.nn.utils.parameters_to_vector(_model(initial).parameters()).detach().clone())
    outer = torch.optim.SGD([theta], **outer_kwargs)
    versions = sorted({push["versions"][0] for push in pushes})
    assert versions == list(range(1, len(versions) + 1))
    for v in versions:
        step = [push for push in pushes if push["versions"] == [v, v]]
        total = sum(push["samples"] for push in step)
        theta.grad = sum(push["delta"] * (push["samples"] / total) for push in step)
        outer.step()
    final = _model(initial)
    _load_flat(final, theta.detach())
    return final.state_dict()


@pytest.mark.slow
def test_auto_sync_every_gives_a_slow_worker_fewer_inner_steps_per_round_weighed_by_its_samples(spawn_workers,
                                                                                                 tmp_path):
    from shardps.client.sdk import export_model, load_model_file

    opts = dict(script="diloco_worker.py", inner="adamw", inner_kwargs=json.dumps({"lr": 0.01}), sync_every="auto",
                sync_seconds=0.6, sizes="32,32", rounds=5)
    with LocalCluster(servers=2) as cluster:
        fast = spawn_workers(cluster, 1, sleep=0.05, **opts)
        slow = spawn_workers(cluster, 1, sleep=0.2, **opts)
        results = fast.wait() + slow.wait()
        shards = load_model_file(export_model(cluster.address, tmp_path / "final.safetensors")["model"])
    fast_rounds, slow_rounds = results[0]["rounds"], results[1]["rounds"]
    # Both ran rounds of about 0.6 s: the worker 4x slower per step took fewer steps in every round.
    assert len(fast_rounds) == len(slow_rounds) == 5
    assert max(r["steps"] for r in slow_rounds) < min(r["steps"] for r in fast_rounds), \
        ([r["steps"] for r in slow_rounds], [r["steps"] for r in fast_rounds])
    expected = replay_sync(results[0]["initial"], fast_rounds + slow_rounds,
                           {"lr": 0.7, "momentum": 0.9, "nesterov": True})
    assert max_diff(expected, results[0]["initial"]) > 1e-2
    assert max_diff(shards, expected) <= 1e-5


@pytest.mark.slow
def test_a_server_killed_mid_diloco_run_rolls_the_outer_steps_back_and_the_inner_steps_are_replayed(spawn_workers,
                                                                                                     tmp_path):
    import time

    from shardps.coordinator.client import CoordinatorClient

    # Inner SGD keeps no state, so replaying the undone rounds gives exactly the fault-free run.
    sizes, steps, sync_every, inner_kwargs = [24, 40], 40, 2, {"lr": 0.05}
    with LocalCluster(servers=2, checkpoint_every=4, checkpoint_dir=tmp_path / "ckpt") as cluster:
        workers = spawn_workers(cluster, 2, script="diloco_worker.py", inner="sgd", inner_kwargs=json.dumps(inner_kwargs),
                                sync_every=sync_every, sizes=",".join(map(str, sizes)), steps=steps, sleep=0.05)
        wait_for_version(cluster, 9)
        cluster.kill("server-1")
        time.sleep(1.0)  # workers keep retrying against the dead address
        cluster.restart("server-1")
        results = workers.wait()
        with CoordinatorClient(cluster.address) as coord:
            rollbacks = list(coord.status().rollbacks)
    assert len(rollbacks) == 1 and rollbacks[0].from_version > rollbacks[0].to_version
    assert all(r["rollbacks"] == 1 for r in results)
    assert all(r["rounds"][-1]["versions"] == [steps // sync_every] * 2 for r in results)
    expected = diloco_reference(results[0]["initial"], sizes, steps, sync_every, inner_kwargs,
                                {"lr": 0.7, "momentum": 0.9, "nesterov": True}, inner_cls=torch.optim.SGD)
    for r in results:
        assert max_diff(r["final"], expected) <= 1e-5


def _train_with_a_group_added_at(opt_step, inner, model, steps: int, add_at: int) -> None:
    """Inner SGD over the last layer only, the first layer added as a param group at ``add_at`` (what a
    fine-tuning callback unfreezing a backbone does), on the helpers' batches."""
    for step in range(steps):
        if step == add_at:
            inner.add_param_group({"params": list(model[0].parameters()), "lr": 0.05})
        x, y = global_batch(step, 32)
        inner.zero_grad()
        loss_fn(model, x, y).backward()
        opt_step()


@pytest.mark.slow
def test_a_param_group_added_to_the_inner_optimizer_mid_round_joins_the_outer_steps():
    """One worker, outer SGD(lr=1): DiLoCo is plain local training, so the run equals torch's, the added
    group's training included (a DiLoCo that left it out would pull it back to its frozen value)."""
    from shardps import DiLoCo

    steps, add_at = 10, 5  # syncs after steps 4 and 8 (and a last one): the group is added mid-round
    want = make_model(3)
    plain = torch.optim.SGD(list(want[2].parameters()), lr=0.1)
    _train_with_a_group_added_at(plain.step, plain, want, steps, add_at)
    model = make_model(3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    inner = torch.optim.SGD(list(model[2].parameters()), lr=0.1)
    with LocalCluster(servers=2) as cluster:
        opt = DiLoCo(model, inner, cluster.address, sync_every=4, **PLAIN_OUTER)
        try:
            _train_with_a_group_added_at(opt.step, inner, model, steps, add_at)
            opt.sync()
            assert opt.versions == [3, 3]
            final = opt.outer.model_state_dict()
        finally:
            opt.close()
    assert max_diff(want.state_dict(), start) > 1e-3 and (want[0].weight - start["0.weight"]).abs().max() > 1e-3
    assert max_diff(final, want.state_dict()) <= 1e-6
    assert max_diff(model.state_dict(), want.state_dict()) <= 1e-6
