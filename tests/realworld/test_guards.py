"""What a torch user's habits meet on a ShardedOptimizer: clear words where the semantics differ."""
import copy
import warnings

import pytest
import torch

from shardps import ShardedOptimizer


def one_worker(cluster, job, model=None, **kwargs):
    model = model or torch.nn.Linear(4, 3)
    kwargs.setdefault("lr", 0.1)
    opt = ShardedOptimizer(model, cluster=cluster.address, optimizer=kwargs.pop("optimizer", "sgd"), job=job,
                           min_workers=1, connect_timeout=30, **kwargs)
    return model, opt


def backward(model):
    model(torch.randn(2, 4)).sum().backward()


@pytest.mark.slow
def test_torchs_own_clip_grad_norm_on_a_sharded_model_says_once_what_to_call_instead(cluster):
    model, opt = one_worker(cluster, "guard-clip")
    try:
        backward(model)
        with pytest.warns(UserWarning, match=r"opt\.clip_grad_norm_"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # once per optimizer
            torch.nn.utils.clip_grad_norm_(torch.nn.Linear(2, 2).parameters(), 1.0)  # not a sharded model: silent
        opt.step()
    finally:
        opt.close()


@pytest.mark.slow
def test_an_edit_behind_the_optimizers_back_is_named_and_upload_params_makes_it_stick(cluster):
    model, opt = one_worker(cluster, "guard-edit")
    try:
        with torch.no_grad():
            model.weight.fill_(0.5)
        backward(model)
        with pytest.warns(UserWarning, match=r"upload_params"):
            opt.step()
        assert not torch.all(model.weight == 0.5)  # the shards' values won (0.5 never reached them)
        with torch.no_grad():
            model.weight.fill_(0.5)
        opt.upload_params()
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()  # no gradient at all: nothing moves, and nothing to warn about
        assert torch.all(model.weight == 0.5)
    finally:
        opt.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_add_param_group_keeps_torchs_checks_and_refuses_mid_step_leaving_the_optimizer_as_it_was(cluster, mode):
    model, opt = one_worker(cluster, f"guard-groups-{mode}", mode=mode)
    extra = torch.nn.Parameter(torch.ones(2))
    try:
        with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
            opt.add_param_group({"params": [model.weight]})
        backward(model)
        opt.clip_grad_norm_(1.0)
        with pytest.raises(RuntimeError, match="after step"):  # this step's pushes started without it
            opt.add_param_group({"params": [extra]})
        opt.step()
        assert len(opt.param_groups) == 1 and not opt.extensions
        opt.add_param_group({"params": [extra], "lr": 0.5})  # one worker: it agrees with itself
        extra.grad = torch.ones(2)
        opt.step()
        assert torch.allclose(extra.detach(), torch.full((2,), 0.5))  # SGD at the group's own lr
        assert opt.state_dict()["param_groups"][1]["params"] == [2]  # torch's numbering, across both
        with torch.no_grad():
            extra.fill_(2.0)
        opt.upload_params()  # the edit goes to the added group's shards too ...
        with torch.no_grad():
            extra.zero_()
        opt.pull()  # ... and comes back from them
        assert torch.equal(extra.detach(), torch.full((2,), 2.0))
    finally:
        opt.close()


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_an_added_group_is_clipped_together_with_the_rest_as_torch_clips_one_optimizer(cluster, overlap):
    model, opt = one_worker(cluster, f"guard-clip-added-{overlap}", overlap=overlap)
    plain, extra = copy.deepcopy(model), [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    plain_extra = [torch.nn.Parameter(e.detach().clone()) for e in extra]
    stock = torch.optim.SGD(plain.parameters(), lr=0.1)
    try:
        for o, e in ((opt, extra), (stock, plain_extra)):  # two groups added: three jobs clip as one
            o.add_param_group({"params": [e[0]], "lr": 0.5})
            o.add_param_group({"params": [e[1]], "lr": 0.25})
        x = torch.randn(2, 4)
        norms = []
        for m, e, o in ((model, extra, opt), (plain, plain_extra, stock)):
            o.zero_grad()
            (m(x).sum() + (3 * e[0] ** 2).sum() + (e[1] ** 3).sum()).backward()
            clip = o.clip_grad_norm_ if o is opt else (lambda n: torch.nn.utils.clip_grad_norm_(
                [*plain.parameters(), *plain_extra], n))
            norms.append(float(clip(0.5)))
            o.step()
        assert norms[0] == pytest.approx(norms[1], rel=1e-6) and norms[1] > 0.5  # one norm over all; it clipped
        for got, want in zip(extra, plain_extra):
            assert torch.allclose(got.detach(), want.detach(), atol=1e-6)
        assert torch.allclose(model.weight.detach(), plain.weight.detach(), atol=1e-6)
        assert [g["params"] for g in opt.state_dict()["param_groups"]] == [[0, 1], [2], [3]]
    finally:
        opt.close()


@pytest.mark.parametrize("name, words", [("lbfgs", "cannot be sharded"), ("adafactor", "cannot be sharded"),
                                         ("evil", "unknown optimizer")])
def test_optimizers_that_cannot_be_sharded_are_refused_with_the_reason(name, words):
    with pytest.raises(ValueError, match=words):
        ShardedOptimizer(torch.nn.Linear(2, 2), cluster="127.0.0.1:1", optimizer=name, lr=0.1)
