"""Real training-loop patterns on 2 workers x 2 shard servers, against plain torch in one process.

Every scenario in ``scenarios.py`` is written once and run twice: as two shardps worker
processes with unequal shares of each union batch, and as one torch process on the
union batch. Tolerance: torch's own split-batch noise in fp32 (1e-5 on parameters).
"""
import pytest
import torch

import scenarios as S

TOL = 2e-5


def close(got: dict, want: dict, tol: float = TOL, what: str = "") -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for key, value in want.items():
        if torch.is_tensor(value) and value.is_floating_point():
            diff = (got[key].float() - value.float()).abs().max().item()
            assert diff <= tol, f"{what}{key} differs by {diff}"
        elif torch.is_tensor(value):
            assert torch.equal(got[key], value), f"{what}{key} differs"


def close_state(got: dict, want: dict, tol: float = 1e-4, what: str = "") -> None:
    """Two torch.optim state_dicts: the same state keys per parameter, values within ``tol``."""
    assert set(got["state"]) == set(want["state"]), f"{what}: parameters with state differ"
    for i, entry in want["state"].items():
        close(got["state"][i], entry, tol, f"{what}state[{i}].")
    assert len(got["param_groups"]) == len(want["param_groups"])
    for g, w in zip(got["param_groups"], want["param_groups"]):
        assert g["params"] == w["params"]
        for key in ("lr", "weight_decay", "betas", "momentum", "eps"):
            if key in w:
                assert g[key] == pytest.approx(w[key]), f"{what}param_groups.{key}"


def reference(name: str) -> dict:
    return S.SCENARIOS[name](S.Env(sharded=False))


@pytest.mark.slow
def test_nanogpt_groups_accumulation_hand_set_cosine_lr_and_clipping_match_torch(sharded):
    workers, want = sharded("nanogpt"), reference("nanogpt")
    for w in workers:
        close(w["model"], want["model"])
        assert w["norms"] == pytest.approx(want["norms"], rel=1e-5)  # the norm of the *averaged* gradient
    close_state(workers[0]["optim"], want["optim"])
    # The export is what model.state_dict() holds, tied names included, and loads strictly.
    from models import MiniGPT

    fresh = MiniGPT()
    fresh.load_state_dict(workers[0]["export"], strict=True)
    close(fresh.state_dict(), want["model"])
    stock = torch.optim.AdamW(MiniGPT().configure_optimizers(0.1), lr=3e-3, betas=(0.9, 0.95))
    stock.load_state_dict(workers[0]["optim"])  # shardps's state_dict loads into the stock class


@pytest.mark.slow
def test_clipping_by_the_max_norm_matches_torch(sharded):
    workers, want = sharded("clip_inf_norm"), reference("clip_inf_norm")
    for w in workers:
        close(w["model"], want["model"])
        assert w["norms"] == pytest.approx(want["norms"], rel=1e-5)


@pytest.mark.slow
def test_parameters_without_gradients_are_skipped_as_torch_skips_them(sharded):
    workers, want = sharded("unused_parameters"), reference("unused_parameters")
    for w in workers:
        close(w["model"], want["model"])
    close_state(workers[0]["optim"], want["optim"])
    never = [i for i, (name, _) in enumerate(S.M.Branchy().named_parameters()) if name.startswith(("never", "frozen"))]
    assert not set(never) & set(workers[0]["optim"]["state"])  # no state: never stepped
    close(workers[0]["export"], want["model"])  # frozen and unused parameters are exported too


@pytest.mark.slow
def test_every_scheduler_reaches_the_shards_including_momentum_and_a_zero_lr(sharded):
    workers, want = sharded("schedulers"), reference("schedulers")
    for job in S.SCHEDULED:
        for w in workers:
            close(w[job]["model"], want[job]["model"], what=f"{job}: ")
        close_state(workers[0][job]["optim"], want[job]["optim"], what=f"{job}: ")


@pytest.mark.slow
def test_every_elementwise_optimizer_with_two_param_groups_matches_torch(sharded):
    workers, want = sharded("optimizers"), reference("optimizers")
    for name in S.ELEMENTWISE:
        for w in workers:
            close(w[name]["model"], want[name]["model"], what=f"{name}: ")
        close_state(workers[0][name]["optim"], want[name]["optim"], what=f"{name}: ")


@pytest.mark.slow
def test_batchnorm_buffers_follow_ddp_and_the_export_loads_strictly(sharded):
    workers, want = sharded("batchnorm"), S.ddp_batchnorm_reference()
    for w in workers:
        close(w["model"], want["model"])  # parameters and rank 0's running statistics, on every worker
    model = S.M.ConvBN()
    model.load_state_dict(workers[0]["export"], strict=True)
    close(model.state_dict(), want["model"])
    assert workers[0]["export"]["stem.1.num_batches_tracked"].item() == S.STEPS


@pytest.mark.slow
def test_an_fp16_overflow_on_one_worker_skips_the_step_on_every_worker(sharded):
    workers, want = sharded("gradscaler"), reference("gradscaler")
    for w in workers:
        # fp16 forward passes round differently on a split batch than on the union; Adam turns that into
        # ~3e-4 here, while one step applied that should have been skipped moves the weights by ~1e-2.
        close(w["model"], want["model"], tol=2e-3)
        assert w["scales"] == want["scales"]  # both workers backed off at step 2 and grew again together
    close(workers[0]["model"], workers[1]["model"], tol=0.0)  # the workers agree exactly


@pytest.mark.slow
def test_a_gans_two_optimizers_are_two_jobs_on_one_cluster(sharded):
    workers, want = sharded("gan"), reference("gan")
    for w in workers:
        close(w["generator"], want["generator"])
        close(w["critic"], want["critic"])


@pytest.mark.slow
def test_deliberate_in_place_edits_reach_the_shards_with_upload_params(sharded):
    workers, want = sharded("weight_clipping"), reference("weight_clipping")
    for w in workers:
        close(w["model"], want["model"])


@pytest.mark.slow
def test_a_transformers_gpt2_with_hf_schedules_trains_as_torch_and_saves_with_save_pretrained(sharded, tmp_path):
    from transformers import GPT2LMHeadModel

    workers, want = sharded("hf_gpt2"), reference("hf_gpt2")
    for w in workers:
        close(w["model"], want["model"])
    model = GPT2LMHeadModel(S.hf_config())
    model.load_state_dict(workers[0]["export"], strict=True)  # lm_head.weight (tied) included
    model.save_pretrained(tmp_path / "gpt2")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    close(again.state_dict(), want["model"])


@pytest.mark.slow
def test_state_dicts_go_both_ways_and_training_continues_identically(sharded):
    workers = sharded("resume_both_ways")
    straight = S._frozen_mlp()  # the reference: 8 plain torch steps
    opt = torch.optim.AdamW(S._groups(straight), lr=0.01)
    S._train(S.Env(sharded=False), straight, opt, range(8))
    # shardps -> torch: the stock class built the user's way takes shardps's state and goes on.
    model = S._frozen_mlp()
    model.load_state_dict(workers[0]["to_torch"]["model"])
    stock = torch.optim.AdamW(S._groups(model), lr=0.01)
    stock.load_state_dict(workers[0]["to_torch"]["optim"])
    S._train(S.Env(sharded=False), model, stock, range(4, 8))
    close(S._sd(model), S._sd(straight))
    # torch -> shardps: the shards take torch's state and the job goes on from it.
    for w in workers:
        close(w["from_torch"]["model"], S._sd(straight))
    close_state(workers[0]["from_torch"]["optim"], opt.state_dict())


@pytest.mark.slow
def test_a_layer_frozen_when_the_optimizer_was_built_trains_every_step_once_unfrozen_as_in_torch(sharded):
    workers, want = sharded("unfreeze"), reference("unfreeze")
    frozen = S._frozen_mlp()
    assert (want["model"]["2.weight"] - frozen.state_dict()["2.weight"]).abs().max() > 1e-3  # it did train
    for w in workers:
        close(w["model"], want["model"])


@pytest.mark.slow
def test_a_param_group_added_mid_run_trains_clips_checkpoints_and_resumes_as_in_torch(sharded):
    workers, want = sharded("add_group"), reference("add_group")
    for w in workers:
        close(w["model"], want["model"], tol=1e-6)
        assert w["norms"] == pytest.approx(want["norms"], rel=1e-5)  # one norm over the job's and the group's
        close(w["resumed"]["model"], want["resumed"]["model"], tol=1e-6)
    frozen = S._frozen_mlp()
    assert (want["model"]["2.weight"] - frozen.state_dict()["2.weight"]).abs().max() > 1e-3  # the group trained
    close_state(workers[0]["optim"], want["optim"])
    close_state(workers[0]["checkpoint"]["optim"], want["checkpoint"]["optim"])
    close_state(workers[0]["resumed"]["optim"], want["resumed"]["optim"])
    close(workers[0]["export"], want["model"], tol=1e-6)  # the export holds the added group's parameters
    assert workers[0]["status"]["added_groups"] == ["add_group-add-group.g2"]  # status names the group's job
    close(workers[0]["exported"]["model"], want["model"], tol=1e-6)  # shardps export: the group's job too
    close_state(workers[0]["exported"]["optim"], want["optim"])
    stock = torch.optim.AdamW(S._backbone_groups(frozen), lr=0.01)
    stock.add_param_group({"params": list(frozen[2].parameters()), "lr": 0.005, "weight_decay": 0.1})
    stock.load_state_dict(workers[0]["optim"])  # the state_dict loads into torch's optimizer built the same way


@pytest.mark.slow
def test_workers_adding_different_param_groups_are_refused_and_the_job_goes_on_unchanged(sharded):
    workers = sharded("add_group_differs")
    straight = S._frozen_mlp()  # what the job must hold: 4 steps without the group
    S._train(S.Env(sharded=False), straight, torch.optim.AdamW(S._backbone_groups(straight), lr=0.01), range(4))
    for w in workers:
        assert "FailedPrecondition" in w["error"] and "param group 2" in w["error"], w["error"]
        assert "before step 2" in w["error"] and "differ" in w["error"] and "same step()" in w["error"], w["error"]
        assert w["groups"] == 2 and not w["extension_defined"]
        close(w["model"], S._sd(straight), tol=1e-6)


@pytest.mark.slow
def test_a_param_group_only_one_worker_added_fails_both_with_the_reason_and_adds_nothing(sharded):
    workers = sharded("add_group_alone")
    for w in workers:
        assert "FailedPrecondition" in w["error"] and "param group 2" in w["error"], w["error"]
        assert "without it" in w["error"] and "same step()" in w["error"], w["error"]
        assert w["groups"] == 2 and not w["extension_defined"]
