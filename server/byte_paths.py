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
  slice one frame after the result;
* ``PartsPath``: a push in parts on the byte link (plain sync): the gradient comes as one frame per
  part, each committed as it lands (``server/parts.py``), and a sender thread answers each part as
  soon as the shard applied it, while later parts still arrive.

``close(failed)`` always ends a path: a segment is released, a link handed back (closed first if
the call failed, so a worker still sending on it stops at once).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, Protocol

import torch

from ..proto import codec, wire
from ..proto.errors import InvalidArgument, Unavailable
from ..proto.gen import shardps_pb2 as pb
from ..proto.plan import part_bounds
from ..runtime.link import LinkError, LinkSocket
from ..runtime.shm import SegmentFile
from . import parts
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


class PartsPath(LinkPath):
    """A push in parts on the byte link: ``read`` takes the parts off the link into the push's buffer
    (committing each under the shard's lock), ``answer`` starts a thread that sends each part of the
    slice back once the shard applied it (or the step closed). ``after_result`` waits for the last
    part to go out; ``close`` stops the thread. Both directions of the link are busy at once."""

    def __init__(self, hub: LinkHub, key, link: LinkSocket, nonce: int, deadline: float, pool,
                 dtype: torch.dtype, stops: list[int]):
        super().__init__(hub, key, link, nonce, deadline, pool, dtype)
        self.stops, self.bounds = stops, part_bounds(stops)
        self.writer: LinkSocket | None = None
        self._sender: threading.Thread | None = None
        self._stopped = False
        self._error: Exception | None = None
        self._sent = 0  # parts of the slice sent
        self._state = None

    def read(self, state, fill: parts.Fill) -> None:
        """Every part of the gradient, in order, into ``fill.push``'s buffer (the parts ``fill`` skips
        are read and dropped). InvalidArgument for a frame of another size or dtype, or a part with
        NaN/Inf (nothing of it is taken; parts before it may be applied already); Unavailable when the
        link breaks (the worker sends the push again and the retry continues it)."""
        first: torch.dtype | None = None
        for part, (lo, hi) in enumerate(self.bounds):
            try:
                dtype, nbytes = self.link.receive_header(self.nonce, self.deadline)
            except LinkError as exc:
                raise Unavailable(f"the byte link broke before part {part} of the gradient arrived: {exc}; "
                                  "push again") from None
            if dtype not in GRAD_DTYPES or nbytes != (hi - lo) * dtype.itemsize or dtype != (first or dtype):
                state.reject("bad_size")
                raise InvalidArgument(f"part {part} of the gradient holds {nbytes} bytes of {dtype}; this shard's "
                                      f"part {part} is {hi - lo} values of one of float32, bfloat16 or float16")
            first = dtype
            skip = fill.skips(part)
            direct = dtype is torch.float32 and not skip
            buf = fill.push.gradient[lo:hi] if direct else self.pool.take(dtype, hi - lo)
            try:
                self.link.receive_into(buf, self.deadline)
                if not skip:
                    if not direct:
                        fill.push.gradient[lo:hi].copy_(buf)
                    state.checks.validate_grad(fill.push.gradient[lo:hi], fill.push.options.grad_scale, hi - lo)
            except LinkError as exc:
                raise Unavailable(f"the byte link broke while part {part} of the gradient arrived: {exc}; "
                                  "push again") from None
            finally:
                if not direct:
                    self.pool.give(buf)
            state.add_bytes(received=nbytes)
            if not skip:
                with state.cond:
                    parts.arrived(state, fill, part)

    def answer(self, state, step: int, generation: int) -> None:
        """Start sending the slice's parts: each once ``state`` may answer it for ``step``."""
        self._state, self.writer = state, self.link.duplex()
        self._sender = threading.Thread(target=self._send, args=(state, step, generation), daemon=True,
                                        name="shardps-parts-reply")
        self._sender.start()

    def _send(self, state, step: int, generation: int) -> None:
        assert self.writer is not None
        try:
            for part, (lo, hi) in enumerate(self.bounds):
                def ready(part: int = part) -> bool:
                    return state.policy.part_ready(state, step, part)

                with state.cond:
                    state.cond.wait_for(lambda: self._stopped or state.generation != generation or ready(),
                                        timeout=max(0.0, self.deadline - time.monotonic()))
                    if self._stopped or state.generation != generation or not ready():
                        return  # (the push failed, rolled back, or ran out of time: its handler says so)
                # The live slice: in plain sync part ``part`` changes again only with this worker's next push.
                values = state.param[lo:hi]
                if self.dtype is not torch.float32:
                    narrow = self.pool.take(self.dtype, hi - lo).copy_(values)
                    try:
                        self.writer.send(self.nonce, narrow, self.deadline)
                    finally:
                        self.pool.give(narrow)
                else:
                    self.writer.send(self.nonce, values, self.deadline)
                state.add_bytes(sent=(hi - lo) * self.dtype.itemsize)
                self._sent += 1
        except (LinkError, OSError) as exc:
            self._error = exc
            self.link.close()  # the handler's read (if any) stops too

    def reply(self, state) -> int:
        with state.cond:
            return state.version

    def after_result(self, state) -> Iterator[wire.Frame]:
        """Wait until every part went out (the worker has the whole slice once this returns)."""
        if self._sender is not None:
            self._sender.join(timeout=max(0.0, self.deadline - time.monotonic()))
            if self._sender.is_alive() or self._error is not None or self._sent < len(self.stops):
                raise Unavailable(f"the reply's parts did not all go out on the byte link "
                                  f"({self._error or 'timed out'}); push again")
        return iter(())

    def close(self, failed: bool) -> None:
        state = self._state
        if state is not None:
            with state.cond:
                self._stopped = True
                state.notify_all()
        if failed:
            self.link.close()
        if self._sender is not None:
            self._sender.join(timeout=5.0)  # (the link is closed on failure: a send stops at once)
        if self.writer is not None:
            self.writer.let_go()
        self.hub.give(self.key, self.link)


def deadline_of(context) -> float:
    """The call's deadline on time.monotonic()'s clock (a call without one gets an hour)."""
    left = context.time_remaining() if context is not None else None
    return time.monotonic() + (left if left is not None else 3600.0)
