"""The ShardService gRPC adapter: decode messages, call the core, encode replies.

No update logic lives here: ``ShardNode``/``ShardState`` decide, this module only
translates, and every domain error becomes a status code through ``translate_errors``.
The chunk-carrying messages use the byte-compatible fast codec in ``proto/wire.py``
(``add_to_server`` registers it), so tensor bytes are copied once on the way out
and once on the way in.
"""
from __future__ import annotations

from typing import Iterator

import grpc
import torch

from ..proto import codec, wire
from ..proto.errors import FailedPrecondition, InvalidArgument, WaitTimeout, WrongJob
from ..proto.gen import shardps_pb2 as pb
from ..proto.messages import mode_to_pb, view_from_pb
from ..proto.rpc import translate_errors
from .modes import Push
from .node import ShardNode, Target

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # wire dtypes a push may use
SERVICE = "shardps.v1.ShardService"
INDICES_FIELD = 4  # PushRequest.indices


def _target(msg: pb.ShardTarget) -> Target:
    return Target(msg.job_id, msg.fingerprint, msg.shard_id, msg.start, msg.stop)


class ShardServicer:
    def __init__(self, node: ShardNode, chunk_bytes: int, wait_timeout: float):
        self.node = node
        self.chunk_bytes = chunk_bytes
        self.wait_timeout = wait_timeout  # how long calls wait for the shard to be initialised
        self._push_frames = wire.serializer(pb.PushResponse)

    @translate_errors
    def InitShard(self, frames: Iterator[wire.Frame], context):
        first = next(frames, None)
        if first is None or first.fields is None or not first.fields.HasField("target"):
            raise InvalidArgument("InitShard's first message must carry the target")
        state = self.node.state_for_init(_target(first.fields.target))
        buf = self.node.buffers.take(torch.float32, state.shard.numel)
        try:
            asm = codec.Assembler(out=buf)
            for frame in _chain(first, frames):
                if frame.chunk is not None:
                    asm.add(frame.chunk)
            asm.finish()
            fresh = state.initialize(buf)
        finally:
            self.node.buffers.give(buf)  # the pool keeps it for the first pushes
        state.add_bytes(received=asm.received)
        return pb.InitShardResponse(version=state.version, already_initialized=not fresh)

    @translate_errors
    def Push(self, frames: Iterator[wire.Frame], context):
        first = next(frames, None)
        if first is None or first.fields is None or not first.fields.HasField("header"):
            raise InvalidArgument("Push's first message must carry the header")
        h = first.fields.header
        state = self.node.require(_target(h.target), self.wait_timeout)
        members = self._learn_views(state, h.target.job_id, h.epoch).worker_ids
        commit = pb.PushCommit(batch_size=h.batch_size, lr=h.lr)
        grad = self._receive_grad(state, _chain(first, frames), commit)
        push = Push(h.worker_id, h.step, h.epoch, h.base_version, commit.batch_size, commit.lr, grad,
                    release=lambda: self.node.buffers.give(grad))
        outcome = state.push(push, members)  # releases the buffer when done with it
        version, pieces = state.snapshot(self._encode_push)
        yield pb.PushResponse(result=pb.PushResult(
            version=version, staleness=outcome.staleness, duplicate=outcome.duplicate, dropped=outcome.dropped,
            next_step=outcome.next_step, applied_lr=outcome.applied_lr, epoch=state.latest_epoch))
        yield from pieces
        state.add_bytes(sent=state.shard.numel * 4)

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

    def _receive_grad(self, state, frames: Iterator[wire.Frame], commit: pb.PushCommit) -> torch.Tensor:
        """Decode the gradient into a pooled fp32 buffer (the caller gives it back).

        A dense push streams the slice; a sparse (top-k) push streams int32 positions
        first, then the values, which are scattered into a zeroed buffer. A trailing
        PushCommit message, if any, is merged into ``commit``.
        """
        frames = _committing(frames, commit)
        indices, first = None, None
        for frame in frames:
            if frame.chunk is None:
                continue
            if frame.field != INDICES_FIELD:
                first = frame
                break
            indices = indices or codec.Assembler(expect_dtype=torch.int32)
            indices.add(frame.chunk)
        if first is None:
            state.reject("bad_size")
            raise InvalidArgument("push carried no gradient chunks")
        dtype = codec.torch_dtype(first.chunk.dtype)
        if dtype not in GRAD_DTYPES:
            state.reject("bad_dtype")
            raise InvalidArgument(f"gradients travel as float32, bfloat16 or float16, not {dtype}")
        positions = indices.finish() if indices is not None else None
        buffers, numel = self.node.buffers, state.shard.numel
        buf = buffers.take(dtype, numel) if positions is None else torch.empty(positions.numel(), dtype=dtype)
        try:
            asm = codec.Assembler(out=buf)
            for frame in _chain(first, frames):
                if frame.chunk is not None:
                    if frame.field == INDICES_FIELD:
                        raise codec.CodecError("index chunks must come before the gradient values")
                    asm.add(frame.chunk)
            asm.finish()
        except codec.CodecError:
            state.reject("bad_size")
            if positions is None:
                buffers.give(buf)
            raise
        except BaseException:  # the stream broke: nothing was applied, the buffer goes back
            if positions is None:
                buffers.give(buf)
            raise
        state.add_bytes(received=asm.received + (indices.received if indices is not None else 0))
        if positions is not None:
            return self._scatter(state, positions, buf)
        if dtype is torch.float32:
            return buf
        grad = buffers.take(torch.float32, numel).copy_(buf)
        buffers.give(buf)
        return grad

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
            state.check_epoch(None)  # a restored shard hands out nothing until the job is aligned
            if not state.cond.wait_for(lambda: state.version >= request.min_version, timeout=self.wait_timeout):
                raise WaitTimeout(f"shard {self.node.shard_id} did not reach version {request.min_version} within "
                                  f"{self.wait_timeout:.0f}s (it is at {state.version})")
        if not request.include_optimizer_state:
            # A PullResponse holding only field 2 has the bytes of a PushResponse holding only
            # field 2, so pulls share the frames cached for push replies.
            version, pieces = state.snapshot(self._encode_push)
            yield pb.PullResponse(version=version)
            yield from pieces
            state.add_bytes(sent=state.shard.numel * 4)
            return
        version, tensors = state.export()
        yield pb.PullResponse(version=version)
        for name, tensor in tensors.items():
            for chunk in codec.views(tensor, self.chunk_bytes):
                yield wire.Frame(pb.PullResponse(name="" if name == "param" else name), chunk)
            state.add_bytes(sent=tensor.numel() * tensor.element_size())

    @translate_errors
    def Checkpoint(self, request, context):
        state = self.node.state
        if state is None:
            raise FailedPrecondition(f"shard {self.node.shard_id} has no job yet: nothing to checkpoint")
        if self.node.checkpointer is None:
            self.node.store()  # raises: no checkpoint directory
        written = self.node.checkpointer.request(state, request.at_version, request.timeout_ms / 1000.0 or 60.0)
        return pb.CheckpointResponse(version=written.version, path=str(written.path), bytes=written.bytes)

    def ListCheckpoints(self, request, context):
        state = self.node.state
        versions = self.node.store().versions() if self.node.checkpoint_dir else []
        if state is None:
            return pb.ListCheckpointsResponse(shard_id=self.node.shard_id, versions=versions)
        with state.cond:
            return pb.ListCheckpointsResponse(shard_id=self.node.shard_id, job_id=state.job_id, versions=versions,
                                              version=state.version, awaiting_rollback=state.awaiting_rollback)

    @translate_errors
    def SetMembership(self, request, context):
        state = self.node.state
        if state is None:  # no job yet: the view is fetched when the first push names it
            return pb.SetMembershipResponse(accepted=True)
        if request.job_id != state.job_id:
            raise WrongJob(f"job {request.job_id!r} is not this shard's job {state.job_id!r}")
        accepted = state.learn_view(view_from_pb(request.view), request.from_open_step)
        with state.cond:
            return pb.SetMembershipResponse(accepted=accepted, version=state.version)

    @translate_errors
    def Rollback(self, request, context):
        before = self.node.rollback(request.job_id, request.version, request.epoch)
        return pb.RollbackResponse(from_version=before, version=request.version)

    def GetShardStatus(self, request, context):
        state = self.node.state
        if state is None:
            return pb.GetShardStatusResponse(shard_id=self.node.shard_id)
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
                bytes_in=s.bytes_in,
                bytes_out=s.bytes_out,
                workers_seen=sorted(s.last_push),
                staleness_counts=dict(s.staleness),
                apply_seconds=s.apply_seconds,
                wait_seconds=s.wait_seconds,
                state_digest=digest,
                rejections=dict(s.rejections),
                worker_last_push_unix=dict(s.last_push),
                worker_last_step=dict(state.last_step),
                rollbacks=s.rollbacks,
                steps_rolled_back=s.steps_rolled_back,
                restored=state.restored_from is not None,
                restored_from_version=state.restored_from or 0,
                **self._checkpoint_status(),
            )

    def _checkpoint_status(self) -> dict:
        c = self.node.checkpointer
        if c is None:
            return {"last_checkpoint_version": -1}
        return {"checkpoints_written": c.written, "checkpoint_failures": c.failures,
                "last_checkpoint_version": c.last.version if c.last else -1}


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
        **{name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=getattr(pb, name + "Request").FromString,
            response_serializer=getattr(pb, name + "Response").SerializeToString)
           for name in ("GetShardStatus", "Checkpoint", "ListCheckpoints", "Rollback", "SetMembership")},
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _passthrough(serialize):
    """Pre-serialized replies (cached slices) go out as they are; everything else is serialized."""
    return lambda msg: msg if isinstance(msg, bytes) else serialize(msg)


def _committing(frames: Iterator[wire.Frame], commit: pb.PushCommit) -> Iterator[wire.Frame]:
    """Pass frames through, merging any PushCommit they carry into ``commit``."""
    for frame in frames:
        if frame.fields is not None and frame.fields.HasField("commit"):
            commit.CopyFrom(frame.fields.commit)
        yield frame


def _chain(first, rest):
    yield first
    yield from rest
