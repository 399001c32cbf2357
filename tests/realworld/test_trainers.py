"""Lightning and the HF Trainer on shardps as their users run them: ``shardps launch --nproc 2``
(an embedded cluster of 2 shard servers, 2 worker processes) against the same trainer in one
process on the union batch (``trainers.py``), with clipping, a per-step schedule and sample data
from scikit-learn's digits."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_patterns import close

pytest.importorskip("lightning")
SCRIPT = Path(__file__).resolve().parent / "trainers.py"
TOL = 1e-5


def launch(out: Path, *args: str, logs: str = "logs", timeout: float = 400) -> None:
    cmd = [sys.executable, "-m", "shardps", "launch", "--nproc", "2", "--log-dir", str(out / logs), str(SCRIPT),
           *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"shardps launch exited {run.returncode}:\n{(run.stdout + run.stderr)[-6000:]}"


def reference(out: Path, *args: str, timeout: float = 300) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), *args, "--reference"], capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"reference exited {run.returncode}:\n{(run.stdout + run.stderr)[-6000:]}"


def load(out: Path, name: str):
    return torch.load(out / f"{name}.pt", weights_only=False)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def fit(tmp_path_factory, trainer: str, *flags: str):
    """``trainer`` run by 2 workers under ``shardps launch`` and by one process on the union batch, both
    with ``flags`` (e.g. ``--diloco``): (the output folder, each rank's results, the one process's)."""
    out = tmp_path_factory.mktemp(trainer)
    launch(out, trainer, str(out), *flags)
    reference(out, trainer, str(out), *flags)
    return out, [load(out, f"{trainer}-rank{r}") for r in (0, 1)], load(out, f"{trainer}-ref")


@pytest.fixture(scope="module")
def lightning_fit(tmp_path_factory):
    return fit(tmp_path_factory, "lightning")


@pytest.mark.slow
def test_lightning_with_clipping_and_a_per_step_schedule_equals_one_process_on_the_union_batch(lightning_fit):
    _, workers, want = lightning_fit
    assert max(want["norms"]) > 1.0  # gradient_clip_val=1.0 did clip
    for w in workers:
        assert w["world_size"] == 2
        close(w["model"], want["model"], TOL, f"rank {w['rank']}: ")
        # self.log(sync_dist=True): every rank logs the mean over both workers, as one process does
        for key in ("train_loss", "val_loss"):
            assert w["metrics"][key] == pytest.approx(want["metrics"][key], abs=TOL)


@pytest.mark.slow
def test_lightning_backbone_finetuning_adds_the_backbone_mid_run_and_equals_one_process(tmp_path):
    args = ("lightning", str(tmp_path), "--finetune", "--epochs", "3", "--tag", "ft")
    launch(tmp_path, *args)
    reference(tmp_path, *args)
    want = load(tmp_path, "lightning-ft-ref")
    from trainers import mlp

    start = mlp().state_dict()
    assert (want["model"]["0.weight"] - start["0.weight"]).abs().max() > 1e-3  # the backbone was added and trained
    for r in (0, 1):
        close(load(tmp_path, f"lightning-ft-rank{r}")["model"], want["model"], TOL, f"rank {r}: ")


def assert_each_sample_once_per_epoch(a: dict, b: dict, samples: int, epochs: int = 2) -> None:
    """Two workers' sample indices, epoch by epoch: disjoint, and together every sample once."""
    per_epoch = len(a["seen"]) // epochs
    for epoch in range(epochs):
        mine = [set(w["seen"][epoch * per_epoch:(epoch + 1) * per_epoch]) for w in (a, b)]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(samples)), f"epoch {epoch}"


@pytest.mark.slow
def test_lightning_workers_see_every_sample_once_per_epoch_between_them(lightning_fit):
    _, (a, b), _ = lightning_fit
    assert_each_sample_once_per_epoch(a, b, 256)


@pytest.mark.slow
def test_only_rank_zero_writes_lightning_logs_and_checkpoints(lightning_fit):
    _, workers, _ = lightning_fit
    by_rank = {w["rank"]: Path(w["root"]) for w in workers}
    written = [p.name for p in files_under(by_rank[0])]
    assert "metrics.csv" in written and any(n.endswith(".ckpt") for n in written)
    assert files_under(by_rank[1]) == []


@pytest.mark.slow
def test_lightning_resumed_from_a_checkpoint_goes_on_as_the_uninterrupted_run(lightning_fit):
    out, workers, _ = lightning_fit
    root = Path(next(w["root"] for w in workers if w["rank"] == 0))
    ckpt = next(p for p in files_under(root) if p.suffix == ".ckpt")  # after epoch 2 of 3
    launch(out, "lightning", str(out), "--epochs", "3", "--resume", str(ckpt), "--tag", "resumed",
           logs="logs-resumed")
    reference(out, "lightning", str(out), "--epochs", "3", "--tag", "whole")
    want = load(out, "lightning-whole-ref")
    for r in (0, 1):
        close(load(out, f"lightning-resumed-rank{r}")["model"], want["model"], TOL, f"rank {r}: ")


@pytest.fixture(scope="module")
def hf_fit(tmp_path_factory):
    pytest.importorskip("accelerate")
    return fit(tmp_path_factory, "hf")


@pytest.mark.slow
def test_hf_trainer_with_default_clipping_accumulation_and_a_warmup_schedule_equals_one_process(hf_fit):
    _, workers, want = hf_fit
    norms = [norm for _, _, norm, _ in want["losses"]]
    assert max(norms) > 1.0  # max_grad_norm=1.0 did clip
    assert want["losses"][0][3] == 0.0 and max(lr for *_, lr in want["losses"]) > 0  # warmup from lr 0
    for w in workers:
        assert w["world_size"] == 2
        close(w["model"], want["model"], TOL, f"rank {w['rank']}: ")
        # logged per step: the loss (mean over the workers), the clipped gradient's norm, the lr
        assert len(w["losses"]) == len(want["losses"])
        for got, ref in zip(w["losses"], want["losses"]):
            assert got[0] == ref[0] and got[1:] == pytest.approx(ref[1:], abs=1e-5), f"step {ref[0]}"


@pytest.mark.slow
def test_hf_workers_see_every_sample_once_per_epoch_between_them(hf_fit):
    _, (a, b), _ = hf_fit
    assert_each_sample_once_per_epoch(a, b, 64)


@pytest.mark.slow
def test_only_rank_zero_calls_save_pretrained_and_writes_hf_checkpoints(hf_fit):
    _, workers, want = hf_fit
    by_rank = {w["rank"]: w for w in workers}
    zero, other = by_rank[0], by_rank[1]
    assert [Path(p).name for p in zero["saves"]] == [Path(p).name for p in want["saves"]] == \
        ["checkpoint-4", "checkpoint-8", "final"]
    assert other["saves"] == []
    written = {p.name for p in files_under(Path(zero["root"]))}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= written
    # rank 1 writes nothing but its RNG state into each checkpoint (HF's per-process file, as under DDP)
    assert {p.name for p in files_under(Path(other["root"]))} == {"rng_state_1.pth"}


@pytest.mark.slow
def test_hf_resumed_from_a_mid_run_checkpoint_ends_where_the_uninterrupted_run_does(hf_fit):
    out, workers, want = hf_fit
    zero = next(w for w in workers if w["rank"] == 0)
    launch(out, "hf", str(out), "--resume", str(Path(zero["root"]) / "checkpoint-4"), "--tag", "resumed",
           logs="logs-resumed")
    n_params = len(want["model"]) - 1  # lm_head.weight is tied to the embedding
    for r in (0, 1):
        resumed = load(out, f"hf-resumed-rank{r}")
        close(resumed["model"], want["model"], TOL, f"rank {r}: ")
        # The shards' optimizer state is written once per worker, by the checkpoint's load: never
        # by accelerate's "device placement" read-and-write-back, which races the other worker's
        # load (it read half a state and crashed, or wrote the fresh empty state over the loaded one).
        assert resumed["loads"] == [n_params], f"rank {r}"
    assert all(w["loads"] == [] for w in workers)


def _tiny_module(build_in_configure_model: bool = False):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = None if build_in_configure_model else torch.nn.Linear(64, 10)

        def configure_model(self):
            if self.net is None:
                self.net = torch.nn.Linear(64, 10)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if not build_in_configure_model:
        del Tiny.configure_model
    return Tiny()


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [
    ("value_clipping", "gradient_clip_algorithm='norm'"),
    ("configure_model", "build the model's layers in __init__"),
])
def test_lightning_refuses_what_it_cannot_do_exactly_and_says_what_to_do_instead(case, words, tmp_path):
    import lightning as L

    from shardps import LocalCluster
    from shardps.worker.lightning import ShardpsStrategy

    from models import _digits

    x, y = _digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=16)
    with LocalCluster(servers=2) as cluster:
        strategy = ShardpsStrategy(cluster=cluster.address, job=case, min_workers=1)
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                            gradient_clip_val=0.5, gradient_clip_algorithm="value" if case == "value_clipping" else "norm")
        try:
            with pytest.raises((ValueError, RuntimeError), match=words):
                trainer.fit(_tiny_module(case == "configure_model"), loader)
        finally:
            strategy.close()
