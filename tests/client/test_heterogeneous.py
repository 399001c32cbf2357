"""Heterogeneous-hardware options end to end, through `shardps run` (real processes)."""
import json

import pytest

from shardps.client.run import RunConfig, run


@pytest.mark.slow
def test_backup_workers_close_steps_without_a_slowed_worker_and_never_apply_its_late_pushes(tmp_path):
    steps = 60
    summary = run(RunConfig(workers=3, backup_workers=1, slow_workers={0: 4.0}, steps=steps, eval_every=0,
                            out=str(tmp_path / "run")))
    assert summary["updates_per_shard"] == [steps, steps]
    assert summary["dropped_pushes"] > 0
    for shard in summary["shards"]:
        # Every closed step applied exactly (workers - backup) = 2 pushes; dropped ones were not applied.
        assert shard["pushes"] - shard["dropped"] - shard["duplicates"] == 2 * steps
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    late = [(d, lr) for r in records if r["kind"] == "step" for d, lr in zip(r["dropped"], r["applied_lr"]) if d]
    assert late and all(lr == 0 for _, lr in late)  # each shard said: not applied
    # The slowed worker skipped the steps it missed: fewer step lines than the others, same final step.
    per_rank = {}
    for r in records:
        if r["kind"] == "step":
            per_rank.setdefault(r["rank"], []).append(r["step"])
    counts = sorted(len(v) for v in per_rank.values())
    assert counts[0] < counts[-1] and max(max(v) for v in per_rank.values()) == steps - 1
    assert summary["held_out"]["accuracy"] > 0.8  # still trains


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_ssp_never_lets_a_worker_run_more_than_k_steps_ahead(tmp_path, k):
    summary = run(RunConfig(workers=3, mode="ssp", staleness=k, slow_workers={0: 4.0}, steps=30, eval_every=0,
                            out=str(tmp_path / "run")))
    assert summary["updates_per_shard"] == [30, 30]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gaps = []
    for rank in {r["rank"] for r in records if r["kind"] == "step"}:
        base = [0, 0]  # the versions a worker computed each step on: those its previous step returned
        for r in sorted((r for r in records if r["kind"] == "step" and r["rank"] == rank), key=lambda r: r["step"]):
            gaps.append(r["step"] - min(base))
            base = r["versions"]
    assert max(gaps) <= k  # from the workers' own records
    assert max(gaps) >= 1  # and the slack was used: the fast workers did run ahead
    assert all(s["max"] <= k for s in summary["staleness"])  # and from the shards'


@pytest.mark.slow
def test_balanced_batches_move_rows_to_the_faster_worker_and_leave_sync_training_unchanged(tmp_path):
    from shardps.client.sdk import load_model_file, train_single_process

    steps, every = 40, 5
    summary = run(RunConfig(workers=2, slow_workers={0: 4.0}, balance_every=every, steps=steps, eval_every=0,
                            out=str(tmp_path / "run")))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["kind"] == "start")
    by_step: dict[int, dict[int, dict]] = {}
    for r in records:
        if r["kind"] == "step":
            by_step.setdefault(r["step"], {})[r["rank"]] = r
    # Every step still trains on the whole global batch, split some way between the ranks.
    assert all(sum(r["samples"] for r in ranks.values()) == start["batch_size"] * 2 for ranks in by_step.values())
    assert {r["samples"] for r in by_step[0].values()} == {start["batch_size"]}  # equal until measured
    last = by_step[steps - 1]
    per_sample = {rank: r["compute_s"] / r["samples"] for rank, r in last.items()}
    slow = max(per_sample, key=per_sample.get)
    fast = 1 - slow
    assert last[fast]["samples"] >= 2 * last[slow]["samples"]  # 4x slower: about a quarter of the rows
    # Only who computes which rows changed: the model equals one process on the union batch.
    single = train_single_process("digits", workers=2, steps=steps)
    trained = load_model_file(summary["model_file"])
    for name, p in single["model"].state_dict().items():
        assert (trained[name] - p).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("args, words", [
    ({"workers": 2, "backup_workers": 2}, "--backup-workers must be in 0..1"),
    ({"mode": "async", "backup_workers": 1}, "needs --mode sync or ssp"),
    ({"staleness": 2}, "needs --mode ssp"),
    ({"staleness_lr": True}, "needs --mode async or ssp"),
    ({"balance_every": 5, "mode": "async"}, "needs --mode sync or ssp"),
    ({"slow_workers": {5: 2.0}}, "--slow-worker"),
    ({"wire_dtype": "int4"}, "--wire-dtype takes"),
    ({"wire_dtype": "int8", "topk_ratio": 0.1}, "int8 sends every element"),
])
def test_heterogeneous_options_are_checked_before_anything_starts(args, words):
    with pytest.raises(ValueError, match=words):
        RunConfig(**args)


@pytest.fixture(scope="module")
def fp32_digits(tmp_path_factory):
    return run(RunConfig(eval_every=0, transport="grpc", out=str(tmp_path_factory.mktemp("fp32") / "run")))


@pytest.mark.slow
@pytest.mark.parametrize("option", [{"wire_dtype": "bfloat16"}, {"wire_dtype": "float16"}, {"wire_dtype": "int8"},
                                    {"topk_ratio": 0.1}, {"topk_ratio": 0.1, "wire_dtype": "bfloat16"}], ids=str)
def test_compressed_wires_converge_on_digits_within_one_point_of_fp32(fp32_digits, option, tmp_path):
    # over gRPC, where the wire dtype decides the bytes (shared memory carries fp32 whatever the wire)
    summary = run(RunConfig(eval_every=0, transport="grpc", out=str(tmp_path / "run"), **option))
    assert abs(summary["held_out"]["accuracy"] - fp32_digits["held_out"]["accuracy"]) <= 0.01
    ratio = summary["bytes_in"] / fp32_digits["bytes_in"]
    expected = {"int8": 0.25}.get(option.get("wire_dtype"), 0.5)
    if "topk_ratio" in option:  # an int32 position and a value per element sent
        expected = 0.1 * (4 + (2 if "wire_dtype" in option else 4)) / 4
    assert ratio <= expected * 1.1 + 0.01  # the push really got smaller


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_mixed_precision_workers_converge_within_one_point_of_fp32(fp32_digits, amp, tmp_path):
    summary = run(RunConfig(eval_every=0, amp=amp, out=str(tmp_path / "run")))
    assert abs(summary["held_out"]["accuracy"] - fp32_digits["held_out"]["accuracy"]) <= 0.01
