"""Tensor codec: a tensor <-> a stream of TensorChunk messages.

The payload is the tensor's raw little-endian bytes, cut into pieces of at most
``chunk_bytes``; every chunk also carries the whole tensor's dtype and shape. No
``repeated float`` (slow in Python protobuf) and no pickle (unsafe across trust
boundaries). Decoding writes straight into a caller's preallocated buffer when one
is given, so the per-step path allocates nothing large. ``views`` yields zero-copy
``wire.Chunk`` pieces for the fast serializers in ``wire``; ``Assembler`` accepts
both those and ``TensorChunk`` messages.

    chunks = list(encode(torch.arange(10.0), chunk_bytes=16))
    x = decode(chunks)                       # fresh tensor
    decode(chunks, out=buffer)               # into an existing buffer
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator

import numpy as np
import torch

from .errors import InvalidArgument
from . import wire
from .gen import shardps_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: near the best throughput for grpcio streams

if sys.byteorder != "little":  # the wire is little-endian; so is every platform torch ships for
    raise ImportError("shardps's tensor codec needs a little-endian host")

_TO_WIRE = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int16: pb.DTYPE_INT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.bool: pb.DTYPE_BOOL,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
_BY_NAME = {str(k).removeprefix("torch."): k for k in _TO_WIRE}


class CodecError(InvalidArgument, ValueError):
    """A chunk stream that does not describe one well-formed tensor (INVALID_ARGUMENT on the wire)."""


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} has no wire encoding; supported: {sorted(_BY_NAME)}") from None


def torch_dtype(wire: int) -> torch.dtype:
    try:
        return _FROM_WIRE[wire]
    except KeyError:
        raise CodecError(f"unknown wire dtype {wire}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype from its short name ("float32", "bfloat16", ...)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise CodecError(f"unknown dtype name {name!r}; supported: {sorted(_BY_NAME)}") from None


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor's memory (no copy)."""
    if tensor.device.type != "cpu":
        raise CodecError(f"encode a CPU tensor; got one on {tensor.device} (copy it to a host buffer first)")
    if not tensor.is_contiguous():
        raise CodecError("encode a contiguous tensor (call .contiguous() first)")
    return tensor.reshape(-1).view(torch.uint8).numpy()


def views(tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[wire.Chunk]:
    """Zero-copy chunks: each ``data`` is a memoryview of the tensor's memory.

    The caller keeps ``tensor`` unchanged until the chunks are serialized (``wire``'s
    serializer makes the one copy); at least one chunk, even for an empty tensor.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    dtype, shape = wire_dtype(tensor.dtype), list(tensor.shape)
    raw = memoryview(as_bytes(tensor))
    if raw.nbytes == 0:
        yield wire.Chunk(dtype, shape, 0, b"")
    for offset in range(0, raw.nbytes, chunk_bytes):
        yield wire.Chunk(dtype, shape, offset, raw[offset:offset + chunk_bytes])


def encode(tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """TensorChunk messages covering ``tensor`` (each owns a copy of its bytes); at least one."""
    for c in views(tensor, chunk_bytes):
        yield pb.TensorChunk(dtype=c.dtype, shape=c.shape, offset=c.offset, data=bytes(c.data))


class Assembler:
    """Reassembles one tensor from its chunks, in order, validating each.

    Pass ``out`` to decode into a preallocated buffer: the stream's dtype and element
    count must match it (its shape may differ, e.g. a flat view). Without ``out``
    the first chunk's dtype and shape allocate a fresh tensor, of at most
    ``max_numel`` elements when given (a declared shape is not trusted to size memory).
    """

    def __init__(self, out: torch.Tensor | None = None, expect_dtype: torch.dtype | None = None,
                 max_numel: int | None = None):
        self._out = out
        self._expect_dtype = expect_dtype
        self._max_numel = max_numel
        self._raw: np.ndarray | None = None
        self._dtype = None
        self._shape: tuple[int, ...] | None = None
        self.received = 0

    def add(self, chunk: pb.TensorChunk) -> None:
        if self._shape is None:
            self._start(chunk)
        elif chunk.dtype != self._dtype or tuple(chunk.shape) != self._shape:
            raise CodecError("chunks of one tensor disagree on dtype or shape")
        if chunk.offset != self.received:
            raise CodecError(f"chunk at byte offset {chunk.offset} arrived where {self.received} was expected")
        n = len(chunk.data)
        if self.received + n > self._raw.nbytes:
            raise CodecError(
                f"chunks carry more than the tensor's {self._raw.nbytes} bytes "
                f"(shape {list(self._shape)}, {torch_dtype(self._dtype)})"
            )
        if n:
            self._raw[self.received:self.received + n] = np.frombuffer(chunk.data, dtype=np.uint8)
        self.received += n

    def _start(self, chunk: pb.TensorChunk) -> None:
        dtype = torch_dtype(chunk.dtype)
        shape = tuple(int(d) for d in chunk.shape)
        if any(d < 0 for d in shape) or len(shape) > 16:
            raise CodecError(f"bad shape {list(shape)[:17]}: dimensions must be >= 0, at most 16 of them")
        if self._expect_dtype is not None and dtype != self._expect_dtype:
            raise CodecError(f"expected a {self._expect_dtype} tensor, got {dtype}")
        numel = 1
        for d in shape:
            numel *= d
        if self._max_numel is not None and numel > self._max_numel:
            raise CodecError(f"a tensor of shape {list(shape)} ({numel} elements) is larger than the "
                             f"{self._max_numel} elements this call can take")
        if self._out is None:
            self._out = torch.empty(shape, dtype=dtype)
        else:
            if self._out.dtype != dtype:
                raise CodecError(f"expected a {self._out.dtype} tensor, got {dtype}")
            if self._out.numel() != numel:
                raise CodecError(f"expected {self._out.numel()} elements, got shape {list(shape)} ({numel})")
        self._dtype, self._shape = chunk.dtype, shape
        self._raw = as_bytes(self._out)

    @property
    def complete(self) -> bool:
        """Every byte the stream's shape declares has arrived."""
        return self._shape is not None and self.received == self._raw.nbytes

    def finish(self) -> torch.Tensor:
        """The assembled tensor (``out`` itself when one was given); raises if bytes are missing."""
        if self._shape is None:
            raise CodecError("no chunk received")
        if self.received != self._raw.nbytes:
            raise CodecError(f"truncated tensor: got {self.received} of {self._raw.nbytes} bytes")
        return self._out  # the caller's buffer as given, or a fresh tensor of the stream's shape


def decode(chunks: Iterable[pb.TensorChunk], out: torch.Tensor | None = None) -> torch.Tensor:
    """Assemble a tensor from its chunks (into ``out`` when given)."""
    asm = Assembler(out)
    for chunk in chunks:
        asm.add(chunk)
    return asm.finish()
