"""Where a push's gradient comes from and where its reply's slice goes, on the shard server: the
three byte paths of ``worker/transports.py``, seen from this side, behind one interface.

``ShardServicer.Push`` reads the stream (header, buffers, options, clip total) and answers with the
PushResult; the path of the call (``path_for``) supplies the gradient and delivers the slice:

* ``StreamPath``: chunk frames inside the stream, read by ``ShardServicer._receive``; the reply's
  chunks follow the result (from the live slice where the policy keeps it still, else from one
  encoding per version);
* ``SegmentPath``: the worker's shared-memory segment, held open (never mapped) for the call: the
  gradient is copied out of it, the slice written into it before the result;
* ``LinkPath``: the worker's byte link, claimed for the call: the gradient is one frame on it, the
  slice one frame after the result.

``close(failed)`` always ends a path: a segment is released, a link handed back (closed first if
the call failed, so a worker still sending on it stops at once).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Protocol

import torch

from ..proto import codec, wire
from ..proto.errors import InvalidArgument, Unavailable
from ..proto.gen import shardps_pb2 as pb
from ..runtime.link import LinkError, LinkSocket
from ..runtime.shm import SegmentFile
from .links import LinkHub

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # wire dtypes a push may use
# PushHeader.reply_dtype -> the dtype its reply's slice travels in (shared memory: always fp32)
REPLY_DTYPES = {pb.DTYPE_UNSPECIFIED: torch.float32, pb.DTYPE_FLOAT32: torch.float32,
                pb.DTYPE_BFLOAT16: torch.bfloat16, pb.DTYPE_FLOAT16: torch.float16}


class ServerPath(Protocol):
    """Calls come in this order: ``gradient``, ``reply`` (after the push was submitted),
    ``after_result`` (after the PushResult went out), and ``close`` always."""

    name: str  # as the shard's status shows it per worker: grpc, shm or tcp
    in_band: bool  # the gradient is in the stream

    def gradient(self, state, streamed: torch.Tensor | None) -> torch.Tensor | None: ...

    def reply(self, state) -> int: ...

    def after_result(self, state) -> Iterator[wire.Frame]: ...

    def close(self, failed: bool) -> None: ...


def as_fp32(pool, buf: torch.Tensor) -> torch.Tensor:
    """``buf`` (pooled) as fp32 in a pooled buffer; a narrower buffer is given back."""
    if buf.dtype is torch.float32:
        return buf
    grad = pool.take(torch.float32, buf.numel()).copy_(buf)
    pool.give(buf)
    return grad


class StreamPath:
    name, in_band = "grpc", True

    def __init__(self, chunk_bytes: int, encode: Callable[[torch.Tensor], list], dtype: torch.dtype = torch.float32):
        self.chunk_bytes, self.encode, self.dtype = chunk_bytes, encode, dtype
        self.pieces: Iterator = iter(())

    def gradient(self, state, streamed: torch.Tensor | None) -> torch.Tensor | None:
        return streamed

    def reply(self, state) -> int:
        if self.dtype is not torch.float32:  # the slice rounded once per version, shared by its replies
            version, narrow = state.reply_tensor(self.dtype)
            self.pieces = (wire.Frame(None, c) for c in codec.views(narrow, self.chunk_bytes))
            state.add_bytes(sent=narrow.numel() * narrow.element_size())
            return version
        if state.policy.params_still_while_replying:  # stream the slice itself: no encoded copy held
            with state.cond:
                version = state.version
            self.pieces = (wire.Frame(None, c) for c in codec.views(state.param, self.chunk_bytes))
        else:
            version, frames = state.snapshot(self.encode)
            self.pieces = iter(frames)
        state.add_bytes(sent=state.shard.numel * 4)
        return version

    def after_result(self, state) -> Iterator[wire.Frame]:
        return self.pieces

    def close(self, failed: bool) -> None:
        pass


class SegmentPath:
    name, in_band = "shm", False

    def __init__(self, worker_id: int, segment: SegmentFile, pool):
        self.worker_id, self.segment, self.pool = worker_id, segment, pool

    def gradient(self, state, streamed: torch.Tensor | None) -> torch.Tensor | None:
        if streamed is not None:  # chunks as well as shared memory: the chunks are ignored
            self.pool.give(streamed)
        grad = self.pool.take(torch.float32, state.shard.numel)  # copied: the worker can change none of it later
        try:
            state.segments.read(self.worker_id, self.segment, grad)
        except BaseException:
            self.pool.give(grad)
            raise
        state.add_bytes(shm_received=state.shard.numel * 4)
        return grad

    def reply(self, state) -> int:
        return state.write_params(self.segment)  # the slice goes straight into the worker's memory

    def after_result(self, state) -> Iterator[wire.Frame]:
        return iter(())

    def close(self, failed: bool) -> None:
        self.segment.release()


class LinkPath:
    name, in_band = "tcp", False

    def __init__(self, hub: LinkHub, key, link: LinkSocket, nonce: int, deadline: float, pool,
                 dtype: torch.dtype = torch.float32):
        self.hub, self.key, self.link, self.nonce, self.deadline, self.pool = hub, key, link, nonce, deadline, pool
        self.dtype = dtype
        self.slice: torch.Tensor | None = None

    def gradient(self, state, streamed: torch.Tensor | None) -> torch.Tensor | None:
        """The gradient frame, as fp32 in a pooled buffer. A frame of the wrong size or dtype is refused
        (InvalidArgument); a link that breaks fails the push (Unavailable: the worker sends it again)."""
        if streamed is not None:  # chunks as well as the link: the chunks are ignored
            self.pool.give(streamed)
        numel = state.shard.numel
        try:
            dtype, nbytes = self.link.receive_header(self.nonce, self.deadline)
        except LinkError as exc:
            raise Unavailable(f"the byte link broke before the gradient arrived: {exc}; push again") from None
        if dtype not in GRAD_DTYPES or nbytes != numel * dtype.itemsize:
            state.reject("bad_size")
            raise InvalidArgument(f"the link's gradient frame holds {nbytes} bytes of {dtype}; this shard takes "
                                  f"{numel} values of float32, bfloat16 or float16")
        buf = self.pool.take(dtype, numel)
        try:
            self.link.receive_into(buf, self.deadline)
        except LinkError as exc:
            self.pool.give(buf)
            raise Unavailable(f"the byte link broke while the gradient arrived: {exc}; push again") from None
        state.add_bytes(received=nbytes)
        return as_fp32(self.pool, buf)

    def reply(self, state) -> int:
        version, self.slice = state.reply_tensor(self.dtype)
        return version

    def after_result(self, state) -> Iterator[wire.Frame]:
        assert self.slice is not None, "reply() comes first"
        try:
            self.link.send(self.nonce, self.slice, self.deadline)
        except LinkError as exc:
            raise Unavailable(f"the byte link broke while sending the reply: {exc}; push again") from None
        state.add_bytes(sent=self.slice.numel() * self.slice.element_size())
        return iter(())

    def close(self, failed: bool) -> None:
        if failed:
            self.link.close()  # (a worker still sending on it stops at once)
        self.hub.give(self.key, self.link)


def deadline_of(context) -> float:
    """The call's deadline on time.monotonic()'s clock (a call without one gets an hour)."""
    left = context.time_remaining() if context is not None else None
    return time.monotonic() + (left if left is not None else 3600.0)
