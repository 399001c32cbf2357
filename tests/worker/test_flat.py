import torch

from shardps.worker.flat import FlatParams


def test_gather_and_scatter_convert_dtypes_and_keep_layout_order():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    model[0].bias.requires_grad_(False)  # frozen parameters are not part of the layout
    flat = FlatParams(model.named_parameters(), wire_dtype=torch.bfloat16)
    assert [e.name for e in flat.layout.params] == ["0.weight", "1.weight", "1.bias"]
    assert flat.layout.numel == 12 + 8 + 2
    for p in flat.params:
        p.grad = torch.full_like(p, 2.0)
    model[2 - 1].bias.grad = None  # a missing gradient travels as zeros
    wire = flat.gather_grads()
    assert wire.dtype == torch.bfloat16 and flat.grads.dtype == torch.float32
    assert flat.grads[:20].eq(2).all() and flat.grads[20:].eq(0).all()
    flat.values.copy_(torch.arange(22, dtype=torch.float32))
    flat.scatter_params()
    assert model[1].bias.dtype == torch.bfloat16 and model[1].bias.tolist() == [20.0, 21.0]
    assert model[0].weight.flatten().tolist() == list(range(12))


def test_fp32_cpu_parameters_and_gradients_are_views_into_the_flat_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    flat = FlatParams(model.named_parameters())
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
