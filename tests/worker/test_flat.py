import os

import pytest
import torch

from shardps.proto.messages import StepOpts
from shardps.runtime.shm import SegmentFile
from shardps.worker.flat import FlatParams, bucket_kind


def flat_of(model, wire_dtype=torch.float32, bucket=None, shared=False):
    named = list(model.named_parameters())
    return FlatParams([p for _, p in named], [n for n, _ in named], [0] * len(named), [()] * len(named), 1,
                      wire_dtype, shared=shared, bucket=bucket)


def test_the_bucket_follows_what_the_parameters_allow():
    assert bucket_kind(list(torch.nn.Linear(2, 2).parameters())) == "host"
    assert bucket_kind(list(torch.nn.Linear(2, 2).to(torch.bfloat16).parameters())) == "device"
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.float64))
    assert bucket_kind(list(mixed.parameters())) == "copy"
    with pytest.raises(ValueError, match="cannot hold"):
        flat_of(torch.nn.Linear(2, 2).to(torch.bfloat16), bucket="host")
    with pytest.raises(ValueError, match="cannot hold"):
        flat_of(mixed, bucket="device")


@pytest.mark.parametrize("bucket", ["device", "copy"])
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float32])
def test_gather_and_scatter_convert_dtypes_and_keep_layout_order(bucket, wire):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    model[0].bias.requires_grad_(False)  # frozen parameters stay in the layout, as in torch.optim's groups
    flat = flat_of(model, wire, bucket=bucket)
    assert [e.name for e in flat.layout.params] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert flat.layout.numel == 12 + 4 + 8 + 2
    for p in flat.params:
        if p.requires_grad:
            p.grad = torch.full_like(p, 2.0)
    model[1].bias.grad = None  # a missing gradient travels as zeros
    got = flat.gather_grads()
    assert got.dtype == wire and flat.grads.dtype == torch.float32
    expected = torch.tensor([2.0] * 12 + [0.0] * 4 + [2.0] * 8 + [0.0] * 2)
    assert torch.equal(got.float(), expected)
    assert [flat.has_grad(i) for i in range(4)] == [True, False, True, False]
    # a push through shared memory takes the fp32 host copy; cast to the wire only if it falls back
    staged = flat.stage_grads(0, 16, shm=True)
    staged.wait()
    assert torch.equal(flat.grads[:16], expected[:16])
    flat.wire.zero_() if flat.wire is not flat.grads else None
    assert torch.equal(staged.wire()[:16].float(), expected[:16])
    flat.values.copy_(torch.arange(26, dtype=torch.float32))
    flat.scatter_params()
    assert model[1].bias.dtype == torch.bfloat16 and model[1].bias.tolist() == [24.0, 25.0]
    assert model[0].weight.flatten().tolist() == list(range(12))
    flat.values.copy_(-torch.arange(26, dtype=torch.float32))  # one shard's reply, then the step's end
    flat.fence()
    flat.scatter_range(16, 26)
    flat.scatter_params(ranges_done=bucket == "device")
    assert model[1].bias.tolist() == [-24.0, -25.0]
    # only the range that was scattered changed on the device; a copy bucket copies everything
    expected = torch.arange(26, dtype=torch.float32) * torch.tensor([1.0 if bucket == "device" else -1.0] * 16 + [-1.0] * 10)
    assert flat.gather_params().tolist() == expected.tolist()


@pytest.mark.parametrize("bucket", ["host", "device"])
def test_fp32_parameters_and_gradients_are_views_into_the_flat_buckets(bucket):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    flat = flat_of(model, bucket=bucket)
    assert flat.bound and flat.kind == bucket
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # binding kept the values
    flat.values[:12] = 7.0  # a reply written into the flat buffer is the model's new weight
    flat.scatter_range(0, 12)
    flat.scatter_params(ranges_done=True)
    assert model[0].weight.eq(7.0).all()
    model(torch.ones(5, 3)).sum().backward()
    first = model[1].bias.grad.clone()
    flat.gather_grads()  # re-attaches autograd's fresh tensors as views
    assert torch.equal(flat.grads[-2:], first)
    flat.zero_grads()
    assert model[1].bias.grad is not None and model[1].bias.grad.eq(0).all()
    model(torch.ones(5, 3)).sum().backward()  # accumulates straight into the flat bucket
    assert torch.equal(flat.bucket_grads[-2:], first)
    model[1].bias.grad = None  # a user's set_to_none is honoured and re-attached on the next gather
    model[1].bias.grad = torch.full((2,), 3.0)
    flat.gather_grads()
    assert flat.grads[-2:].eq(3.0).all()
    assert model[1].bias.grad.data_ptr() == flat.bucket_grads[-2:].data_ptr()
    model[1].bias.grad[0] = float("nan")
    assert not flat.all_finite()


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


@pytest.mark.parametrize("bucket", ["host", "device", "copy"])
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float32])
def test_a_renewed_segment_carries_the_model_and_the_old_one_no_longer_reaches_it(bucket, wire):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    if bucket == "device":
        model = model.to(torch.bfloat16)
    flat = flat_of(model, wire, bucket=bucket, shared=True)
    if flat.segment is None:
        pytest.skip("no /dev/shm here")
    model(torch.ones(1, 3, dtype=next(model.parameters()).dtype)).sum().backward()
    model[1].bias.grad = None  # a gradient torch sees as None stays None
    old = flat.segment
    late = SegmentFile.open(old.name, old.nonce, old.numel)  # a server's descriptor of it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = flat.gather_grads().clone()
    flat.values.copy_(flat.gather_params())
    flat.renew_segment()
    assert flat.segment is not old and flat.segment.name != old.name and not os.path.exists(old.path)
    assert torch.equal(flat.gather_grads(), grads)  # the step's gradients came along (None ones as zeros)
    assert model[1].bias.grad is None and not flat.has_grad(3) and flat.has_grad(0)
    late.write_values(0, torch.full((old.numel,), float("nan")))  # what a server still holding the old one may write
    late.retire()
    flat.scatter_params()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    if bucket == "host":  # still views into the (new) buckets: a reply lands in the model with no copy
        assert model[0].weight.data_ptr() == flat.values.data_ptr()
        assert model[0].weight.grad.data_ptr() == flat.grads.data_ptr()
    flat.close()
    assert not os.path.exists(flat.segment.path)
