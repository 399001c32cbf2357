import torch

from shardps.proto.messages import StepOpts
from shardps.worker.flat import FlatParams


def flat_of(model, wire_dtype=torch.float32):
    named = list(model.named_parameters())
    return FlatParams([p for _, p in named], [n for n, _ in named], [0] * len(named), [()] * len(named), 1,
                      wire_dtype)


def test_gather_and_scatter_convert_dtypes_and_keep_layout_order():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    model[0].bias.requires_grad_(False)  # frozen parameters stay in the layout, as in torch.optim's groups
    flat = flat_of(model, torch.bfloat16)
    assert [e.name for e in flat.layout.params] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert flat.layout.numel == 12 + 4 + 8 + 2
    for p in flat.params:
        if p.requires_grad:
            p.grad = torch.full_like(p, 2.0)
    model[1].bias.grad = None  # a missing gradient travels as zeros
    wire = flat.gather_grads()
    assert wire.dtype == torch.bfloat16 and flat.grads.dtype == torch.float32
    assert flat.grads[:12].eq(2).all() and flat.grads[12:16].eq(0).all() and flat.grads[16:24].eq(2).all()
    assert flat.grads[24:].eq(0).all()
    assert [flat.has_grad(i) for i in range(4)] == [True, False, True, False]
    flat.values.copy_(torch.arange(26, dtype=torch.float32))
    flat.scatter_params()
    assert model[1].bias.dtype == torch.bfloat16 and model[1].bias.tolist() == [24.0, 25.0]
    assert model[0].weight.flatten().tolist() == list(range(12))


def test_fp32_cpu_parameters_and_gradients_are_views_into_the_flat_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    flat = flat_of(model)
    assert flat.bound
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # binding kept the values
    flat.values[:12] = 7.0  # a reply written into the flat buffer is the model's new weight
    assert model[0].weight.eq(7.0).all()
    model(torch.ones(5, 3)).sum().backward()
    first = model[1].bias.grad.clone()
    flat.gather_grads()  # re-attaches autograd's fresh tensors as views
    assert torch.equal(flat.grads[-2:], first)
    flat.zero_grads()
    assert model[1].bias.grad is not None and model[1].bias.grad.eq(0).all()
    model(torch.ones(5, 3)).sum().backward()  # accumulates straight into the flat buffer
    assert torch.equal(flat.grads[-2:], first)
    model[1].bias.grad = None  # a user's set_to_none is honoured and re-attached on the next gather
    model[1].bias.grad = torch.full((2,), 3.0)
    flat.gather_grads()
    assert flat.grads[-2:].eq(3.0).all()
    assert model[1].bias.grad.data_ptr() == flat.grads[-2:].data_ptr()


def test_a_bound_gradient_backward_did_not_write_counts_as_none_until_it_does():
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 2)})
    flat = flat_of(model)
    assert not any(flat.has_grad(i) for i in range(4))  # attached views, but nothing computed yet
    model["used"](torch.ones(1, 3)).sum().backward()
    assert [flat.has_grad(i) for i in range(4)] == [True, True, False, False]
    mask = flat.grad_mask(0, flat.layout.numel)
    assert StepOpts(grad_mask=mask).present(4) == [True, True, False, False]
    flat.zero_grads(set_to_none=False)  # torch keeps zeroed gradients: they still count
    assert [flat.has_grad(i) for i in range(4)] == [True, True, False, False]
    flat.zero_grads(set_to_none=True)
    assert not any(flat.has_grad(i) for i in range(4)) and flat.grad_mask(0, 6) != b""


def test_edits_behind_the_optimizers_back_are_noticed():
    model = torch.nn.Linear(300, 300)
    flat = flat_of(model)
    flat.scatter_params()
    assert not flat.changed_since_scatter()
    with torch.no_grad():
        model.weight.clamp_(-0.01, 0.01)  # WGAN-style clipping, in place
    assert flat.changed_since_scatter()
