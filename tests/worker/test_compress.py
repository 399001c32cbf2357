import torch

from shardps.worker.compress import Int8, TopK


def test_topk_sends_the_largest_and_carries_the_rest_as_residual():
    c = TopK(6, ratio=0.3)  # k = ceil(0.9) = 1 per 3-element shard
    g = torch.tensor([3.0, -5.0, 1.0, 0.5, 0.25, 2.0])
    pos, val, _ = c.compress(g, 0, 3)
    assert pos.tolist() == [1] and val.tolist() == [-5.0]
    assert c.residual[:3].tolist() == [3.0, 0.0, 1.0]  # conserved: sent + residual == gradient
    pos, val, _ = c.compress(g, 3, 6)
    assert pos.tolist() == [2] and val.tolist() == [2.0]
    pos, val, _ = c.compress(g, 0, 3)  # next step: residual + gradient = [6, -5, 2]
    assert pos.tolist() == [0] and val.tolist() == [6.0]
    assert c.residual[:3].tolist() == [0.0, -5.0, 2.0]


def test_error_feedback_eventually_sends_small_persistent_components():
    """Without the residual, element 2 (always 10x smaller) would never be sent."""
    c = TopK(4, ratio=0.5)  # k = 2
    g = torch.tensor([10.0, 10.0, 1.0, 1.0])
    applied = torch.zeros(4)
    for _ in range(12):
        pos, val, _ = c.compress(g, 0, 4)
        applied[pos.long()] += val
    assert applied[2] > 0 and applied[3] > 0
    # Everything the worker produced was either sent or is still in the residual.
    assert torch.allclose(applied + c.residual, g * 12)


def test_the_residual_keeps_the_rounding_error_of_a_low_precision_wire():
    c = TopK(2, ratio=0.5, wire_dtype=torch.bfloat16)
    g = torch.tensor([1.001, 0.0])
    pos, val, _ = c.compress(g, 0, 2)
    assert val.dtype == torch.bfloat16
    assert torch.allclose(val.float() + c.residual[:1], g[:1], atol=0, rtol=0)


def test_int8_sends_every_element_and_keeps_only_the_rounding_error():
    from shardps.proto import quant

    c = Int8(10, block=4)  # blocks of 4, 4 and 2 elements: three scales
    g = torch.linspace(-1.0, 2.0, 10)
    pos, val, scales = c.compress(g, 0, 10)
    assert pos is None and val.dtype == torch.int8 and val.numel() == 10 and scales.numel() == 3
    assert scales.tolist() == [g[:4].abs().max() / 127, g[4:8].abs().max() / 127, g[8:].abs().max() / 127]
    sent = quant.dequantize(val, scales)
    assert 0 < c.residual.abs().max() <= scales.max() / 2
    assert torch.allclose(sent + c.residual, g, rtol=0, atol=1e-7)  # conserved: sent + residual == gradient


def test_int8_error_feedback_applies_a_component_below_one_quantum_over_many_steps():
    from shardps.proto import quant

    c = Int8(2)
    g = torch.tensor([1.0, 0.001])  # 0.001 is a tenth of a quantum (1/127): rounded away every single step
    applied = torch.zeros(2)
    for _ in range(100):
        _, val, scales = c.compress(g, 0, 2)
        applied += quant.dequantize(val, scales)
    assert applied[1] > 0.05  # without the residual it would stay exactly 0
    assert torch.allclose(applied + c.residual, g * 100)
