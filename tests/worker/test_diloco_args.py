"""DiLoCo refuses bad arguments with a message naming the fix, before it contacts any cluster."""
import pytest
import torch

from shardps import DiLoCo

NOWHERE = "127.0.0.1:9"  # nothing listens: an argument check that came too late would fail differently


def _model_and_inner():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("kwargs, words", [
    ({"sync_every": 0}, "sync_every is a number of inner steps >= 1"),
    ({"sync_every": 2.5}, "sync_every is a number of inner steps >= 1"),
    ({"sync_every": "often"}, "or 'auto'"),
    ({"sync_every": "auto"}, "needs sync_seconds > 0"),
    ({"sync_every": "auto", "sync_seconds": 5.0, "mode": "async"}, "give async a number of inner steps"),
    ({"sync_every": 4, "sync_seconds": 5.0}, "sync_seconds goes with sync_every='auto'"),
    ({"overlap": True}, "overlap works per inner step"),
    ({"balance_every": 10}, "balance_every works per inner step"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"outer": "adam", "outer_momentum": 0.9}, "pass its own arguments in outer_kwargs"),
    ({"fragments": 0}, "fragments is a number >= 1"),
    ({"fragments": 2, "sync_every": "auto", "sync_seconds": 5.0}, "staggers the fragments' syncs over a fixed"),
    ({"fragments": 2, "sync_every": 1}, "H >= fragments"),
    ({"fragments": 3, "sync_every": 4}, "needs at least as many trained parameters"),  # weight and bias: 2
])
def test_bad_diloco_arguments_are_refused_naming_the_fix(kwargs, words):
    model, inner = _model_and_inner()
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        DiLoCo(model, inner, NOWHERE, connect_timeout=1, **kwargs)


def test_an_inner_optimizer_over_another_models_parameters_is_refused():
    model, _ = _model_and_inner()
    other = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="build it over model.parameters"):
        DiLoCo(model, torch.optim.SGD(other.parameters(), lr=0.1), NOWHERE, connect_timeout=1)
