"""Values that pass their field's own check but would break the step: loss scales, clip totals,
loaded optimizer state. Each is refused naming the field (state unchanged), or handled as torch does."""
import threading

import pytest
import torch

from shardps.proto import optim
from shardps.proto.errors import InvalidArgument
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, StepOpts, UpdateMode
from shardps.proto.plan import ShardRange
from shardps.server.modes import Push
from shardps.server.state import ShardState

N = 64


def make_state(optimizer="sgd", members=2, **kwargs):
    kwargs.setdefault("lr", 0.01)
    job = JobConfig(Layout.from_shapes([("w", (N,), "float32")]), optimizer, kwargs, UpdateMode.SYNC, members)
    state = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=10.0)
    state.initialize(torch.ones(N))
    return state


def push(worker, step, grad, **options):
    return Push(worker, step, 1, step, StepOpts(1, "", **options), grad)


@pytest.mark.parametrize("grad_scale, grad, words", [
    (1e-39, 1.0, "normal float32"),  # its reciprocal overflows float32: the closing push used to fail UNKNOWN
    (1e39, 1.0, "normal float32"),  # no float32 loss scale is this large
    (1e-30, 1e10, "past float32's range"),  # each is fine; the unscaled gradient is Inf (parameters went NaN)
])
def test_a_loss_scale_that_breaks_the_unscale_is_refused_and_the_step_still_closes(grad_scale, grad, words):
    state = make_state()
    members = frozenset({0, 1})
    before = state.digest()
    with pytest.raises(InvalidArgument, match=words):
        state.push(push(0, 0, torch.full((N,), grad), grad_scale=grad_scale), members)
    assert state.digest() == before and state.version == 0
    # the refused worker sends its step again, properly scaled; the step closes with both
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("a", state.push(push(1, 0, torch.full((N,), 2.0)), members)))
    t.start()
    state.push(push(0, 0, torch.full((N,), 4.0 * 1024), grad_scale=1024.0), members)
    t.join(10)
    assert result["a"].version == 1 == state.version
    assert torch.allclose(state.param, torch.full((N,), 1 - 0.01 * (2.0 + 4.0) / 2))


def test_a_clip_total_that_overflowed_zeroes_the_gradient_as_torch_does():
    state = make_state(members=1)
    members = frozenset({0})
    p = push(0, 0, torch.full((N,), 3.0), clip_max_norm=1.0)
    out = state.push(p, members)
    assert out.clip_partial is not None
    state.finish_clip(p, float("inf"), out.duplicate)  # every worker's total is Inf: torch clips to 0
    assert state.version == 1 and torch.equal(state.param, torch.ones(N))
    q = push(0, 1, torch.full((N,), 3.0), clip_max_norm=1.0)
    out = state.push(q, members)
    with pytest.raises(InvalidArgument, match="total_norm"):
        state.finish_clip(q, float("nan"), out.duplicate)


# Each optimizer with every switch that adds state, so each key torch keeps is seen once.
CONFIGS = [("sgd", {"momentum": 0.9}), ("adam", {"amsgrad": True}), ("adamw", {}), ("adagrad", {}),
           ("rmsprop", {"centered": True, "momentum": 0.5}), ("adamax", {}), ("nadam", {}), ("radam", {}),
           ("adadelta", {}), ("asgd", {}), ("rprop", {})]


def genuine_state(name, kwargs, steps=3):
    """What torch's own optimizer keeps after a few steps, named as LoadState names it."""
    p = torch.nn.Parameter(torch.ones(N))
    opt = optim.OPTIMIZERS[name]([p], lr=0.01, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        p.grad = torch.randn(N, generator=gen)
        opt.step()
    return {f"optim/0/{k}": (v.clone() if torch.is_tensor(v) else torch.tensor(float(v)))
            for k, v in opt.state[p].items()}


def test_every_optimizers_genuine_state_loads():
    assert {name for name, _ in CONFIGS} == set(optim.OPTIMIZERS)
    for name, kwargs in CONFIGS:
        state = make_state(name, **kwargs)
        state.load_state(genuine_state(name, kwargs), "")


IMPOSSIBLE = [
    ("adam", {}, "exp_avg_sq", -1.0), ("adam", {}, "step", -1.0), ("adam", {"amsgrad": True}, "max_exp_avg_sq", -1.0),
    ("adagrad", {}, "sum", -1.0), ("rmsprop", {}, "square_avg", -0.5), ("adadelta", {}, "acc_delta", -1.0),
    ("adamax", {}, "exp_inf", -1.0), ("nadam", {}, "mu_product", 2.0), ("asgd", {}, "mu", 0.0),
    ("rprop", {}, "step_size", -0.1),
]


@pytest.mark.parametrize("name, kwargs, key, value", IMPOSSIBLE)
def test_impossible_optimizer_state_is_refused_naming_it_and_changes_nothing(name, kwargs, key, value):
    state = make_state(name, members=1, **kwargs)
    state.push(push(0, 0, torch.ones(N)), frozenset({0}))  # real state to keep
    before = state.digest()
    tensors = genuine_state(name, kwargs)
    tensors[f"optim/0/{key}"] = torch.full_like(tensors[f"optim/0/{key}"], value)
    with pytest.raises(InvalidArgument, match=f"optim/0/{key}"):
        state.load_state(tensors, "")
    assert state.digest() == before
    assert state.stats.rejections["bad_state"] == 1


def test_centered_rmsprop_state_with_a_mean_square_below_the_squared_mean_is_refused():
    kwargs = {"centered": True}
    state = make_state("rmsprop", **kwargs)
    tensors = genuine_state("rmsprop", kwargs)
    tensors["optim/0/grad_avg"] = tensors["optim/0/square_avg"].sqrt() * 2  # its square is 4x the mean square
    with pytest.raises(InvalidArgument, match="grad_avg"):
        state.load_state(tensors, "")


def test_state_loaded_at_its_limits_still_steps_to_finite_parameters():
    """The checks refuse only what cannot be: zero second moments and step 0 are legal, and train."""
    state = make_state("adam", members=1)
    tensors = genuine_state("adam", {})
    tensors["optim/0/exp_avg_sq"].zero_()
    tensors["optim/0/step"].zero_()
    state.load_state(tensors, "")
    state.push(push(0, 0, torch.ones(N)), frozenset({0}))
    assert bool(torch.isfinite(state.param).all())
