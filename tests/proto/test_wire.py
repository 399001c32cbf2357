"""The fast chunk codec writes and reads exactly protobuf's wire format for its chunk-carrying messages."""
import pytest
import torch

from shardps.proto import codec, wire
from shardps.proto.gen import shardps_pb2 as pb

CHUNK = dict(dtype=pb.DTYPE_BFLOAT16, shape=[3, 0, 7, 2**40], offset=123456789, data=b"\x00\x01payload\xff" * 50)
CASES = [
    (pb.PushRequest, lambda: pb.PushRequest(header=pb.PushHeader(
        worker_id=3, step=7, epoch=2, target=pb.ShardTarget(job_id="j", stop=9),
        options=pb.StepOptions(batch_size=32, hyperparams_json='[{"lr":0.5}]', grad_mask=b"\x05", clip_max_norm=1.0))),
     "grad"),
    (pb.PushRequest, lambda: pb.PushRequest(clip_total=pb.ClipTotal(step=3, total_norm=2.5)), "buffers"),
    (pb.PushResponse, lambda: pb.PushResponse(result=pb.PushResult(version=9, staleness=2, duplicate=True)), "params"),
    (pb.PushResponse, lambda: pb.PushResponse(clip_partial=pb.ClipPartial(step=1, partial=0.25)), "buffers"),
    (pb.PullResponse, lambda: pb.PullResponse(version=4, name="optim/3/exp_avg"), "chunk"),
    (pb.InitShardRequest, lambda: pb.InitShardRequest(worker_id=5, target=pb.ShardTarget(job_id="k")), "params"),
    (pb.InitShardRequest, lambda: pb.InitShardRequest(replace=True), "buffers"),
    (pb.LoadStateRequest, lambda: pb.LoadStateRequest(name="optim/0/step", hyperparams_json="[]"), "chunk"),
]


@pytest.mark.parametrize("cls, make, field", CASES, ids=[f"{c[0].__name__}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("with_fields", [True, False])
@pytest.mark.parametrize("with_chunk", [True, False])
def test_fast_codec_matches_protobuf_both_ways(cls, make, field, with_fields, with_chunk):
    fields = make() if with_fields else None
    chunk = wire.Chunk(**CHUNK) if with_chunk else None
    number = cls.DESCRIPTOR.fields_by_name[field].number
    fast = wire.serializer(cls)(wire.Frame(fields, chunk, field=number))
    reference = cls()
    if fields is not None:
        reference.MergeFrom(fields)
    if with_chunk:
        getattr(reference, field).CopyFrom(pb.TensorChunk(**CHUNK))
    assert cls.FromString(fast) == reference  # protobuf reads what we write
    frame = wire.deserializer(cls)(reference.SerializeToString())  # we read what protobuf writes
    assert (frame.fields or cls()) == (fields or cls())
    if with_chunk:
        assert (frame.chunk.dtype, frame.chunk.shape, frame.chunk.offset) == (CHUNK["dtype"], CHUNK["shape"],
                                                                              CHUNK["offset"])
        assert bytes(frame.chunk.data) == CHUNK["data"] and frame.field == number
    else:
        assert frame.chunk is None


def test_views_are_zero_copy_and_round_trip_through_the_assembler():
    t = torch.randn(1000)
    chunks = list(codec.views(t, chunk_bytes=999))
    t.view(torch.uint8)[0] ^= 0xFF  # the views see later writes: nothing was copied yet
    assert bytes(chunks[0].data[:1]) == bytes(t.view(torch.uint8)[:1].numpy())
    frames = [wire.serializer(pb.PushRequest)(wire.Frame(None, c)) for c in chunks]
    out = torch.empty(1000)
    asm = codec.Assembler(out=out)
    for f in frames:
        asm.add(wire.deserializer(pb.PushRequest)(f).chunk)
    assert torch.equal(asm.finish(), t)


def test_truncated_frames_are_refused():
    data = wire.serializer(pb.PushRequest)(wire.Frame(None, wire.Chunk(**CHUNK)))
    with pytest.raises(ValueError, match="truncated"):
        wire.deserializer(pb.PushRequest)(data[:-5])


def test_push_requests_carry_index_chunks_in_their_own_field():
    ser, de = wire.serializer(pb.PushRequest), wire.deserializer(pb.PushRequest)
    data = ser(wire.Frame(None, wire.Chunk(**CHUNK), field=4))
    assert pb.PushRequest.FromString(data) == pb.PushRequest(indices=pb.TensorChunk(**CHUNK))
    frame = de(pb.PushRequest(indices=pb.TensorChunk(**CHUNK)).SerializeToString())
    assert frame.field == 4 and bytes(frame.chunk.data) == CHUNK["data"]
    assert de(pb.PushRequest(grad=pb.TensorChunk(**CHUNK)).SerializeToString()).field == 2
    with pytest.raises(ValueError, match="no chunk field 3"):
        wire.serializer(pb.PushResponse)(wire.Frame(None, wire.Chunk(**CHUNK), field=3))
