"""The ShardService gRPC adapter: decode messages, call the core, encode replies.

No update logic lives here: ``ShardNode``/``ShardState`` decide, this module only
translates, and every domain error becomes a status code through ``translate_errors``.
The chunk-carrying messages use the byte-compatible fast codec in ``proto/wire.py``
(``add_to_server`` registers it), so tensor bytes are copied once on the way out
and once on the way in.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Iterator

import grpc
import torch

from ..proto import buffers as buffer_file
from ..proto import codec, quant, wire
from ..proto import defaults as D
from ..proto.plan import part_stops
from ..proto.errors import FailedPrecondition, InvalidArgument, NeedsCopy, NoLink, ShardpsError, UnknownWorker
from ..proto.gen import shardps_pb2 as pb
from ..proto.messages import StepOpts, mode_to_pb, view_from_pb
from ..runtime.rpc import open_channel
from ..runtime.status import error_from_rpc, translate_errors
from .steps import Push
from ..runtime.limits import WaitSlots
from ..runtime.process import release_free_memory
from . import parts
from .byte_paths import (REPLY_DTYPES, LinkPath, PartsPath, SegmentPath, ServerPath, StreamPath, as_fp32,
                         deadline_of)
from .links import LinkHub
from .node import MAX_EPOCH_JUMP, ShardNode, Target
from . import replica as replicas

log = logging.getLogger("shardps.server")
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)  # wire dtypes a push may use (int8: with scales)
SERVICE = "shardps.v1.ShardService"
INDICES_FIELD = 4  # PushRequest.indices
SCALES_FIELD = 7  # PushRequest.scales
BUFFERS_PUSH_FIELD = 6  # PushRequest.buffers
BUFFERS_INIT_FIELD = 5  # InitShardRequest.buffers
BUFFERS_REPLY_FIELD = 4  # PushResponse.buffers
BUFFERS_NAME = "buffers"  # PullResponse.name of the buffers file
MAX_WAIT_MS = 3_600_000  # longest a Checkpoint call may wait for its version (an hour)
STATUS_WORKERS = 1024  # per-worker entries GetShardStatus returns (the most recent ids)


def _target(msg: pb.ShardTarget) -> Target:
    return Target(msg.job_id, msg.fingerprint, msg.shard_id, msg.start, msg.stop)


class ShardServicer:
    def __init__(self, node: ShardNode, chunk_bytes: int, wait_timeout: float, threads: int = 64,
                 links: LinkHub | None = None, links_off: str = "it was started with --data-port -1",
                 link_parts: int = D.LINK_PARTS):
        """``links``: the byte links workers may push through (None: none offered; ``links_off`` says why);
        ``link_parts``: a sync push on a link comes in up to this many parts (1: whole)."""
        self.node = node
        self.links, self.links_off, self.link_parts = links, links_off, link_parts
        self.chunk_bytes = chunk_bytes
        self.wait_timeout = wait_timeout  # how long calls wait for the shard to be initialised
        self._push_frames = wire.serializer(pb.PushResponse)
        # Waits that park a handler thread, capped so that pushes and health checks always find one.
        self.pull_waits = WaitSlots(max(2, threads // 8), "pulls waiting for a version")
        self.checkpoint_waits = WaitSlots(max(2, threads // 8), "checkpoint requests")
        self.sender = ReplicaSender(chunk_bytes)
        node.send = self.sender.send
        self.incarnation = secrets.token_bytes(16)  # names this process's clock in placement calls

    @translate_errors
    def InitShard(self, frames: Iterator[wire.Frame], context):
        first = _first(frames, "InitShard", "target")
        state = self.node.state_for_init(_target(first.fields.target))
        buf = torch.empty(state.shard.numel)  # once per job (or a deliberate edit): not kept in the pool
        try:
            asm, blob = codec.Assembler(out=buf), None
            for frame in _chain(first, frames):
                if frame.chunk is None:
                    continue
                if frame.field == BUFFERS_INIT_FIELD:
                    blob = blob or _BlobReader(state)
                    blob.add(frame.chunk)
                else:
                    asm.add(frame.chunk)
            asm.finish()
            fresh = state.initialize(buf, blob.finish() if blob else None, replace=first.fields.replace)
        finally:
            del buf
            release_free_memory()
        checkpointer = self.node.checkpointer_for(state)
        if fresh and checkpointer is not None:
            # The starting point is on disk before the upload is acknowledged: a shard that restarts
            # after it always finds a checkpoint, and one that finds none was never initialised.
            checkpointer.flush(timeout=self.wait_timeout)
        state.add_bytes(received=asm.received)
        return pb.InitShardResponse(version=state.version, already_initialized=not fresh)

    @translate_errors
    def Push(self, frames: Iterator[wire.Frame], context):
        first = _first(frames, "Push", "header")
        h = first.fields.header
        state = self.node.require(_target(h.target), self.wait_timeout)
        if h.epoch < 1 or h.step < 0 or h.base_version < 0 or h.worker_id < 0:
            state.reject("bad_header")
            raise InvalidArgument(f"push header out of range: epoch {h.epoch} (>= 1), step {h.step}, base_version "
                                  f"{h.base_version} and worker_id {h.worker_id} (>= 0)")
        if h.reply_dtype not in REPLY_DTYPES:
            state.reject("bad_header")
            raise InvalidArgument(f"push header reply_dtype {h.reply_dtype} is not FLOAT32, BFLOAT16 or FLOAT16")
        members = self._learn_views(state, h.target.job_id, h.epoch).worker_ids
        path = self._path_for(state, h, context)
        failed = True
        try:
            if isinstance(path, PartsPath):
                yield from self._push_in_parts(state, first, frames, members, path)
            else:
                yield from self._push(state, first, frames, members, path)
            failed = False
        finally:
            path.close(failed)

    def _path_for(self, state, h: pb.PushHeader, context) -> ServerPath:
        """Where this push's gradient comes from and its slice goes (``server/byte_paths.py``)."""
        pool = self.node.buffers
        if h.HasField("shm"):  # a same-host worker's segment, held open (never mapped) for this call
            return SegmentPath(h.worker_id, state.segments.open(h.worker_id, h.shm.name, h.shm.nonce), pool)
        if h.HasField("link"):  # the worker's byte link, claimed for this call
            if self.links is None:
                raise NoLink(f"this server offers no byte link ({self.links_off}): push over gRPC")
            key = (h.target.job_id, state.shard.shard_id, h.worker_id)
            if h.link.parts > 1:
                stops = self._part_stops(state)
                if h.link.parts != len(stops):
                    state.reject("bad_header")
                    raise InvalidArgument(f"the push comes in {h.link.parts} parts; this shard cuts its slice into "
                                          f"{len(stops)} (OpenLink's part_stops): open a new link")
                return PartsPath(self.links, key, self.links.take(key), h.link.nonce, deadline_of(context), pool,
                                 REPLY_DTYPES[h.reply_dtype], stops)
            return LinkPath(self.links, key, self.links.take(key), h.link.nonce, deadline_of(context), pool,
                            REPLY_DTYPES[h.reply_dtype])
        return StreamPath(self.chunk_bytes, self._encode_push, REPLY_DTYPES[h.reply_dtype])

    def _push(self, state, first: wire.Frame, frames: Iterator[wire.Frame], members: frozenset[int],
              path: ServerPath):
        h = first.fields.header
        frames = _chain(first, frames)
        grad, options, blob = self._receive(state, frames, h.options if h.HasField("options") else None,
                                            expect_grad=path.in_band)
        pool = self.node.buffers
        grad = path.gradient(state, grad)
        state.note_transport(h.worker_id, path.name)
        push = Push(h.worker_id, h.step, h.epoch, h.base_version, StepOpts.from_pb(options), grad, buffers=blob,
                    release=(lambda: pool.give(grad)) if grad is not None else None)
        outcome = state.push(push, members)  # releases the buffer when done with it
        if outcome.clip_partial is not None:
            yield pb.PushResponse(clip_partial=pb.ClipPartial(step=h.step, partial=outcome.clip_partial))
            outcome = state.finish_clip(push, self._clip_total(state, frames, h.step), outcome.duplicate)
        yield from self._answer(state, outcome, path)

    def _answer(self, state, outcome, path: ServerPath):
        """A push's PushResult, then what its path sends after it (the slice), then the buffers file."""
        yield pb.PushResponse(result=pb.PushResult(
            version=path.reply(state), staleness=outcome.staleness, duplicate=outcome.duplicate,
            dropped=outcome.dropped, next_step=outcome.next_step, applied_lr=outcome.applied_lr,
            epoch=state.views.latest_epoch, skipped=outcome.skipped))
        yield from path.after_result(state)
        if state.job.broadcast_buffers:
            yield from self._buffer_frames(state, pb.PushResponse, BUFFERS_REPLY_FIELD)

    def _push_in_parts(self, state, first: wire.Frame, frames: Iterator[wire.Frame], members: frozenset[int],
                       path: PartsPath):
        """A push in parts (``server/parts.py``): the options (and buffers) on the stream, then the
        gradient's parts on the link, each applied once every member's is in and sent back by the
        path's thread meanwhile; the result once the step closed."""
        h = first.fields.header
        _, options, blob = self._receive(state, _chain(first, frames), h.options if h.HasField("options") else None,
                                         expect_grad=False)
        state.note_transport(h.worker_id, path.name)
        pool = self.node.buffers
        buf = pool.take(torch.float32, state.shard.numel)

        def give() -> None:
            pool.give(buf)

        push = Push(h.worker_id, h.step, h.epoch, h.base_version, StepOpts.from_pb(options), buf, buffers=blob,
                    stops=path.stops)
        push.release = parts.releaser(push, give)
        try:
            fill = parts.begin(state, push, members, abort=path.link.close, give=give)
        except BaseException:
            give()
            raise
        if fill.push is not push or not fill.active:
            give()  # (a continued push keeps its first attempt's buffer; a repeat's parts are read and dropped)
        path.answer(state, fill.push.step, fill.generation)
        try:
            path.read(state, fill)
        finally:
            with state.cond:
                parts.stop(state, fill)
        with state.cond:
            outcome = parts.finish(state, fill)
        yield from self._answer(state, outcome, path)

    def _part_stops(self, state) -> list[int]:
        """Where this shard's slice is cut for pushes in parts ([numel]: they go whole)."""
        return part_stops(state.optimizer.boundaries(), state.shard.numel, self.link_parts)

    @staticmethod
    def _clip_total(state, frames: Iterator[wire.Frame], step: int) -> float:
        """The worker's ClipTotal for ``step``, the next message on the stream."""
        frame = next(frames, None)
        if frame is None or frame.fields is None or not frame.fields.HasField("clip_total"):
            state.reject("bad_clip")
            raise InvalidArgument(f"a clipped push must answer its ClipPartial with a ClipTotal for step {step}")
        if frame.fields.clip_total.step != step:
            state.reject("bad_clip")
            raise InvalidArgument(f"ClipTotal names step {frame.fields.clip_total.step}; the push is for step {step}")
        return frame.fields.clip_total.total_norm

    def _buffer_frames(self, state, cls, field: int):
        """The job's buffers file as chunk frames of ``cls`` (shard 0 only)."""
        blob = state.buffers
        if blob is None:
            return
        tensor = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        for chunk in codec.views(tensor, self.chunk_bytes):
            yield wire.Frame(None, chunk, field=field)
        state.add_bytes(sent=len(blob))

    def _learn_views(self, state, job_id: str, epoch: int):
        """Make sure the shard knows every view up to ``epoch`` (fetched once each from the
        coordinator): which view governs a step depends on all of them. Returns view ``epoch``."""
        view = None
        for e in range(epoch, 0, -1):
            if e in state.views and view is not None:
                break
            fetched = self.node.membership.view(job_id, e)
            view = view or fetched
            if e not in state.views:
                state.learn_view(fetched, from_open_step=True)
        return view

    def _encode_push(self, param: torch.Tensor) -> list[bytes]:
        return [self._push_frames(wire.Frame(None, c)) for c in codec.views(param, self.chunk_bytes)]

    def _receive(self, state, frames: Iterator[wire.Frame], options: pb.StepOptions | None, expect_grad: bool = True):
        """Read a push: its buffers file (shard 0, rank 0), then a sparse push's int32 positions,
        then an int8 push's scales, then the gradient, and the step options (in the header, or in a
        PushCommit after the gradient). Reading stops once the gradient is complete and the options
        are known, so a clipped push's stream stays open for its ClipTotal (without ``expect_grad``, the gradient is
        in shared memory: reading stops once the options are known, so a push with buffers sends its
        options after them, in a PushCommit). Returns (the fp32 gradient in a
        pooled buffer the caller gives back, or None; the options; the buffers file).

        A sparse push's values are scattered into a zeroed buffer. Nothing is kept on error.
        """
        blob = indices = scales = asm = positions = buf = None
        dtype, numel, pool = None, state.shard.numel, self.node.buffers
        try:
            for frame in frames:
                if frame.fields is not None and frame.fields.HasField("commit"):
                    if options is not None:
                        raise codec.CodecError("a push carries its options in the header or in one PushCommit")
                    options = frame.fields.commit.options
                chunk = frame.chunk
                if chunk is not None and frame.field == BUFFERS_PUSH_FIELD:
                    if asm is not None or indices is not None:
                        raise codec.CodecError("buffer chunks must come before positions and gradient values")
                    blob = blob or _BlobReader(state)
                    blob.add(chunk)
                elif chunk is not None and frame.field == INDICES_FIELD:
                    if asm is not None:
                        raise codec.CodecError("index chunks must come before the gradient values")
                    indices = indices or codec.Assembler(expect_dtype=torch.int32, max_numel=numel)
                    indices.add(chunk)
                elif chunk is not None and frame.field == SCALES_FIELD:
                    if asm is not None:
                        raise codec.CodecError("scale chunks must come before the gradient values")
                    scales = scales or codec.Assembler(expect_dtype=torch.float32, max_numel=numel)
                    scales.add(chunk)
                elif chunk is not None:
                    if asm is None:
                        dtype = codec.torch_dtype(chunk.dtype)
                        if dtype not in GRAD_DTYPES or (dtype is torch.int8) != (scales is not None):
                            state.reject("bad_dtype")
                            raise InvalidArgument(_bad_dtype(dtype, scales is not None))
                        positions = indices.finish() if indices is not None else None
                        buf = pool.take(dtype, numel) if positions is None else torch.empty(positions.numel(),
                                                                                           dtype=dtype)
                        asm = codec.Assembler(out=buf)
                    asm.add(chunk)
                if options is not None and (asm.complete if asm is not None else not expect_grad):
                    break
            if options is None:
                raise codec.CodecError("the push carried no step options (PushHeader.options or a PushCommit)")
            if asm is not None:
                asm.finish()
            if scales is not None:
                scales.finish()
        except codec.CodecError:
            state.reject("bad_size")
            _give_back(pool, buf, positions)
            raise
        except BaseException:  # the stream broke: nothing was applied, the buffer goes back
            _give_back(pool, buf, positions)
            raise
        state.add_bytes(received=sum(a.received for a in (asm, indices, scales, blob) if a is not None))
        blob = blob.finish() if blob is not None else None
        if asm is None:
            return None, options, blob
        if dtype is torch.int8:
            buf, dtype = self._dequantize(state, buf, scales.finish(), pooled=positions is None), torch.float32
        if positions is not None:
            return self._scatter(state, positions, buf), options, blob
        return as_fp32(pool, buf), options, blob

    @translate_errors
    def OpenLink(self, request: pb.OpenLinkRequest, context):
        if self.links is None:
            raise NoLink(f"this server offers no byte link ({self.links_off}): push over gRPC")
        state = self.node.require(_target(request.target), self.wait_timeout)
        if request.epoch < 1 or request.epoch > state.views.latest_epoch + MAX_EPOCH_JUMP:
            raise InvalidArgument(f"OpenLink names membership epoch {request.epoch}; this shard knows up to "
                                  f"{state.views.latest_epoch}")
        if request.worker_id not in self._learn_views(state, request.target.job_id, request.epoch).worker_ids:
            raise UnknownWorker(f"worker {request.worker_id} is not a member of view {request.epoch}: no byte link "
                                f"for it (register with the coordinator)")
        key = (request.target.job_id, state.shard.shard_id, request.worker_id)
        stops = self._part_stops(state) if state.policy.params_still_while_replying and state.early_parts else []
        return pb.OpenLinkResponse(port=self.links.port, ticket=self.links.ticket(key),
                                   part_stops=stops if len(stops) > 1 else [])

    def _dequantize(self, state, values: torch.Tensor, scales: torch.Tensor, pooled: bool) -> torch.Tensor:
        """The fp32 values an int8 push's ``values`` and ``scales`` stand for (``proto/quant.py``); a
        pooled ``values`` buffer goes back to the pool (also on error), the result is pooled when it was."""
        pool = self.node.buffers
        out = pool.take(torch.float32, values.numel()) if pooled else None
        try:
            return quant.dequantize(values, scales, out)
        except ValueError as exc:
            if out is not None:
                pool.give(out)
            state.reject("bad_size")
            raise InvalidArgument(str(exc)) from None
        finally:
            if pooled:
                pool.give(values)

    def _scatter(self, state, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A dense fp32 gradient from a sparse push: zeros except ``values`` at ``positions``."""
        numel = state.shard.numel
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= numel):
            state.reject("bad_index")
            raise InvalidArgument(f"sparse positions must lie in [0, {numel}) of the shard")
        if torch.unique(positions).numel() != positions.numel():
            state.reject("bad_index")
            raise InvalidArgument("sparse positions must be unique")
        grad = self.node.buffers.take(torch.float32, numel).zero_()
        grad[positions.long()] = values.float()
        return grad

    @translate_errors
    def Pull(self, request: pb.PullRequest, context):
        state = self.node.require(_target(request.target), self.wait_timeout)
        with state.cond:
            state.check_serving()  # a backup replica (or a primary without its lease) hands out nothing
            state.timeline.check(request.epoch or None)  # a restored shard hands out nothing until the job is aligned
            ready = state.version >= request.min_version
        if not ready:
            with self.pull_waits.slot():
                state.wait_for_version(request.min_version, request.epoch, self.wait_timeout)
        # One version (of the slice, and with include_optimizer_state of its optimizer state too), copied
        # to a temporary file, not to memory (a copy per pulling worker, as after a rollback, would
        # multiply the server's memory), and streamed from there at the client's pace.
        full = request.include_optimizer_state
        version, spill, hyper = state.export(self.node.checkpoint_dir or None, optimizer_state=full)
        with spill:
            yield pb.PullResponse(version=version, hyperparams_json=hyper if full else "")
            for name, chunk in spill.chunks(self.chunk_bytes):
                yield wire.Frame(pb.PullResponse(name="" if name == "param" else name) if full else None, chunk)
                state.add_bytes(sent=len(chunk.data))
        if request.include_buffers:
            for frame in self._buffer_frames(state, pb.PullResponse, 2):
                yield wire.Frame(pb.PullResponse(name=BUFFERS_NAME), frame.chunk)

    @translate_errors
    def LoadState(self, frames: Iterator[wire.Frame], context):
        first = _first(frames, "LoadState", "target")
        state = self.node.require(_target(first.fields.target), self.wait_timeout)
        version = state.load_state(_named_tensors(state, _chain(first, frames)), first.fields.hyperparams_json)
        return pb.LoadStateResponse(version=version)

    def _job(self, job_id: str):
        """The state of ``job_id`` ("" = the default job or the only one); FailedPrecondition if none."""
        state = self.node.state_for(job_id)
        if state is None:
            known = ", ".join(sorted(self.node.states)) or "none"
            raise FailedPrecondition(f"shard {self.node.shard_id} holds no job {job_id[:64]!r} (it holds: {known})")
        return state

    @translate_errors
    def Checkpoint(self, request, context):
        state = self._job(request.job_id)
        checkpointer = self.node.checkpointer_for(state)
        if checkpointer is None:
            self.node.store()  # raises: no checkpoint directory
        if request.at_version < 0 or not 0 <= request.timeout_ms <= MAX_WAIT_MS:
            raise InvalidArgument(f"at_version must be >= 0 and timeout_ms in 0..{MAX_WAIT_MS}")
        with self.checkpoint_waits.slot():
            written = checkpointer.request(state, request.at_version, request.timeout_ms / 1000.0 or 60.0)
        return pb.CheckpointResponse(version=written.version, path=str(written.path), bytes=written.bytes)

    @translate_errors
    def ListCheckpoints(self, request, context):
        if request.HasField("shard_id"):
            versions, state = self.node.checkpoints_of(request.job_id, request.shard_id, request.job_name)
            if state is None:
                return pb.ListCheckpointsResponse(shard_id=request.shard_id, job_id=request.job_id, versions=versions)
        else:
            state = self.node.state_for(request.job_id)
            if state is None:
                return pb.ListCheckpointsResponse(shard_id=self.node.shard_id)
            versions = self.node.store(state.job.name).versions() if self.node.checkpoint_dir else []
        with state.cond:
            return pb.ListCheckpointsResponse(shard_id=state.shard.shard_id, job_id=state.job_id, versions=versions,
                                              version=state.version, awaiting_rollback=state.timeline.awaiting_rollback)

    @translate_errors
    def SetMembership(self, request, context):
        self.node.check_generation(request.coordinator_generation)
        view = view_from_pb(request.view)
        if view.epoch < 1 or view.start_step < 0 or not view.members:
            raise InvalidArgument("a membership view needs an epoch >= 1, a start step >= 0 and members")
        state = self.node.state_for(request.job_id) if request.job_id else None
        if state is None:  # no such job here yet: the view is fetched when the first push names it
            return pb.SetMembershipResponse(accepted=True)
        if view.epoch > state.views.latest_epoch + MAX_EPOCH_JUMP:
            raise InvalidArgument(f"view epoch {view.epoch} is far past this shard's newest ({state.views.latest_epoch})")
        accepted, version = True, 0
        for held in self.node.replicas_of(request.job_id):  # every replica here: a backup may be promoted
            serving = held.replica is None or not held.replica.serving()
            # A backup takes the view from wherever it is; only a replica that closes steps may refuse it.
            learned = held.learn_view(view, request.from_open_step or not serving)
            if serving:
                accepted = accepted and learned
                with held.cond:
                    version = max(version, held.version)
        if self.links is not None and view.epoch >= state.views.latest_epoch:
            members = view.worker_ids  # a worker that left (or whose lease ran out) keeps no link open here
            self.links.drop_where(lambda key: key[0] != request.job_id or key[2] in members)
        return pb.SetMembershipResponse(accepted=accepted, version=version)

    @translate_errors
    def SetReplicas(self, request, context):
        if not 0 < request.lease_ms <= 600_000:
            raise InvalidArgument("lease_ms must be in 1..600000")
        reports, since = [], self._lease_since(request.lease_from)
        for a, state in self.node.assign(request.assignments, request.lease_ms / 1000.0 if since else None,
                                         request.coordinator_generation, since):
            if a.primary:
                self._copy_to_new_backups(state)
            # Without the shard's lock: a primary holds it while it waits for the coordinator to drop a
            # backup it cannot reach, and this answer is how the coordinator learns of that.
            reports.append(pb.ReplicaReport(job_id=a.job_id, shard_id=a.shard_id, unreachable=state.replica.report(),
                                            in_sync=state.replica.in_sync()))
        return pb.SetReplicasResponse(reports=reports, clock=pb.LeaseClock(incarnation=self.incarnation,
                                                                          monotonic_ns=time.monotonic_ns()))

    def _lease_since(self, clock) -> float | None:
        """Where a placement call's lease runs from (monotonic seconds): the reading of this process's
        clock that the coordinator echoes from an earlier answer, which came before the coordinator
        started counting the lease. None (no renewal) for a reading of another process (a restarted
        server), none at all (a coordinator's first call), or one from the future."""
        if clock.incarnation != self.incarnation or not 0 < clock.monotonic_ns <= time.monotonic_ns():
            return None
        return clock.monotonic_ns / 1e9

    def _copy_to_new_backups(self, state) -> None:
        """A primary with a backup that holds no copy yet (new, or restarted) sends it one now, in
        the background: training pauses for the copy (it is taken under the shard's lock), and the
        backup is promotable once it has it."""
        role = state.replica
        with role.cond:
            if role.copying or set(role.backups) <= role.synced or not role.primary:
                return
            role.copying = True

        def copy():
            try:
                with state.cond:
                    if state.initialized and not role.serving():
                        replicas.ship(role, state, None, state.send, state.ship_timeout)
            except Exception as exc:  # noqa: BLE001 - logged; the next placement call tries again
                log.warning("shard %d: copy to a new backup failed: %s", state.shard.shard_id, exc)
            finally:
                with role.cond:
                    role.copying = False

        threading.Thread(target=copy, name="shardps-replica-copy", daemon=True).start()

    @translate_errors
    def Replicate(self, frames: Iterator[wire.Frame], context):
        first = _first(frames, "Replicate", "header")
        h = first.fields.header
        state = self.node.find(h.job_id, h.shard_id)
        if state is None:
            raise NeedsCopy(f"needs a whole copy: this server holds no replica of shard {h.shard_id} of "
                            f"job {h.job_id[:64]!r} yet (the coordinator places replicas)")
        if h.full:  # rare (a new or restarted backup): fresh tensors, kept as the replica's state
            return pb.ReplicateResponse(version=state.take_copy(h, _named_tensors(state, _chain(first, frames))))
        # One update per step: its gradient lands in a pooled buffer, as a push's does.
        pool = self.node.buffers
        grad = pool.take(torch.float32, state.shard.numel)
        try:
            update = _named_tensors(state, _chain(first, frames), into={"grad": grad})
            return pb.ReplicateResponse(version=state.replay(h, update))
        finally:
            pool.give(grad)

    @translate_errors
    def Rollback(self, request, context):
        before = self.node.rollback(request.job_id, request.version, request.epoch, request.coordinator_generation,
                                    request.shard_id if request.HasField("shard_id") else None)
        return pb.RollbackResponse(from_version=before, version=request.version)

    def GetShardStatus(self, request, context):
        state = self.node.state_for(request.job_id)
        if state is not None and request.HasField("shard_id"):
            state = self.node.find(state.job_id, request.shard_id)
        job_ids = sorted(self.node.states)
        if state is None:
            return pb.GetShardStatusResponse(shard_id=self.node.shard_id, job_ids=job_ids)
        digest = state.digest() if request.include_digest else ""
        with state.cond:  # a consistent copy of counters that handler threads update
            s = state.stats
            return pb.GetShardStatusResponse(
                shard_id=self.node.shard_id,
                job_id=state.job_id,
                mode=mode_to_pb(state.job.mode),
                start=state.shard.start,
                stop=state.shard.stop,
                initialized=state.initialized,
                version=state.version,
                pushes_received=s.pushes_received,
                pushes_rejected=s.pushes_rejected,
                pushes_duplicate=s.pushes_duplicate,
                pushes_dropped=s.pushes_dropped,
                pushes_skipped=s.pushes_skipped,
                bytes_in=s.bytes_in,
                bytes_out=s.bytes_out,
                shm_bytes_in=s.shm_bytes_in,
                shm_bytes_out=s.shm_bytes_out,
                workers_seen=sorted(s.last_push)[-STATUS_WORKERS:],
                staleness_counts=dict(s.staleness),
                apply_seconds=s.apply_seconds,
                wait_seconds=s.wait_seconds,
                state_digest=digest,
                rejections=dict(s.rejections),
                worker_last_push_unix=dict(sorted(s.last_push.items())[-STATUS_WORKERS:]),
                worker_last_step=dict(sorted(state.last_step.items())[-STATUS_WORKERS:]),
                worker_transport=dict(sorted(state.transport.items())[-STATUS_WORKERS:]),
                rollbacks=s.rollbacks,
                steps_rolled_back=s.steps_rolled_back,
                restored=state.timeline.restored_from is not None,
                restored_from_version=state.timeline.restored_from or 0,
                job_ids=job_ids,
                **self._checkpoint_status(state),
                **self._replica_status(state),
            )

    def _replica_status(self, state) -> dict:
        role = state.replica
        if role is None:
            return {}
        with role.cond:
            return {"replica_role": "primary" if role.primary else "backup", "placement_epoch": role.placement_epoch,
                    "replica_shards": [s.shard.shard_id for s in self.node.replicas_of(state.job_id)],
                    "updates_replicated": role.updates_replicated, "copies_sent": role.copies_sent,
                    "lease_remaining_ms": max(0, int((role.lease_until - time.monotonic()) * 1000)) if role.primary else 0}

    def _checkpoint_status(self, state) -> dict:
        c = self.node.checkpointer_for(state)
        if c is None:
            return {"last_checkpoint_version": -1}
        return {"checkpoints_written": c.written, "checkpoint_failures": c.failures,
                "last_checkpoint_version": c.last.version if c.last else -1}


def _named_tensors(state, frames: Iterator[wire.Frame], into: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Tensors streamed as chunks named by their frames (optimizer state; a replica's update or copy),
    refused once they are more, or larger, than this shard can hold. ``into``: preallocated tensors to
    decode some of them into (their dtype and size must match)."""
    into = into or {}
    numel = max(1, state.shard.numel)
    limit = (numel * 8 + (1 << 20)) * 4  # bytes: a few state tensors per element, and room for small ones
    tensors: dict[str, codec.Assembler] = {}
    total = 0
    for frame in frames:
        if frame.chunk is None:
            continue
        name = frame.fields.name if frame.fields is not None else ""
        if name not in tensors:
            if len(tensors) >= 64 * max(1, len(state.optimizer.pieces)) + 3:  # + param, grad, buffers
                raise InvalidArgument("too many tensors for this shard's pieces")
            cap = buffer_file.max_bytes(state.job.buffers) if name == BUFFERS_NAME else numel
            tensors[name] = codec.Assembler(out=into[name]) if name in into else codec.Assembler(max_numel=max(1, cap))
        tensors[name].add(frame.chunk)
        total += len(frame.chunk.data)
        if total > limit:
            raise InvalidArgument(f"more tensor bytes than this shard can hold ({limit})")
    return {name: asm.finish() for name, asm in tensors.items()}


# A Replicate call the transport failed within this long failed on the channel's state (refused, or a
# reconnect backoff after an earlier refusal), not after waiting on a network: it is dialled afresh once.
REDIAL_WITHIN_S = 1.0


class ReplicaSender:
    """A primary's calls to its backups (server to server, with the cluster's credential): one
    channel per backup, kept; each call has a deadline sized to its bytes."""

    def __init__(self, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self._stubs: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str):
        with self._lock:
            if address not in self._stubs:
                channel = open_channel(address)
                self._stubs[address] = (channel, channel.stream_unary(
                    "/shardps.v1.ShardService/Replicate", request_serializer=wire.serializer(pb.ReplicateRequest),
                    response_deserializer=pb.ReplicateResponse.FromString))
            return self._stubs[address][1]

    def send(self, address: str, header, tensors: list) -> int:
        """One Replicate call; a backup's refusal comes back as its class (NeedsCopy, Superseded). A call
        the transport failed at once is made once more on a fresh channel: a backup that restarted at the
        same address is reachable although the kept channel still waits out its reconnect backoff (it
        answers with the last connect's error), and the primary would report it unreachable for nothing."""
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)

        def requests():
            yield pb.ReplicateRequest(header=header)
            for name, tensor in tensors:
                for chunk in codec.views(tensor.contiguous(), self.chunk_bytes):
                    yield wire.Frame(pb.ReplicateRequest(name=name), chunk)

        timeout, started = 10.0 + nbytes / 50e6, time.monotonic()
        try:
            return self._replicate(address, requests(), timeout)
        except ShardpsError as err:
            if not (err.from_transport and err.code == "UNAVAILABLE" and time.monotonic() - started <= REDIAL_WITHIN_S):
                raise
        self._forget(address)
        return self._replicate(address, requests(), timeout)

    def _replicate(self, address: str, requests, timeout: float) -> int:
        try:
            return self._stub(address)(requests, timeout=timeout).version
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"Replicate to {address}") from None

    def _forget(self, address: str) -> None:
        with self._lock:
            kept = self._stubs.pop(address, None)
        if kept is not None:
            kept[0].close()


class _BlobReader:
    """A buffers file arriving as uint8 chunks, bounded by the size of the job's buffers."""

    def __init__(self, state):
        if state.shard.shard_id != 0 or not state.job.buffers:
            state.reject("bad_buffers")
            raise InvalidArgument("only shard 0 of a job with buffers takes buffers")
        self.asm = codec.Assembler(expect_dtype=torch.uint8, max_numel=buffer_file.max_bytes(state.job.buffers))

    @property
    def received(self) -> int:
        return self.asm.received

    def add(self, chunk) -> None:
        self.asm.add(chunk)

    def finish(self) -> bytes:
        return self.asm.finish().numpy().tobytes()


def _bad_dtype(dtype: torch.dtype, scaled: bool) -> str:
    if dtype is torch.int8:
        return "int8 gradient values need their scales first: send the PushRequest.scales chunks before the grad chunks"
    if scaled:
        return f"scales go with int8 gradient values only; got {dtype} values with scales"
    return f"gradients travel as float32, bfloat16, float16 or int8 (with scales), not {dtype}"


def _give_back(pool, buf, positions) -> None:
    if buf is not None and positions is None:
        pool.give(buf)


def add_to_server(servicer: ShardServicer, server: grpc.Server) -> None:
    """Register ShardService with the fast chunk codec (the generated helper would use protobuf's)."""
    handlers = {
        "InitShard": grpc.stream_unary_rpc_method_handler(
            servicer.InitShard, request_deserializer=wire.deserializer(pb.InitShardRequest),
            response_serializer=pb.InitShardResponse.SerializeToString),
        "Push": grpc.stream_stream_rpc_method_handler(
            servicer.Push, request_deserializer=wire.deserializer(pb.PushRequest),
            response_serializer=_passthrough(wire.serializer(pb.PushResponse))),
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, request_deserializer=pb.PullRequest.FromString,
            response_serializer=_passthrough(wire.serializer(pb.PullResponse))),
        "LoadState": grpc.stream_unary_rpc_method_handler(
            servicer.LoadState, request_deserializer=wire.deserializer(pb.LoadStateRequest),
            response_serializer=pb.LoadStateResponse.SerializeToString),
        **{name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=getattr(pb, name + "Request").FromString,
            response_serializer=getattr(pb, name + "Response").SerializeToString)
           for name in ("GetShardStatus", "Checkpoint", "ListCheckpoints", "Rollback", "SetMembership",
                        "SetReplicas", "OpenLink")},
        "Replicate": grpc.stream_unary_rpc_method_handler(
            servicer.Replicate, request_deserializer=wire.deserializer(pb.ReplicateRequest),
            response_serializer=pb.ReplicateResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _passthrough(serialize):
    """Pre-serialized replies (cached slices) go out as they are; everything else is serialized."""
    return lambda msg: msg if isinstance(msg, bytes) else serialize(msg)


def _first(frames: Iterator[wire.Frame], rpc: str, field: str) -> wire.Frame:
    """A client stream's first message, which must carry ``field`` (InvalidArgument otherwise)."""
    first = next(frames, None)
    if first is None or first.fields is None or not first.fields.HasField(field):
        raise InvalidArgument(f"{rpc}'s first message must carry the {field}")
    return first


def _chain(first, rest):
    yield first
    yield from rest
