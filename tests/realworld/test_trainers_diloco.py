"""Lightning and the HF Trainer in DiLoCo mode (``ShardpsStrategy(mode="diloco", ...)``,
``ShardpsTrainer(sharded_kwargs={"mode": "diloco", ...})``) as their users run them: ``shardps launch
--nproc 2`` (2 shard servers, 2 worker processes), H = 4 and outer SGD(lr=1), against the same DiLoCo in
one process (``trainers_diloco.py``): each worker's own optimizer, schedule and clipping, the outer step
written out in torch."""
from pathlib import Path

import pytest
import torch

from test_patterns import close
from test_trainers import assert_each_sample_once_per_epoch, files_under, fit, launch, load, reference

pytest.importorskip("lightning")
TOL = 1e-5


@pytest.fixture(scope="module")
def lightning_fit(tmp_path_factory):
    return fit(tmp_path_factory, "lightning", "--diloco")


@pytest.mark.slow
def test_lightning_diloco_with_h4_and_local_clipping_equals_diloco_written_out_in_one_process(lightning_fit):
    _, workers, want = lightning_fit
    assert max(max(n) for n in want["norms"]) > 1.0  # gradient_clip_val=1.0 did clip
    for w in workers:
        r = w["rank"]
        assert w["world_size"] == 2 and w["outer_steps"] == [4]  # 16 inner steps, an outer step every 4
        close(w["model"], want["model"], TOL, f"rank {r}: ")
        # clipping is torch's, of this worker's own gradient: the norms are its own, step by step
        assert w["norms"] == pytest.approx(want["norms"][r], abs=TOL)
        for key in ("train_loss", "val_loss"):  # sync_dist: the mean over both workers
            assert w["metrics"][key] == pytest.approx(want["metrics"][key], abs=TOL)


@pytest.mark.slow
def test_lightning_diloco_workers_see_every_sample_once_per_epoch_between_them(lightning_fit):
    _, (a, b), want = lightning_fit
    assert_each_sample_once_per_epoch(a, b, 256)
    for w in (a, b):  # in the order rank r's DistributedSampler gives them
        assert w["seen"] == want["seen"][w["rank"]]


@pytest.mark.slow
def test_lightning_diloco_checkpoint_holds_the_outer_state_and_every_workers_own_inner_state(lightning_fit):
    _, workers, _ = lightning_fit
    by_rank = {w["rank"]: Path(w["root"]) for w in workers}
    written = files_under(by_rank[0])
    assert "metrics.csv" in [p.name for p in written] and files_under(by_rank[1]) == []
    path = next(p for p in written if p.suffix == ".ckpt")
    ckpt = torch.load(path, weights_only=False)
    # beside it, rank 1's own inner optimizer state (its moments are its own, not rank 0's)
    own = torch.load(f"{path}.rank1.inner.pt", weights_only=True)["optimizer_states"][0]
    assert own["state"][0]["exp_avg"].shape == ckpt["optimizer_states"][0]["state"][0]["exp_avg"].shape
    assert not torch.equal(own["state"][0]["exp_avg"], ckpt["optimizer_states"][0]["state"][0]["exp_avg"])
    assert [p.name for p in written if ".inner." in p.name] == [f"{path.name}.rank1.inner.pt"]  # the old one went
    outer = ckpt["shardps_diloco"]["outer"][0]["fragments"][0]
    assert outer["param_groups"][0]["lr"] == 1.0 and outer["param_groups"][0]["momentum"] == 0.0
    inner = ckpt["optimizer_states"][0]  # the user's AdamW, with its two groups and its state
    assert [g["weight_decay"] for g in inner["param_groups"]] == [0.05, 0.0] and len(inner["state"]) == 6


@pytest.mark.slow
def test_lightning_diloco_resumed_from_a_checkpoint_starts_from_its_model_and_goes_on_as_one_process(lightning_fit):
    out, workers, _ = lightning_fit
    root = Path(next(w["root"] for w in workers if w["rank"] == 0))
    path = next(p for p in files_under(root) if p.suffix == ".ckpt")  # after epoch 2 of 3
    launch(out, "lightning", str(out), "--diloco", "--epochs", "3", "--resume", str(path), "--tag", "resumed",
           logs="logs-resumed")
    # Every worker resumes with its own inner optimizer state: the run goes on as the uninterrupted one.
    reference(out, "lightning", str(out), "--diloco", "--epochs", "3", "--tag", "whole")
    saved = {k.removeprefix("net."): v for k, v in torch.load(path, weights_only=False)["state_dict"].items()
             if k.startswith("net.")}  # (the backbone's keys are the same tensors under a second name)
    want = load(out, "lightning-whole-ref")
    for r in (0, 1):
        resumed = load(out, f"lightning-resumed-rank{r}")
        close(resumed["start"], saved, 0.0, f"rank {r} start: ")
        close(resumed["model"], want["model"], TOL, f"rank {r}: ")


@pytest.fixture(scope="module")
def hf_fit(tmp_path_factory):
    pytest.importorskip("accelerate")
    return fit(tmp_path_factory, "hf", "--diloco")


@pytest.mark.slow
def test_hf_trainer_diloco_with_h4_accumulation_and_a_warmup_schedule_equals_diloco_in_one_process(hf_fit):
    _, workers, want = hf_fit
    for w in workers:
        r = w["rank"]
        assert w["world_size"] == 2 and w["outer_steps"] == 2  # 8 inner steps
        close(w["model"], want["model"], TOL, f"rank {r}: ")
        # per step: the loss (mean over the workers), this worker's own pre-clip gradient norm, the lr
        assert len(w["losses"]) == len(want["losses"][r]) == 8
        for got, ref in zip(w["losses"], want["losses"][r]):
            assert got[0] == ref[0] and got[1:] == pytest.approx(ref[1:], abs=TOL), f"step {ref[0]}"
    assert max(norm for _, _, norm, _ in want["losses"][0]) > 1.0  # max_grad_norm=1.0 did clip


@pytest.mark.slow
def test_hf_diloco_workers_see_every_sample_once_per_epoch_between_them(hf_fit):
    _, (a, b), want = hf_fit
    assert_each_sample_once_per_epoch(a, b, 64)
    for w in (a, b):
        assert w["seen"] == want["seen"][w["rank"]]


@pytest.mark.slow
def test_rank_zero_writes_hf_diloco_checkpoints_with_the_outer_state_and_every_workers_inner_state(hf_fit):
    _, workers, _ = hf_fit
    zero, other = sorted(workers, key=lambda w: w["rank"])
    assert [Path(p).name for p in zero["saves"]] == ["checkpoint-4", "checkpoint-8", "final"] and other["saves"] == []
    written = {p.relative_to(zero["root"]).as_posix() for p in files_under(Path(zero["root"]))}
    for step in (4, 8):
        assert {f"checkpoint-{step}/{n}" for n in ("model.safetensors", "optimizer.pt", "outer_optimizer.pt",
                                                     "scheduler.pt")} <= written
    assert {p.name for p in files_under(Path(other["root"]))} == {"rng_state_1.pth"}
    outer = torch.load(Path(zero["root"]) / "checkpoint-4" / "outer_optimizer.pt", weights_only=True)
    assert outer["fragments"][0]["param_groups"][0]["lr"] == 1.0
    # rank 1's own inner AdamW state, in the folder a resume names (its moments are its own, not rank 0's)
    inner = [torch.load(Path(zero["root"]) / "checkpoint-4" / name, weights_only=True)["state"][0]["exp_avg"]
             for name in ("optimizer.pt", "inner_optimizer_rank1.pt")]
    assert inner[0].shape == inner[1].shape and not torch.equal(*inner)


@pytest.mark.slow
def test_hf_diloco_resumed_from_a_mid_run_checkpoint_goes_on_as_one_process_does(hf_fit):
    out, workers, uninterrupted = hf_fit
    zero = next(w for w in workers if w["rank"] == 0)
    launch(out, "hf", str(out), "--diloco", "--resume", str(Path(zero["root"]) / "checkpoint-4"), "--tag", "resumed",
           logs="logs-resumed")
    for r in (0, 1):  # every worker resumed with its own inner AdamW state: the run went on as if uninterrupted
        resumed = load(out, f"hf-resumed-rank{r}")
        close(resumed["model"], uninterrupted["model"], TOL, f"rank {r}: ")
        assert resumed["loads"] == [0]  # the outer state (SGD without momentum: none per parameter), loaded once


@pytest.mark.slow
def test_lightning_streaming_diloco_in_two_fragments_equals_streaming_diloco_written_out_in_one_process(
        tmp_path_factory):
    _, workers, want = fit(tmp_path_factory, "lightning", "--diloco", "--fragments", "2")
    for w in workers:
        r = w["rank"]
        # 16 inner steps, H = 4: fragment 0 syncs after 4, 8, 12, 16; fragment 1 after 2, 6, 10, 14 and where
        # each epoch's checkpoint closes its round (8, 16)
        assert w["fragment_steps"] == [[4, 6]]
        close(w["model"], want["model"], TOL, f"rank {r}: ")
        assert w["norms"] == pytest.approx(want["norms"][r], abs=TOL)
        assert w["metrics"]["train_loss"] == pytest.approx(want["metrics"]["train_loss"], abs=TOL)


@pytest.mark.slow
def test_hf_diloco_async_applies_each_workers_rounds_once_and_the_last_pusher_of_a_shard_holds_its_values(tmp_path):
    """Async outer steps apply in arrival order, which no one-process run can know; what must hold: every
    sample once per epoch, the shards' outer steps are the workers' rounds (each applied once), and a
    shard's final values are what its last push's reply gave that worker."""
    pytest.importorskip("accelerate")
    from shardps.client.resume import load_job_checkpoint
    from shardps.proto.plan import plan_shards

    launch(tmp_path, "hf", str(tmp_path), "--diloco", "--diloco-mode", "diloco-async", "--tag", "async")
    a, b = (load(tmp_path, f"hf-async-rank{r}") for r in (0, 1))
    assert_each_sample_once_per_epoch(a, b, 64)
    assert len(a["losses"]) == len(b["losses"]) == 8  # 8 inner steps each, rounds of 4: 2 outer steps each
    shards = load_job_checkpoint(tmp_path / "logs" / "cluster", "hf-async")  # written when the cluster stopped
    assert shards.version == 4
    entries = sorted(shards.job.layout.params, key=lambda e: e.offset)
    for shard in plan_shards(shards.job.layout.numel, 2):
        # the workers log every step together, so their last pushes are each shard's 3rd and 4th
        assert sorted(w["versions"][shard.shard_id] for w in (a, b)) == [3, 4]
        last = next(w for w in (a, b) if w["versions"][shard.shard_id] == 4)
        flat = torch.cat([last["model"][e.name].reshape(-1) for e in entries])
        assert torch.equal(flat[shard.start:shard.stop], shards.param[shard.start:shard.stop])
    # async: the first to finish never saw the last push (a worker's model is no copy of the other's)
    assert any(not torch.equal(a["model"][k], v) for k, v in b["model"].items())


def test_diloco_options_without_diloco_mode_are_refused_before_joining():
    from shardps.worker.convert import for_trainer

    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="add mode='diloco'"):
        for_trainer(torch.optim.SGD(model.parameters(), lr=0.1), model, cluster="127.0.0.1:1", sync_every=4)


def test_lightning_diloco_refuses_two_optimizers_before_joining(tmp_path):
    import lightning as L

    from shardps.worker.lightning import ShardpsStrategy

    class TwoOptimizers(L.LightningModule):  # a GAN's shape: DiLoCo syncs the whole model after one optimizer
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def training_step(self, batch, _):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    strategy = ShardpsStrategy(cluster="127.0.0.1:1", mode="diloco", sync_every=4, min_workers=1)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="returned 2 optimizers; DiLoCo mode"):
        trainer.fit(TwoOptimizers(), loader)
    assert strategy.sharded == [] and strategy.diloco == []


@pytest.mark.slow
def test_hf_diloco_resumed_with_outer_nesterov_momentum_restores_the_momentum_on_the_shards(tmp_path):
    """The outer SGD's momentum buffers are the shards' state: the checkpoint carries them
    (outer_optimizer.pt) and the resumed run, on a fresh cluster, goes on with them."""
    run = ("hf", str(tmp_path), "--diloco", "--outer-momentum", "0.9")
    launch(tmp_path, *run, "--tag", "momentum")
    zero = next(r for r in (load(tmp_path, f"hf-momentum-rank{k}") for k in (0, 1)) if r["rank"] == 0)
    saved = torch.load(Path(zero["root"]) / "checkpoint-4" / "outer_optimizer.pt", weights_only=True)
    buffers = [s["momentum_buffer"] for s in saved["fragments"][0]["state"].values()]
    assert buffers and max(float(b.abs().max()) for b in buffers) > 0  # one outer step behind it
    launch(tmp_path, *run, "--resume", str(Path(zero["root"]) / "checkpoint-4"), "--tag", "momentum-resumed",
           logs="logs-resumed")
    want = zero  # the uninterrupted run (every worker ends with the job's model)
    for r in (0, 1):
        resumed = load(tmp_path, f"hf-momentum-resumed-rank{r}")
        close(resumed["model"], want["model"], TOL, f"rank {r}: ")
        assert resumed["loads"] == [len(buffers)]
