"""The ShardService gRPC adapter: decode messages, call the core, encode replies.

No update logic lives here: ``ShardNode``/``ShardState`` decide, this module only
translates, and every domain error becomes a status code through ``abort_with``.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..proto import codec
from ..proto.codec import CodecError
from ..proto.errors import InvalidArgument
from ..proto.gen import shardps_pb2 as pb
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from ..proto.messages import mode_to_pb
from ..proto.rpc import translate_errors
from .modes import Push
from .node import ShardNode, Target

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # wire dtypes a push may use


def _target(msg: pb.ShardTarget) -> Target:
    return Target(msg.job_id, msg.fingerprint, msg.shard_id, msg.start, msg.stop)


class ShardServicer(pb_grpc.ShardServiceServicer):
    def __init__(self, node: ShardNode, chunk_bytes: int, wait_timeout: float):
        self.node = node
        self.chunk_bytes = chunk_bytes
        self.wait_timeout = wait_timeout  # how long calls wait for the shard to be initialised

    @translate_errors
    def InitShard(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.HasField("target"):
            raise InvalidArgument("InitShard's first message must carry the target")
        asm = codec.Assembler(expect_dtype=torch.float32)
        for req in _chain(first, request_iterator):
            asm.add(req.params)
        params = asm.finish()
        version, already = self.node.initialize(_target(first.target), params.reshape(-1))
        self.node.state.add_bytes(received=asm.received)
        return pb.InitShardResponse(version=version, already_initialized=already)

    @translate_errors
    def Push(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("Push's first message must carry the header")
        h = first.header
        state = self.node.require(_target(h.target), self.wait_timeout)
        members = self.node.membership.members(h.target.job_id, h.epoch)
        grad, lent = self._receive_grad(state, _chain(first, request_iterator))
        try:
            push = Push(h.worker_id, h.step, h.epoch, h.base_version, h.batch_size, h.lr, grad)
            outcome = state.push(push, members)
        finally:
            for buf in lent:
                self.node.buffers.give(buf)
        version, pieces = state.snapshot(self.chunk_bytes)
        result = pb.PushResult(version=version, staleness=outcome.staleness, duplicate=outcome.duplicate)
        yield from self._send(state, pieces, lambda c, i: pb.PushResponse(result=result if i == 0 else None, params=c))

    def _receive_grad(self, state, requests: Iterator[pb.PushRequest]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode the gradient chunks into pooled buffers; returns (fp32 grad, buffers to give back)."""
        requests = iter(requests)
        first = next((r for r in requests if r.HasField("grad")), None)
        if first is None:
            state.reject("bad_size")
            raise InvalidArgument("push carried no gradient chunks")
        dtype = codec.torch_dtype(first.grad.dtype)
        if dtype not in GRAD_DTYPES:
            state.reject("bad_dtype")
            raise InvalidArgument(f"gradients travel as float32, bfloat16 or float16, not {dtype}")
        numel = state.shard.numel
        buf = self.node.buffers.take(dtype, numel)
        lent = [buf]
        try:
            asm = codec.Assembler(out=buf)
            for req in _chain(first, requests):
                asm.add(req.grad)
            asm.finish()
            state.add_bytes(received=asm.received)
            if dtype is torch.float32:
                return buf, lent
            grad = self.node.buffers.take(torch.float32, numel)
            lent.append(grad)
            return grad.copy_(buf), lent
        except CodecError:
            state.reject("bad_size")
            for b in lent:
                self.node.buffers.give(b)
            raise

    def _send(self, state, pieces: list[bytes], make):
        for i, chunk in enumerate(codec.wrap(torch.float32, [state.shard.numel], pieces)):
            yield make(chunk, i)
        state.add_bytes(sent=sum(len(p) for p in pieces))

    @translate_errors
    def Pull(self, request, context):
        state = self.node.require(_target(request.target), self.wait_timeout)
        if not request.include_optimizer_state:
            version, pieces = state.snapshot(self.chunk_bytes)
            yield from self._send(state, pieces, lambda c, i: pb.PullResponse(version=version, name="param", chunk=c))
            return
        version, tensors = state.export()
        for name, tensor in tensors.items():
            for chunk in codec.encode(tensor, self.chunk_bytes):
                yield pb.PullResponse(version=version, name=name, chunk=chunk)
            state.add_bytes(sent=tensor.numel() * tensor.element_size())

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
                bytes_in=s.bytes_in,
                bytes_out=s.bytes_out,
                workers_seen=sorted(s.last_push),
                staleness_counts=dict(s.staleness),
                apply_seconds=s.apply_seconds,
                state_digest=digest,
                rejections=dict(s.rejections),
                worker_last_push_unix=dict(s.last_push),
                worker_last_step=dict(state.last_step),
            )


def _chain(first, rest):
    yield first
    yield from rest
