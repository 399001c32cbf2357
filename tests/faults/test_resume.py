"""A run stopped at step 40 goes on from its checkpoints on a different number of servers, and ends
exactly where one uninterrupted run ends; its checkpoints also export without a cluster. A streaming
DiLoCo run's fragments resume from checkpoints of one moment of the run."""
import json
import subprocess
import sys

import pytest
import torch

from shardps.client.run import RunConfig, RunError, run
from shardps.client.sdk import load_model_file, train_single_process


@pytest.mark.slow
def test_resume_onto_three_servers_equals_one_uninterrupted_run(tmp_path):
    first = run(RunConfig(steps=40, eval_every=0, out=str(tmp_path / "a")))
    res = subprocess.run([sys.executable, "-m", "shardps", "export", "--from-checkpoint", str(tmp_path / "a"),
                          "--out", str(tmp_path / "ckpt.safetensors"), "--optimizer-state"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["version"] == 40  # the checkpoint the servers wrote when stopped
    exported, finished = load_model_file(tmp_path / "ckpt.safetensors"), load_model_file(first["model_file"])
    assert all(torch.equal(exported[k], finished[k]) for k in finished)
    assert set(torch.load(tmp_path / "ckpt.optim.pt")["state"][0]) == {"exp_avg", "exp_avg_sq", "step"}

    second = run(RunConfig(steps=80, servers=3, eval_every=0, resume=str(tmp_path / "a"), out=str(tmp_path / "b")))
    assert second["updates_per_shard"] == [80, 80, 80]
    steps = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in steps if r["kind"] == "step") == 40  # went on, did not start over
    single = train_single_process("digits", workers=2, steps=80)
    trained = load_model_file(second["model_file"])
    for name, p in single["model"].state_dict().items():
        assert (trained[name] - p).abs().max().item() < 1e-4, name

    with pytest.raises(RunError, match="ask for more --steps"):
        run(RunConfig(steps=40, resume=str(tmp_path / "a"), out=str(tmp_path / "c")))
    with pytest.raises(RunError, match="another model"):
        run(RunConfig(steps=80, workload="charlm", resume=str(tmp_path / "a"), out=str(tmp_path / "d")))


@pytest.mark.parametrize("versions, picked", [
    ({"f0": [0, 2], "f1": [0, 3]}, [2, 3]),  # the run's end: fragment 1 took a last, shorter round
    ({"f0": [0, 10, 20], "f1": [0, 10, 20]}, [20, 20]),  # every 10 versions: one moment
    ({"f0": [0, 10], "f1": [0, 10, 20]}, [10, 10]),  # a crash after fragment 1's 20th, before fragment 0's
    ({"f0": [10, 20], "f1": [0, 30]}, None),  # no moment in common
])
def test_a_streaming_resume_takes_every_fragments_checkpoint_of_one_moment(tmp_path, versions, picked):
    from shardps.client.resume import _fragment_versions
    from shardps.proto.errors import CheckpointError
    from shardps.server.checkpoint import CheckpointStore, Snapshot

    names = [f"default.{k}" for k in versions]
    for name, held in zip(names, versions.values()):
        for shard in (0, 1):
            for v in held:
                CheckpointStore(tmp_path / f"job-{name}" / f"shard-{shard}").write(
                    Snapshot("id", b"", shard, 4 * shard, 4 * shard + 4, v, {}, torch.zeros(4), {}))
    if picked is None:
        with pytest.raises(CheckpointError, match="no checkpoints of one moment"):
            _fragment_versions(tmp_path, names)
    else:
        assert _fragment_versions(tmp_path, names) == picked
