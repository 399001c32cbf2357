import pytest
import torch

from shardps.proto import codec
from shardps.proto.codec import CodecError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool]
SHAPES = [(), (0,), (1,), (3, 0, 2), (7,), (4, 5, 6)]


def _sample(dtype, shape):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_codec_round_trips_every_dtype_and_shape(dtype, shape):
    t = _sample(dtype, shape)
    chunks = list(codec.encode(t, chunk_bytes=5))  # tiny chunks: most tensors span several
    back = codec.decode(chunks)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    assert sum(len(c.data) for c in chunks) == t.numel() * t.element_size()


def test_codec_splits_large_slices_and_decodes_into_a_preallocated_buffer():
    t = torch.randn(3 * (1 << 20) // 4 + 17)  # a bit over 3 MiB
    chunks = list(codec.encode(t))
    assert len(chunks) == 4
    assert all(len(c.data) <= codec.DEFAULT_CHUNK_BYTES for c in chunks)
    out = torch.empty_like(t)
    assert codec.decode(chunks, out=out) is out
    assert torch.equal(out, t)


def test_codec_rejects_truncated_reordered_and_mismatched_streams():
    chunks = list(codec.encode(torch.arange(10.0), chunk_bytes=8))
    with pytest.raises(CodecError, match="truncated"):
        codec.decode(chunks[:-1])
    with pytest.raises(CodecError, match="offset"):
        codec.decode([chunks[0], chunks[2], chunks[1], *chunks[3:]])
    with pytest.raises(CodecError, match="elements"):
        codec.decode(chunks, out=torch.empty(11))
    with pytest.raises(CodecError, match="expected"):
        codec.decode(chunks, out=torch.empty(10, dtype=torch.float64))
    bigger = chunks + [chunks[-1].__class__(dtype=chunks[0].dtype, shape=[10], offset=40, data=b"1234")]
    with pytest.raises(CodecError, match="more than"):
        codec.decode(bigger)
    with pytest.raises(CodecError, match="no chunk"):
        codec.decode([])


def test_codec_refuses_non_contiguous_tensors():
    with pytest.raises(CodecError, match="contiguous"):
        list(codec.encode(torch.randn(4, 4).t()))
