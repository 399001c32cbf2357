"""Push/pull fan-out over the shard plan: one channel per shard, all shards at once.

Each push is one bidirectional stream per shard: a header, then the gradient slice
in ~1 MiB chunks; the reply streams the updated slice straight into the caller's
flat buffer. Chunk messages go through the byte-compatible fast codec in
``proto/wire.py`` (one copy out of the tensor, zero-copy views in). Every call has
a deadline, and a call that fails transiently (server restarting or paused, reply
lost) is sent again whole by ``runtime.retry.Retrier``: the shard applies a push at
most once and answers a repeat like the first try, so retrying is exactly-once.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, TypeVar

import grpc
import torch

from ..proto import codec, wire
from ..proto.errors import NoSharedMemory, ShardpsError, Unavailable, WaitTimeout
from ..runtime.link import split_address
from ..proto.gen import shardps_pb2 as pb
from ..proto.messages import ShardInfo
from ..runtime.retry import Retrier
from ..runtime.rpc import WORKER_METADATA, open_channel, port_refuses
from ..runtime.status import error_from_rpc, handler_ended
from ..runtime.shm import Segment
from .flat import Staged
from .transports import LINK_DTYPES, BytePath, InStream, Landing, LinkKeeper, OnLink, ThroughSegment

log = logging.getLogger("shardps.worker")
T = TypeVar("T")
# After a transport failure, how long a fresh connection to the server's port may take to tell a gone
# process (refused at once) from a live one: a replicated shard's worker then names it to the coordinator.
REFUSAL_PROBE_S = 0.2

BUFFERS_PUSH_FIELD, BUFFERS_REPLY_FIELD = 6, 4  # PushRequest.buffers, PushResponse.buffers


@dataclass(frozen=True)
class PushReply:
    version: int  # shard version of the slice now in the model
    staleness: int  # async: how many updates the gradient missed
    duplicate: bool  # a retry the shard had seen; not applied again
    dropped: bool  # late for a closed step (backup workers); not applied
    next_step: int  # step number of this worker's next push
    applied_lr: float  # lr the shard applied (0 if it applied nothing for this push)
    epoch: int = 0  # the newest membership epoch the shard knows
    skipped: bool = False  # the step was skipped everywhere (an fp16 overflow on some worker)
    buffers: bytes | None = None  # shard 0, broadcast buffers: rank 0's buffers of the step


class ClipExchange:
    """One clipped step's total norm, from every shard's ClipPartial.

    Each shard's push stream reports its partial; once all have, the total is
    ``(sum of partials)^(1/p)`` (the max for p = inf) and every stream sends it back
    as a ClipTotal. Streams whose shard answered without a partial (the step was
    skipped, or the push dropped) end the exchange: ``total`` is then None.
    """

    def __init__(self, shards: int, step: int, norm_type: float, timeout: float):
        self.shards, self.step, self.norm_type, self.timeout = shards, step, norm_type, timeout
        self._partials: dict[int, float] = {}
        self._cond = threading.Condition()
        self.total: float | None = None
        self.broken = False  # some shard answered without a partial: no total will come

    def report(self, shard: int, partial: float) -> None:
        with self._cond:
            self._partials[shard] = partial
            if len(self._partials) == self.shards and self.total is None:
                parts = [self._partials[k] for k in sorted(self._partials)]
                self.total = max(parts) if math.isinf(self.norm_type) else sum(parts) ** (1.0 / self.norm_type)
                self._cond.notify_all()

    def answered_without_partial(self) -> None:
        with self._cond:
            if self.total is None:
                self.broken = True
                self._cond.notify_all()

    def wait_total(self, ended: threading.Event) -> float | None:
        """The total, once known; None if this attempt's stream ended first or no total will come."""
        with self._cond:
            self._cond.wait_for(lambda: self.total is not None or self.broken or ended.is_set(), timeout=self.timeout)
            return self.total

    def wait(self, check: Callable[[], None] = lambda: None) -> float | None:
        """Block until the total is known (or no total will come: None); ``check`` runs every half
        second meanwhile and may raise to give up."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while not self._cond.wait_for(lambda: self.total is not None or self.broken, timeout=0.5):
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"the shards' clip norms for step {self.step} did not all arrive within "
                                      f"{self.timeout:.0f}s")
                check()
            return self.total

    def ended(self, ended: threading.Event) -> None:
        with self._cond:
            ended.set()
            self._cond.notify_all()


class ShardChannel:
    """Calls to one shard server."""

    def __init__(self, info: ShardInfo, job_id: str, fingerprint: str, chunk_bytes: int, retry: Retrier,
                 worker_id: int = -1, security=None, locate: "Locator | None" = None):
        self.info, self.chunk_bytes, self.retry = info, chunk_bytes, retry
        self.security, self.locate = security, locate
        self.worker_id = worker_id
        self.parts = False  # the job is plain sync: a push may go in parts (PSClient's ``parts``)
        # The shard's byte link (enabled by PSClient's ``links``): pushes go on it while it works.
        self.links = LinkKeeper(info.range.shard_id, lambda: self.info.address, self._open_link)
        self._moves = 0  # times the shard moved to another server (calls in flight then are retried there)
        self._moved = threading.Condition()  # guards a move; wakes retries waiting out a backoff
        self.failing = False  # the last attempt found the server unavailable (the plan watcher looks more often)
        self.closed = False  # close() was called: a cancelled call is ours, not the server's
        self._staging: torch.Tensor | None = None  # a narrow reply's landing (``_landing``)
        self._metadata = ((WORKER_METADATA, str(worker_id)),) if worker_id >= 0 else ()
        r = info.range
        self.target = pb.ShardTarget(job_id=job_id, fingerprint=fingerprint, shard_id=r.shard_id, start=r.start, stop=r.stop)
        self._dial(info.address)

    def _dial(self, address: str) -> None:
        self._channel = ch = open_channel(address, self.security)
        method = "/shardps.v1.ShardService/"
        self._init = ch.stream_unary(method + "InitShard", request_serializer=wire.serializer(pb.InitShardRequest),
                                     response_deserializer=pb.InitShardResponse.FromString)
        self._push = ch.stream_stream(method + "Push", request_serializer=wire.serializer(pb.PushRequest),
                                      response_deserializer=wire.deserializer(pb.PushResponse))
        self._pull = ch.unary_stream(method + "Pull", request_serializer=pb.PullRequest.SerializeToString,
                                     response_deserializer=wire.deserializer(pb.PullResponse))
        self._load = ch.stream_unary(method + "LoadState", request_serializer=wire.serializer(pb.LoadStateRequest),
                                     response_deserializer=pb.LoadStateResponse.FromString)
        self._link_call = ch.unary_unary(method + "OpenLink", request_serializer=pb.OpenLinkRequest.SerializeToString,
                                         response_deserializer=pb.OpenLinkResponse.FromString)
        self._status = ch.unary_unary(method + "GetShardStatus",
                                      request_serializer=pb.GetShardStatusRequest.SerializeToString,
                                      response_deserializer=pb.GetShardStatusResponse.FromString)

    def close(self) -> None:
        self.closed = True
        self.links.drop()
        self._channel.close()

    def _open_link(self, timeout: float, epoch: int) -> tuple[str, int, bytes, list[int]]:
        """Ask the shard for a byte link: (host to dial, port, one-time ticket, where it cuts a push in
        parts: ``OpenLinkResponse.part_stops``, checked)."""
        request = pb.OpenLinkRequest(target=self.target, worker_id=self.worker_id, epoch=epoch)
        try:
            reply = self._link_call(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self._what("OpenLink")) from None
        stops = [int(s) for s in reply.part_stops]
        if stops and (stops[-1] != self.info.range.numel or any(b <= a for a, b in zip([0, *stops], stops))):
            stops = []  # (not this shard's slice cut in order: push whole)
        return split_address(self.info.address), reply.port, reply.ticket, stops

    def path_for(self, grad: torch.Tensor | None, out: torch.Tensor, timeout: float, epoch: int,
                 positions: torch.Tensor | None = None, shm: Segment | None = None,
                 scales: torch.Tensor | None = None, reply_dtype: torch.dtype = torch.float32,
                 whole: bool = True) -> BytePath:
        """Where one attempt's bytes go: the segment, else the byte link (a dense float gradient on the CPU,
        while the shard offers one and it works; in parts where the shard cuts its slice and not ``whole``),
        else inside the stream (also sparse and int8 pushes)."""
        if shm is not None:
            return ThroughSegment(shm)
        if grad is not None and positions is None and scales is None and grad.device.type == "cpu" \
                and grad.dtype in LINK_DTYPES:
            link = self.links.get(timeout, epoch)
            if link is not None:
                return OnLink(self.links, link, grad, out, self._what("Push"), self._landing(out, reply_dtype),
                              None if whole else self.links.stops)
        return InStream(grad, out, self.chunk_bytes, positions, scales, self._landing(out, reply_dtype))

    def _landing(self, out: torch.Tensor, dtype: torch.dtype) -> Landing:
        """Where an attempt's reply lands: ``out``, or for a narrow reply this channel's staging buffer
        (one per channel, reused: a shard's attempts run one after another)."""
        if dtype is torch.float32:
            return Landing(out)
        if self._staging is None or self._staging.dtype != dtype or self._staging.numel() != out.numel():
            self._staging = torch.empty(out.numel(), dtype=dtype)
        return Landing(out, self._staging)

    def _what(self, rpc: str) -> str:
        return f"{rpc} to shard {self.info.range.shard_id} at {self.info.address}"

    def _call(self, rpc: str, attempt: Callable[[], T]) -> T:
        """``attempt`` under the retry policy; after an UNAVAILABLE attempt the shard's address is
        looked up again (a replicated shard's backup may have been promoted on another server)."""
        seen = [self._moves]  # moves when the last attempt started

        def one() -> T:
            seen[0] = moves = self._moves
            try:
                return attempt()
            except Unavailable:
                raise
            except ShardpsError as exc:
                if exc.code == "CANCELLED" and self._moves == moves and not self.closed:
                    # Not ours: the server ended a stream that stalled past its limit (a partition, a link that
                    # healed late); it applied nothing it had not answered, so the whole call goes again.
                    raise Unavailable(f"{exc} (the server cancelled the stalled call; retrying)") from None
                if self._moves == moves:
                    raise
                # The shard moved while this call waited (its old channel was closed under it): again, there.
                raise Unavailable(f"{exc} (the shard moved to {self.info.address}; retrying there)") from None

        def rerouting():
            try:
                reply = one()
            except Unavailable as exc:
                self.failing = True
                if self.locate is not None and exc.from_transport and port_refuses(self.info.address, REFUSAL_PROBE_S):
                    self.locate.suspect(self.info.address)  # its process is gone: say so at once
                if not self._follow():
                    raise
                # Moved: the new server at once, not after a backoff. (A shard that moves again meanwhile
                # closes this attempt's channel too: that CANCELLED is retried as well, never fatal.)
                reply = one()
            self.failing = False
            return reply

        def backoff(seconds: float) -> None:  # ends early when the shard moves (the plan watcher saw it)
            with self._moved:
                self._moved.wait_for(lambda: self._moves != seen[0], timeout=seconds)

        return self.retry.call(self._what(rpc), rerouting, backoff)

    def _follow(self) -> bool:
        """Whether the shard moved (the channel now leads to its new server)."""
        if self.locate is None:
            return False
        address = self.locate.address(self.info.range.shard_id)
        return bool(address) and self.move(address)

    def move(self, address: str) -> bool:
        """Lead this shard's calls to ``address`` (its new primary); calls in flight on the old
        channel are cancelled and retried there. Returns whether it moved."""
        with self._moved:
            if address == self.info.address:
                return False
            log.warning("shard %d moved from %s to %s", self.info.range.shard_id, self.info.address, address)
            old = self._channel
            self.info = ShardInfo(self.info.range, address, self.info.backups)
            self.links.reset()  # (a push using its link fails and is retried on the new server)
            self._dial(address)
            self._moves += 1
            self._moved.notify_all()
        old.close()  # a call still waiting on a paused or partitioned old primary gives up now
        return True

    def version(self, timeout: float) -> int | None:
        """The shard's version now, as the server this channel leads to holds it (one attempt; None when
        it cannot say: unreachable, or no copy of the shard there)."""
        request = pb.GetShardStatusRequest(job_id=self.target.job_id, shard_id=self.info.range.shard_id)
        try:
            reply = self._status(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError:
            return None
        return reply.version if reply.initialized and reply.job_id == self.target.job_id else None

    def init(self, params: torch.Tensor, worker_id: int, timeout: float, buffers: bytes | None = None,
             replace: bool = False) -> tuple[int, bool]:
        def requests():
            yield pb.InitShardRequest(target=self.target, worker_id=worker_id, replace=replace)
            if buffers is not None:
                for chunk in codec.views(torch.frombuffer(bytearray(buffers), dtype=torch.uint8), self.chunk_bytes):
                    yield wire.Frame(None, chunk, field=5)  # InitShardRequest.buffers
            for chunk in codec.views(params, self.chunk_bytes):
                yield wire.Frame(None, chunk)

        def attempt():
            try:
                return self._init(requests(), timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, self._what("InitShard")) from None

        reply = self._call("InitShard", attempt)
        return reply.version, reply.already_initialized

    def push(self, header: pb.PushHeader, grad: torch.Tensor | None, out: torch.Tensor, timeout: float,
             commit: Callable[[], pb.StepOptions] | None = None, positions: torch.Tensor | None = None,
             clip: ClipExchange | None = None, buffers: bytes | None = None, shm: Segment | None = None,
             scales: torch.Tensor | None = None) -> PushReply:
        """Push ``grad`` (this shard's slice, or with ``positions`` only the values at those
        int32 positions; None: an overflow vote; int8 values with their ``scales``, ``proto/quant.py``)
        and write the returned slice into ``out``.

        The header carries the step options, or ``commit()`` supplies them in a PushCommit
        after the gradient (it may block until the caller knows them). A clipped push
        reports the shard's ClipPartial to ``clip`` and sends back its total. ``buffers``
        (shard 0, rank 0) goes first. With ``shm`` the gradient is read from, and the reply
        written into, the worker's shared segment: only the header travels (NoSharedMemory when
        the server cannot open it). Otherwise a dense CPU gradient goes on the shard's byte link
        when ``links.enabled`` and the shard offers one (``runtime/link.py``), and the reply's slice comes
        back on it; a link that fails is closed and the push is sent again (exactly once).
        """
        header.target.CopyFrom(self.target)
        shard_id = self.info.range.shard_id

        def requests(ended: threading.Event, h: pb.PushHeader, path: BytePath, deadline: float, commit):
            yield pb.PushRequest(header=h)
            if buffers is not None:
                for chunk in codec.views(torch.frombuffer(bytearray(buffers), dtype=torch.uint8), self.chunk_bytes):
                    yield wire.Frame(None, chunk, field=BUFFERS_PUSH_FIELD)
            yield from path.gradient(h, deadline)
            if commit is not None:
                yield pb.PushRequest(commit=pb.PushCommit(options=commit()))
            if clip is not None:
                total = clip.wait_total(ended)
                if total is not None and not ended.is_set():
                    yield pb.PushRequest(clip_total=pb.ClipTotal(step=h.step, total_norm=total))

        def attempt():  # the whole push again: the shard applies it at most once
            path = self.path_for(grad, out, timeout, header.epoch, positions, shm, scales,
                                 codec.torch_dtype(header.reply_dtype) if header.reply_dtype else torch.float32,
                                 whole=not self.parts or commit is not None or clip is not None
                                 or header.options.overflow)
            h, pushed_commit = path.header(header), commit
            if not path.in_band and buffers is not None and commit is None and h.HasField("options"):
                # The stream has no gradient to end the buffers, and the server stops reading at the step
                # options: the buffers go before them, so the options follow in a PushCommit.
                h, options = _without_options(h)
                pushed_commit = lambda: options  # noqa: E731
            result, blob, ended = None, None, threading.Event()
            deadline = time.monotonic() + timeout
            server_done = False  # the stream ended, or the server's own status said its handler did
            try:
                for frame in self._push(requests(ended, h, path, deadline, pushed_commit), timeout=timeout,
                                        metadata=self._metadata):
                    fields = frame.fields
                    if fields is not None and fields.HasField("clip_partial") and clip is not None:
                        clip.report(shard_id, fields.clip_partial.partial)
                    if fields is not None and fields.HasField("result"):
                        result = fields.result
                        if clip is not None:
                            clip.answered_without_partial()  # no-op once the total is known
                        path.after_result(h, deadline)
                    if frame.chunk is not None:
                        if frame.field == BUFFERS_REPLY_FIELD:
                            blob = blob or codec.Assembler(expect_dtype=torch.uint8)
                            blob.add(frame.chunk)
                        else:
                            path.reply_chunk(frame.chunk)
                server_done = True
            except grpc.RpcError as exc:
                server_done = handler_ended(exc)
                raise path.failed(error_from_rpc(exc, self._what("Push"))) from None
            finally:
                path.ended(result is not None, server_done)
                if clip is not None:
                    clip.ended(ended)  # a request stream waiting for the total gives up
            path.done()
            return result, blob.finish().numpy().tobytes() if blob is not None else None

        result, blob = self._call("Push", attempt)
        return PushReply(result.version, result.staleness, result.duplicate, result.dropped, result.next_step,
                         result.applied_lr, result.epoch, result.skipped, blob)

    def pull(self, out: torch.Tensor, timeout: float, min_version: int = 0,
             buffers: bool = False, epoch: int = 0) -> tuple[int, bytes | None]:
        """Write the current slice (once the shard reached ``min_version``) into ``out``; return its
        version and (with ``buffers``, shard 0) the job's buffers file. With ``epoch`` (the view the
        caller knows), a rollback or a newer view ends the wait with RolledBack / MembershipChanged."""
        request = pb.PullRequest(target=self.target, min_version=min_version, include_buffers=buffers, epoch=epoch)

        def attempt():
            asm, version, blob = codec.Assembler(out=out), 0, None
            try:
                for frame in self._pull(request, timeout=timeout, metadata=self._metadata):
                    if frame.fields is not None and frame.fields.version:
                        version = frame.fields.version
                    if frame.chunk is None:
                        continue
                    if frame.fields is not None and frame.fields.name == "buffers":
                        blob = blob or codec.Assembler(expect_dtype=torch.uint8)
                        blob.add(frame.chunk)
                    else:
                        asm.add(frame.chunk)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, self._what("Pull")) from None
            asm.finish()
            return version, blob.finish().numpy().tobytes() if blob is not None else None

        return self._call("Pull", attempt)

    def pull_state(self, timeout: float) -> tuple[int, dict[str, torch.Tensor], str]:
        """(version, {"param": slice, "optim/<i>/<key>": tensor, "buffers": uint8, ...}, the groups'
        hyper-parameters as JSON) at one instant."""
        request = pb.PullRequest(target=self.target, include_optimizer_state=True, include_buffers=True)

        def attempt():
            tensors: dict[str, codec.Assembler] = {}
            version, hyper = 0, ""
            try:
                for frame in self._pull(request, timeout=timeout, metadata=self._metadata):
                    if frame.fields is not None and frame.fields.version:
                        version, hyper = frame.fields.version, frame.fields.hyperparams_json
                    if frame.chunk is not None:
                        name = (frame.fields.name if frame.fields is not None else "") or "param"
                        tensors.setdefault(name, codec.Assembler()).add(frame.chunk)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, self._what("Pull")) from None
            return version, {name: asm.finish() for name, asm in tensors.items()}, hyper

        return self._call("Pull", attempt)

    def load_state(self, tensors: dict[str, torch.Tensor], hyper_json: str, timeout: float) -> int:
        """Hand this shard's pieces their optimizer state (``optim/<i>/<key>``); returns the version."""
        def requests():
            yield pb.LoadStateRequest(target=self.target, hyperparams_json=hyper_json)
            for name, tensor in tensors.items():
                for chunk in codec.views(tensor.detach().to("cpu", torch.float32).contiguous(), self.chunk_bytes):
                    yield wire.Frame(pb.LoadStateRequest(name=name), chunk)

        def attempt():
            try:
                return self._load(requests(), timeout=timeout, metadata=self._metadata).version
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, self._what("LoadState")) from None

        return self._call("LoadState", attempt)


class Locator:
    """Where each shard is served now, asked of the coordinator at most every ``every`` seconds
    (every shard's channel asks after a failed attempt; one answer serves them all), or at once
    after a call found its server's connection refused or reset (``suspect``)."""

    def __init__(self, fetch_plan: Callable[[list[str]], list[ShardInfo]], every: float = 0.25):
        """``fetch_plan(suspects)``: the job's plan from the coordinator, which first checks the
        servers named (``CoordinatorClient.job``'s ``suspect``)."""
        self._fetch, self.every = fetch_plan, every
        self._plan: dict[int, str] = {}
        self._at = -math.inf
        self._suspects: set[str] = set()  # to name in the next question
        self._reported: dict[str, float] = {}  # address -> when it was last named (at most once per ``every``)
        self._lock = threading.Lock()

    def suspect(self, address: str) -> None:
        """A call to ``address`` found the connection refused or reset: the next ``plan()`` asks the
        coordinator at once and names it (a dead primary's shards then move before the answer)."""
        with self._lock:
            now = time.monotonic()
            if now - self._reported.get(address, -math.inf) >= self.every:
                self._reported[address] = now
                self._suspects.add(address)
                self._at = -math.inf

    def address(self, shard_id: int) -> str:
        return self.plan().get(shard_id, "")

    def plan(self) -> dict[int, str]:
        """shard -> its primary's address (asked again when the last answer is older than ``every``)."""
        with self._lock:
            if time.monotonic() - self._at >= self.every:
                self._at = time.monotonic()
                suspects, self._suspects = sorted(self._suspects), set()
                try:
                    self._plan = {s.range.shard_id: s.address for s in self._fetch(suspects)}
                except Exception as exc:  # noqa: BLE001 - the coordinator restarting: keep the old answer
                    log.info("could not ask the coordinator where the shards are: %s", exc)
            return dict(self._plan)

    def watch(self, shards: list["ShardChannel"], stop: threading.Event, every: float = 1.0,
              failing_every: float = 0.25) -> None:
        """Until ``stop``: move each shard's channel when its primary moves (every ``every`` s, or
        ``failing_every`` while a shard's server is unavailable: a failover is under way, and its
        calls wait out their backoff only until the move). A call blocked on a primary that stopped
        answering without closing its connection (paused, partitioned) would otherwise wait for its
        deadline or for keepalive to notice."""
        while not stop.wait(failing_every if any(s.failing for s in shards) else every):
            plan = self.plan()
            for shard in shards:
                address = plan.get(shard.info.range.shard_id, "")
                if address:
                    shard.move(address)


class PSClient:
    """All shards of one job; every fan-out call runs on every shard concurrently."""

    def __init__(self, plan: list[ShardInfo], job_id: str, fingerprint: str, chunk_bytes: int, timeout: float,
                 compressor=None, retry: Retrier | None = None, worker_id: int = -1, security=None,
                 segment: Segment | None = None, locate: Locator | None = None, links: bool = False,
                 parts: bool = False):
        """``segment``: this worker's shared memory; pushes to a shard go through it until that
        shard refuses it (another host), then on the shard's byte link (with ``links``) or over gRPC.
        ``parts``: the job is plain sync and unreplicated, so pushes on a link may go in parts."""
        self.plan, self.timeout, self.compressor = plan, timeout, compressor
        self.segment = segment if compressor is None else None  # compressed pushes (top-k, int8): gRPC
        self.shm_ok = [self.segment is not None] * len(plan)
        self.retry = retry if retry is not None else Retrier(budget=timeout)
        self.shards = [ShardChannel(info, job_id, fingerprint, chunk_bytes, self.retry, worker_id, security, locate)
                       for info in plan]
        for shard in self.shards:
            shard.links.enabled, shard.parts = links, parts
        self._pool = ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="shardps-push")
        self._stop = threading.Event()
        if locate is not None:  # a replicated job: follow primaries that move
            threading.Thread(target=locate.watch, args=(self.shards, self._stop), name="shardps-plan-watch",
                             daemon=True).start()

    def use_segment(self, segment: Segment | None) -> None:
        """Push through ``segment`` from now on (the worker moved to a new one; None: plain memory,
        every push over gRPC). Between steps only: no push may be in flight."""
        if self.segment is not None:
            self.segment = segment
            if segment is None:
                self.shm_ok = [False] * len(self.shm_ok)

    def close(self) -> None:
        self._stop.set()
        for shard in self.shards:  # closing a channel cancels its calls still in flight
            shard.close()
        self._pool.shutdown(wait=True)

    def abort(self, reason: str) -> None:
        """Give up on every call in flight: no more retries, and the calls are cancelled (the
        channels close; this client is unusable afterwards)."""
        self.retry.abort(reason)
        self._stop.set()
        for shard in self.shards:
            shard.close()

    def _fan_out(self, fn):
        return results([self._pool.submit(fn, shard) for shard in self.shards])

    @staticmethod
    def _slice(flat: torch.Tensor, shard: ShardChannel) -> torch.Tensor:
        return flat[shard.info.range.start:shard.info.range.stop]

    def init(self, values: torch.Tensor, worker_id: int, buffers: bytes | None = None,
             replace: bool = False) -> list[tuple[int, bool]]:
        """Upload the starting parameters (shard 0 also takes ``buffers``); ``replace`` overwrites
        an initialised job's (a deliberate edit)."""
        return self._fan_out(lambda s: s.init(self._slice(values, s), worker_id, self.timeout,
                                              buffers if s.info.range.shard_id == 0 else None, replace))

    def submit_push(self, shard: "ShardChannel", grads: Staged | None, values: torch.Tensor,
                    header: pb.PushHeader, base_version: int, commit: Callable[[], pb.StepOptions] | None = None,
                    clip: ClipExchange | None = None, buffers: bytes | None = None,
                    landed: Callable[[int, int], None] | None = None):
        """Start one shard's push-pull on the pool; returns its Future[PushReply]. ``grads`` is the
        shard's gradient staged by ``FlatParams.stage_grads`` (None: an overflow vote); the pool
        thread waits for it, so one shard's bytes go out while the next shard's are still being
        copied off the GPU. The header carries the step options unless ``commit`` supplies them
        after the gradient; ``landed(start, stop)`` runs once the reply is in ``values``.

        With a compressor (top-k, int8), the shard's slice is compressed on the pool thread too.
        """
        h = pb.PushHeader()
        h.CopyFrom(header)
        h.base_version = base_version
        r = shard.info.range
        blob = buffers if r.shard_id == 0 else None

        k = self.shards.index(shard)

        def task():
            out = self._slice(values, shard)
            if grads is not None:
                grads.wait()
            if self.shm_ok[k]:
                try:
                    return shard.push(h, None, out, self.timeout, commit, None, clip, blob, shm=self.segment)
                except NoSharedMemory as exc:  # another host (or /dev/shm): this shard takes the bytes over gRPC
                    self.shm_ok[k] = False
                    log.info("shard %d: %s; pushing over gRPC", r.shard_id, exc)
                    h.ClearField("shm")
            if grads is None:
                return shard.push(h, None, out, self.timeout, commit, None, clip, blob)
            wire = grads.wire()
            if self.compressor is not None and r.numel:
                sent = self.compressor.compress(wire, r.start, r.stop)
                return shard.push(h, sent.values, out, self.timeout, commit, sent.positions, clip, blob,
                                  scales=sent.scales)
            return shard.push(h, self._slice(wire, shard), out, self.timeout, commit, None, clip, blob)

        def push_and_land():
            reply = task()
            if landed is not None:
                landed(r.start, r.stop)
            return reply

        return self._pool.submit(push_and_land)

    def pull(self, values: torch.Tensor, min_version: int = 0, buffers: bool = False,
             epoch: int = 0) -> tuple[list[int], bytes | None]:
        """Every shard's current slice into ``values``; returns the versions and (with ``buffers``)
        the job's buffers file from shard 0. ``epoch``: as ``ShardChannel.pull``'s."""
        replies = self._fan_out(lambda s: s.pull(self._slice(values, s), self.timeout, min_version,
                                                 buffers and s.info.range.shard_id == 0, epoch))
        return [v for v, _ in replies], next((b for _, b in replies if b is not None), None)

    def pull_state(self) -> list[tuple[int, dict[str, torch.Tensor], str]]:
        return self._fan_out(lambda s: s.pull_state(self.timeout))

    def load_state(self, per_shard: list[dict[str, torch.Tensor]], hyper_json: str) -> list[int]:
        return results([self._pool.submit(s.load_state, per_shard[k], hyper_json, self.timeout)
                        for k, s in enumerate(self.shards)])


def results(futures: list[Future]) -> list:
    """Every future's result, waiting for all of them before raising the first failure: a
    caller that recovers from the error (pull and go on) must not race calls still writing
    into its buffers."""
    wait(futures)
    return [f.result() for f in futures]


def _without_options(header: pb.PushHeader) -> tuple[pb.PushHeader, pb.StepOptions]:
    """A copy of ``header`` without its step options, and the options."""
    bare = pb.PushHeader()
    bare.CopyFrom(header)
    bare.ClearField("options")
    return bare, header.options
