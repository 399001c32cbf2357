"""What a torch user's habits meet on a ShardedOptimizer: clear words where the semantics differ."""
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
def test_add_param_group_raises_instead_of_ignoring_the_parameters(cluster):
    model, opt = one_worker(cluster, "guard-groups")
    try:
        with pytest.raises(RuntimeError, match="pass every param group to the constructor"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    finally:
        opt.close()


@pytest.mark.parametrize("name, words", [("lbfgs", "cannot be sharded"), ("adafactor", "cannot be sharded"),
                                         ("evil", "unknown optimizer")])
def test_optimizers_that_cannot_be_sharded_are_refused_with_the_reason(name, words):
    with pytest.raises(ValueError, match=words):
        ShardedOptimizer(torch.nn.Linear(2, 2), cluster="127.0.0.1:1", optimizer=name, lr=0.1)
