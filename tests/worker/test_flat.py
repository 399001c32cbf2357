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
