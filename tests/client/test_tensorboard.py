"""`shardps run` and the worker loop write TensorBoard event files beside metrics.jsonl: per-worker
scalars (loss, samples/s, staleness, held-out metric), faults as text events; read back with
TensorBoard's own EventAccumulator."""
import json

import pytest

from shardps.client.run import RunConfig, run

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard is not installed: pip install 'shardps[tb]'")

STEPS = 40
# From step 10, for a second, half the push replies are lost (after the shard applied the push): the
# workers retry, which they count, and the run's timeline records the fault and its end.
SCENARIO = """name = "lost replies"
[[fault]]
at_step = 10
action = "rpc"
target = "servers"
kind = "abort"
method = "Push"
status = "UNAVAILABLE"
after = true
probability = 0.5
for_s = 1
"""


def load(path):
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0,
                                                                       event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def text_events(acc, tag):
    from tensorboard.util import tensor_util

    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(f"{tag}/text_summary")]


@pytest.mark.slow
def test_shardps_run_writes_tensorboard_events_per_worker_and_the_faults_as_text(tmp_path):
    scenario = tmp_path / "lost-replies.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "run"
    summary = run(RunConfig(steps=STEPS, eval_every=20, out=str(out), scenario=str(scenario)))
    assert summary["steps"] == STEPS and not any("TensorBoard" in n for n in summary["notes"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    workers = {name: load(out / "tensorboard" / name) for name in ("worker-0", "worker-1")}
    by_id = {w: [round(r["loss"], 5) for r in sorted((r for r in records if r["kind"] == "step"
                                                        and r["worker_id"] == w), key=lambda r: r["step"])]
             for w in {r["worker_id"] for r in records if r["kind"] == "step"}}
    matched = []
    for name, acc in workers.items():
        tags = acc.Tags()["scalars"]
        assert {"train/loss", "train/samples_per_s", "time/compute_s", "time/push_pull_s", "staleness/mean",
                "staleness/max"} <= set(tags), (name, tags)
        losses = acc.Scalars("train/loss")
        assert [e.step for e in losses] == list(range(STEPS))
        # the JSONL's numbers, for whichever worker id this process got (ids go by registration order)
        matched += [w for w, mine in by_id.items() if [round(e.value, 5) for e in losses] == mine]
        assert all(e.value == 0 for e in acc.Scalars("staleness/max"))  # sync
    assert sorted(matched) == sorted(by_id)  # each process's events are one worker's, each worker once
    rank0 = [acc for acc in workers.values() if "held_out/accuracy" in acc.Tags()["scalars"]]
    assert len(rank0) == 1  # rank 0 evaluates
    held_out = rank0[0].Scalars("held_out/accuracy")
    assert [e.step for e in held_out] == [19, 39] and held_out[-1].value > 0.5
    retried = [text for acc in workers.values() for _, text in text_events(acc, "faults")]
    assert retried and all(text.startswith("retries +") for text in retried)

    runs = load(out / "tensorboard" / "run")
    assert runs.Scalars("final_held_out/accuracy")[0].value == pytest.approx(summary["held_out"]["accuracy"])
    events = text_events(runs, "faults")
    assert [text.split()[0] for _, text in events] == ["rpc", "unrpc"]
    step, text = events[0]
    # the fault fired at the first step the run's poll saw at or past step 10, the step the report records
    report = json.loads((out / "report.json").read_text())
    assert text.startswith("rpc servers at ") and ": ok" in text and step >= 10
    assert step == next(e["step"] for e in report["timeline"] if e["action"] == "rpc")
