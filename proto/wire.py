"""Fast (de)serializers for the messages that carry tensor chunks, byte-compatible with protobuf.

Measured on a 2-core box, moving 100 MB as 1 MiB messages: protobuf's
``SerializeToString`` costs ~62 ms and ``FromString`` ~58 ms, on top of ~53 ms of
``ndarray.tobytes``. Here a chunk message is written as protobuf's own wire
format by hand: small fields go through protobuf, and the tensor bytes are joined
straight from the tensor's memory (one copy, ~8 ms). Reading walks the wire format
and hands back a zero-copy ``memoryview`` of the data. Any protobuf implementation
still reads and writes these messages: the ``.proto`` stays the contract, this is
only a faster codec for four of its messages (a test checks both directions
against the generated classes).

A ``Frame`` is one such message: ``fields`` are the non-chunk fields as a protobuf
message of the same type (or None), ``chunk`` the TensorChunk's metadata and data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .gen import shardps_pb2 as pb

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass
class Chunk:
    """A TensorChunk whose ``data`` is any bytes-like object (often a memoryview)."""

    dtype: int = 0
    shape: list[int] = field(default_factory=list)
    offset: int = 0
    data: bytes | memoryview = b""


@dataclass
class Frame:
    """One message of a chunk-carrying type: its other fields (a pb message) and at most one
    chunk, in field ``field`` (0: the type's first chunk field)."""

    fields: object | None = None
    chunk: Chunk | None = None
    field: int = 0


# message class -> field numbers of its TensorChunk fields (the first is the default)
CHUNK_FIELDS = {
    pb.InitShardRequest: (3, 5),  # params, buffers
    pb.PushRequest: (2, 4, 6, 7),  # grad, indices, buffers, scales
    pb.PushResponse: (2, 4),  # params, buffers
    pb.PullResponse: (2,),
    pb.LoadStateRequest: (4,),
    pb.ReplicateRequest: (2,),
}


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 negatives are ten-byte varints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _chunk_prefix(chunk: Chunk) -> bytes:
    """Every TensorChunk field but the data's bytes, ending with the data's tag and length."""
    parts = []
    if chunk.dtype:
        parts.append(b"\x08" + _varint(chunk.dtype))
    if chunk.shape:
        packed = b"".join(_varint(d) for d in chunk.shape)
        parts.append(b"\x12" + _varint(len(packed)) + packed)
    if chunk.offset:
        parts.append(b"\x18" + _varint(chunk.offset))
    n = len(chunk.data)
    if n:
        parts.append(b"\x22" + _varint(n))
    return b"".join(parts)


def serializer(cls):
    """Serialize ``Frame`` objects (or plain ``cls`` messages) of ``cls`` to protobuf bytes."""
    numbers = CHUNK_FIELDS[cls]

    def serialize(msg) -> bytes:
        if not isinstance(msg, Frame):
            return msg.SerializeToString()
        head = msg.fields.SerializeToString() if msg.fields is not None else b""
        if msg.chunk is None:
            return head
        number = msg.field or numbers[0]
        if number not in numbers:
            raise ValueError(f"{cls.__name__} has no chunk field {number}")
        prefix = _chunk_prefix(msg.chunk)
        inner_len = len(prefix) + len(msg.chunk.data)
        return b"".join((head, _varint(number << 3 | _LEN), _varint(inner_len), prefix, msg.chunk.data))

    return serialize


def deserializer(cls):
    """Parse protobuf bytes of ``cls`` into a ``Frame``; the chunk's data is a zero-copy view.
    A message carrying several chunk fields keeps the last (shardps never sends that)."""
    numbers = CHUNK_FIELDS[cls]

    def deserialize(data: bytes) -> Frame:
        buf = memoryview(data)
        rest, chunk, field, i = [], None, 0, 0
        while i < len(buf):
            start = i
            key, i = _read_varint(buf, i)
            num, wtype = key >> 3, key & 7
            if wtype == _VARINT:
                _, i = _read_varint(buf, i)
            elif wtype == _I64:
                i += 8
            elif wtype == _I32:
                i += 4
            elif wtype == _LEN:
                n, i = _read_varint(buf, i)
                if num in numbers:
                    chunk, field = _parse_chunk(buf[i:i + n]), num
                i += n
            else:
                raise ValueError(f"unsupported wire type {wtype}")
            if i > len(buf):
                raise ValueError("truncated message")
            if num not in numbers:
                rest.append(buf[start:i])
        fields = cls.FromString(b"".join(rest)) if rest else None
        return Frame(fields, chunk, field)

    return deserialize


def _parse_chunk(buf: memoryview) -> Chunk:
    chunk, i = Chunk(), 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wtype = key >> 3, key & 7
        if wtype == _VARINT:
            value, i = _read_varint(buf, i)
            if num == 1:
                chunk.dtype = value
            elif num == 3:
                chunk.offset = value - (1 << 64) if value >= 1 << 63 else value
            elif num == 2:  # unpacked repeated int64
                chunk.shape.append(value)
        elif wtype == _LEN:
            n, i = _read_varint(buf, i)
            if num == 2:  # packed shape
                end = i + n
                while i < end:
                    value, i = _read_varint(buf, i)
                    chunk.shape.append(value)
                continue
            if num == 4:
                chunk.data = buf[i:i + n]
            i += n
        elif wtype == _I64:
            i += 8
        elif wtype == _I32:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wtype}")
    if i > len(buf):
        raise ValueError("truncated chunk")
    return chunk
