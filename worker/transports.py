"""Where a push's bytes go between a worker and one shard: three byte paths behind one interface.

``ShardChannel.push`` runs the gRPC stream of every push (header, buffers, step options, clip
exchange, result, errors, deadline, retries); a ``BytePath`` decides, for one attempt, where the
gradient goes and where the reply's slice comes from:

* ``InStream``: chunk frames inside the stream, both ways (``proto/wire.py``): works everywhere, and
  is the only path of sparse (top-k) and int8 pushes, whose positions and scales travel with them;
* ``ThroughSegment``: the worker's shared-memory segment (``runtime/shm.py``): the server reads the
  gradient from it and writes the slice into it; nothing but the header travels;
* ``OnLink``: the shard's byte link (``runtime/link.py``): one raw frame each way beside the stream,
  or, for a plain sync push to a shard that cuts its slice into parts (``OpenLinkResponse.part_stops``),
  one frame per part each way, the reply's parts read by a thread while later gradient parts go out.

The channel picks per attempt (``ShardChannel.path_for``): the segment while the shard can open
it, else the link while the shard offers one and it works, else the stream. Each path turns its
own failures into the push's error (a broken link is ``Unavailable``: the push is sent again, and
the shard answers the retry without applying it twice).
"""
from __future__ import annotations

import logging
import math
import secrets
import socket
import threading
import time
from typing import Callable, Iterator, Protocol

import torch

from ..proto import codec, wire
from ..proto.errors import NoLink, ShardpsError, Unavailable
from ..proto.gen import shardps_pb2 as pb
from ..proto.plan import part_bounds
from ..runtime.link import ACK, HELLO, MAGIC, LinkError, LinkSocket
from ..runtime.shm import Segment

log = logging.getLogger("shardps.worker")

INDICES_FIELD, SCALES_FIELD = 4, 7  # PushRequest.indices, PushRequest.scales
LINK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # a gradient the byte link carries (not int8)
LINK_CONNECT_S = 3.0  # longest the worker waits to open a byte link before pushing over gRPC instead
LINK_IDLE_S = 60.0  # a byte link that moves nothing this long within a push is given up
LINK_FAILURES = 3  # byte links that failed in a row before a shard's pushes go over gRPC for a while
LINK_BACKOFF_S = (10.0, 120.0)  # that while: the first, doubling up to the second, then links are tried again


class BytePath(Protocol):
    """One attempt's gradient and reply. Calls come in this order: ``header``, ``gradient`` (on the
    request stream's thread), ``reply_chunk`` per slice chunk and ``after_result`` once the
    PushResult is in (on the caller's thread), then ``done`` if the stream ended well, and
    ``ended`` always. ``failed`` maps a failed attempt's error."""

    name: str  # as the shard's status shows it: grpc, shm or tcp
    in_band: bool  # the gradient travels in the stream (the server reads up to it before the options)

    def header(self, header: pb.PushHeader) -> pb.PushHeader: ...

    def gradient(self, header: pb.PushHeader, deadline: float) -> Iterator[wire.Frame]: ...

    def reply_chunk(self, chunk) -> None: ...

    def after_result(self, header: pb.PushHeader, deadline: float) -> None: ...

    def done(self) -> None: ...

    def failed(self, error: ShardpsError) -> ShardpsError: ...

    def ended(self, answered: bool, server_done: bool) -> None: ...


class Landing:
    """Where a reply's slice lands: ``out`` itself, or, when it travels in a narrower dtype
    (``PushHeader.reply_dtype``), ``staging`` (the channel's, reused from push to push), widened into
    ``out`` once all of it arrived (never half of it)."""

    def __init__(self, out: torch.Tensor, staging: torch.Tensor | None = None):
        self.out, self.staging = out, staging

    @property
    def into(self) -> torch.Tensor:
        return self.out if self.staging is None else self.staging

    def widen(self) -> None:
        if self.staging is not None:
            self.out.copy_(self.staging.view(self.out.shape))


class InStream:
    """Chunks inside the gRPC stream: the gradient (``positions`` first for a sparse push) out,
    the slice back into ``out``."""

    name, in_band = "grpc", True

    def __init__(self, grad: torch.Tensor | None, out: torch.Tensor, chunk_bytes: int,
                 positions: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                 landing: Landing | None = None):
        self.grad, self.positions, self.scales, self.chunk_bytes = grad, positions, scales, chunk_bytes
        self.landing = landing or Landing(out)
        self.asm = codec.Assembler(out=self.landing.into)

    def header(self, header: pb.PushHeader) -> pb.PushHeader:
        return header

    def gradient(self, header: pb.PushHeader, deadline: float) -> Iterator[wire.Frame]:
        if self.positions is not None:
            for chunk in codec.views(self.positions, self.chunk_bytes):
                yield wire.Frame(None, chunk, field=INDICES_FIELD)
        if self.scales is not None:  # int8 values' per-block scales (proto/quant.py)
            for chunk in codec.views(self.scales, self.chunk_bytes):
                yield wire.Frame(None, chunk, field=SCALES_FIELD)
        if self.grad is not None:
            for chunk in codec.views(self.grad, self.chunk_bytes):
                yield wire.Frame(None, chunk)

    def reply_chunk(self, chunk) -> None:
        self.asm.add(chunk)

    def after_result(self, header: pb.PushHeader, deadline: float) -> None:
        pass

    def done(self) -> None:
        self.asm.finish()  # CodecError when the slice did not all come
        self.landing.widen()

    def failed(self, error: ShardpsError) -> ShardpsError:
        return error

    def ended(self, answered: bool, server_done: bool) -> None:
        pass


class ThroughSegment:
    """The worker's shared-memory segment: the server reads the gradient from it and writes the
    slice into the worker's values there (``runtime/shm.py``)."""

    name, in_band = "shm", False

    def __init__(self, segment: Segment):
        self.segment = segment

    def header(self, header: pb.PushHeader) -> pb.PushHeader:
        header.shm.CopyFrom(pb.ShmSegment(name=self.segment.name, nonce=self.segment.nonce))
        return header

    def gradient(self, header: pb.PushHeader, deadline: float) -> Iterator[wire.Frame]:
        return iter(())

    def reply_chunk(self, chunk) -> None:
        pass  # (a server sends none with a segment)

    def after_result(self, header: pb.PushHeader, deadline: float) -> None:
        pass

    def done(self) -> None:
        pass

    def failed(self, error: ShardpsError) -> ShardpsError:
        return error

    def ended(self, answered: bool, server_done: bool) -> None:
        if not answered and not server_done:
            self.segment.exposed = True  # given up before the reply: the server may still write it in, later


class OnLink:
    """The shard's byte link: the gradient as one frame after the header, the slice as one frame
    after the PushResult, both under this attempt's nonce. Any failure closes the link (the
    keeper counts it); the attempt then fails as Unavailable, so the push is sent again."""

    name, in_band = "tcp", False

    def __init__(self, keeper: "LinkKeeper", link: LinkSocket, grad: torch.Tensor, out: torch.Tensor, what: str,
                 landing: Landing | None = None, stops: list[int] | None = None):
        self.keeper, self.link, self.grad, self.what = keeper, link, grad, what
        self.landing = landing or Landing(out)
        self.nonce = secrets.randbits(64)
        self.broke: LinkError | None = None
        self.stops = stops  # a push in parts: each part's end offset in the slice
        self._reader: threading.Thread | None = None
        self._read_error: LinkError | None = None

    def header(self, header: pb.PushHeader) -> pb.PushHeader:
        h = pb.PushHeader()
        h.CopyFrom(header)
        h.link.nonce = self.nonce
        if self.stops is not None:
            h.link.parts = len(self.stops)
        return h

    def gradient(self, header: pb.PushHeader, deadline: float) -> Iterator[wire.Frame]:
        try:
            if self.stops is None:
                self.link.send(self.nonce, self.grad, deadline)
            else:  # the reply's parts come back while later parts go out: read them on a thread
                self._reader = threading.Thread(target=self._read_parts, args=(self.link.duplex(), deadline),
                                                daemon=True, name="shardps-parts-read")
                self._reader.start()
                for lo, hi in part_bounds(self.stops):
                    self.link.send(self.nonce, self.grad[lo:hi], deadline)
        except LinkError as exc:  # the server refused the push (it closes the link), or the link broke
            self.broke = exc
        return iter(())

    def _read_parts(self, reader: LinkSocket, deadline: float) -> None:
        into = self.landing.into
        try:
            for lo, hi in part_bounds(self.stops or []):
                reader.receive(self.nonce, into[lo:hi], deadline)
        except LinkError as exc:
            self._read_error = exc
        finally:
            reader.let_go()

    def reply_chunk(self, chunk) -> None:
        pass

    def after_result(self, header: pb.PushHeader, deadline: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._reader.is_alive() or self._read_error is not None:
                raise self._broken(self._read_error or LinkError("the reply's parts did not all arrive in time"))
        else:
            try:
                self.link.receive(self.nonce, self.landing.into, deadline)
            except LinkError as exc:
                raise self._broken(exc) from None
        self.landing.widen()

    def done(self) -> None:
        if self.broke is not None:  # the server answered although the gradient did not all go out: trust neither
            raise self._broken(self.broke)
        self.keeper.worked()

    def failed(self, error: ShardpsError) -> ShardpsError:
        """The stream's error (the path's own, from ``after_result``/``done``, are counted there)."""
        if isinstance(error, (NoLink, Unavailable)):
            self.keeper.failed(f"push on the byte link failed: {error}")
        else:  # a refusal on its merits (rolled back, membership changed, ...): not the link's fault
            self.keeper.drop()  # (the server closed it: it closes the link whenever a push on it fails)
        if isinstance(error, NoLink):  # the server lost the link (restarted, replaced it): send it again
            return Unavailable(f"{error} (retrying)")
        return error

    def ended(self, answered: bool, server_done: bool) -> None:
        reader = self._reader
        if reader is not None and reader.is_alive():  # the attempt failed: nothing may land after it ended
            self.link.close()
            reader.join(timeout=LINK_CONNECT_S)

    def _broken(self, exc: LinkError) -> Unavailable:
        self.keeper.failed(f"the byte link to {self.keeper.address()} broke: {exc}")
        return Unavailable(f"{self.what}: the byte link broke ({exc}); retrying")


class LinkKeeper:
    """One shard's byte link for one worker: opened on first use (``open_link`` asks the shard for a
    port and ticket: ``OpenLink``), kept while it works, closed on any failure, and backed off for
    LINK_BACKOFF_S after LINK_FAILURES failures in a row (a partition, a firewall); never asked
    again of a shard that offers none, until ``reset`` (the shard moved)."""

    def __init__(self, shard_id: int, address: Callable[[], str],
                 open_link: Callable[[float, int], tuple[str, int, bytes, list[int]]]):
        self.shard_id, self.address, self._open_link = shard_id, address, open_link
        self.enabled = False
        self._link: LinkSocket | None = None
        self.stops: list[int] | None = None  # where the shard cuts a push in parts (None: it takes them whole)
        self._failures = 0  # in a row
        self._again = 0.0  # time.monotonic() from which links are tried again (math.inf: never)
        self._backoff = LINK_BACKOFF_S[0]

    @property
    def on_link(self) -> bool:
        return self._link is not None and not self._link.closed

    @property
    def refused(self) -> bool:
        """The shard offers no link (never asked again until ``reset``)."""
        return self._again == math.inf

    def get(self, timeout: float, epoch: int) -> LinkSocket | None:
        """The open link, or a new one; None where links are off, refused or backed off, or one cannot
        be opened now (the push then goes inside the stream)."""
        if not self.enabled or time.monotonic() < self._again:
            return None
        if self.on_link:
            return self._link
        try:
            self._link = self._connect(min(timeout, LINK_CONNECT_S), epoch)
        except NoLink as exc:
            self._again = math.inf
            log.info("shard %d: %s", self.shard_id, exc)
        except (ShardpsError, OSError, LinkError) as exc:
            self.failed(f"could not open a byte link to {self.address()}: {exc}")
        return self._link

    def _connect(self, timeout: float, epoch: int) -> LinkSocket:
        host, port, ticket, stops = self._open_link(timeout, epoch)
        self.stops = stops if len(stops) > 1 else None
        if not host:
            raise NoLink(f"{self.address()} is not a TCP address")
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.sendall(HELLO.pack(MAGIC, ticket))
            if sock.recv(1) != ACK:
                raise LinkError("the server closed the link at its hello (ticket refused)")
        except BaseException:
            sock.close()
            raise
        return LinkSocket(sock, LINK_IDLE_S)

    def failed(self, why: str) -> None:
        self.drop()
        self._failures += 1
        if self._failures >= LINK_FAILURES:
            log.warning("shard %d: %s; its pushes go over gRPC for %.0f s (%d byte links failed in a row)",
                        self.shard_id, why, self._backoff, LINK_FAILURES)
            self._again = time.monotonic() + self._backoff
            self._backoff = min(LINK_BACKOFF_S[1], 2 * self._backoff)
            self._failures = 0
        else:
            log.info("shard %d: %s", self.shard_id, why)

    def worked(self) -> None:
        self._failures, self._backoff = 0, LINK_BACKOFF_S[0]

    def drop(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def reset(self) -> None:
        """The shard moved to another server: forget this one's link and its verdicts."""
        self.drop()
        self._failures, self._again, self._backoff = 0, 0.0, LINK_BACKOFF_S[0]
