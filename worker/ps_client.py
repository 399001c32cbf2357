"""Push/pull fan-out over the shard plan: one channel per shard, all shards at once.

Each push is one bidirectional stream per shard: a header, then the gradient slice
in ~1 MiB chunks; the reply streams the updated slice straight into the caller's
flat buffer. Chunk messages go through the byte-compatible fast codec in
``proto/wire.py`` (one copy out of the tensor, zero-copy views in). Every call has
a deadline, and a call that fails transiently (server restarting or paused, reply
lost) is sent again whole by ``proto.retry.Retrier``: the shard applies a push at
most once and answers a repeat like the first try, so retrying is exactly-once.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import grpc
import torch

from ..proto import codec, wire
from ..proto.gen import shardps_pb2 as pb
from ..proto.messages import ShardInfo
from ..proto.retry import Retrier
from ..proto.rpc import WORKER_METADATA, error_from_rpc, open_channel


@dataclass(frozen=True)
class PushReply:
    version: int  # shard version of the slice now in the model
    staleness: int  # async: how many updates the gradient missed
    duplicate: bool  # a retry the shard had seen; not applied again
    dropped: bool  # late for a closed step (backup workers); not applied
    next_step: int  # step number of this worker's next push
    applied_lr: float  # lr the shard applied (0 if it applied nothing for this push)
    epoch: int = 0  # the newest membership epoch the shard knows


class ShardChannel:
    """Calls to one shard server."""

    def __init__(self, info: ShardInfo, job_id: str, fingerprint: str, chunk_bytes: int, retry: Retrier,
                 worker_id: int = -1, security=None):
        self.info, self.chunk_bytes, self.retry = info, chunk_bytes, retry
        self._metadata = ((WORKER_METADATA, str(worker_id)),) if worker_id >= 0 else ()
        r = info.range
        self.target = pb.ShardTarget(job_id=job_id, fingerprint=fingerprint, shard_id=r.shard_id, start=r.start, stop=r.stop)
        self._channel = ch = open_channel(info.address, security)
        method = "/shardps.v1.ShardService/"
        self._init = ch.stream_unary(method + "InitShard", request_serializer=wire.serializer(pb.InitShardRequest),
                                     response_deserializer=pb.InitShardResponse.FromString)
        self._push = ch.stream_stream(method + "Push", request_serializer=wire.serializer(pb.PushRequest),
                                      response_deserializer=wire.deserializer(pb.PushResponse))
        self._pull = ch.unary_stream(method + "Pull", request_serializer=pb.PullRequest.SerializeToString,
                                     response_deserializer=wire.deserializer(pb.PullResponse))

    def close(self) -> None:
        self._channel.close()

    def _what(self, rpc: str) -> str:
        return f"{rpc} to shard {self.info.range.shard_id} at {self.info.address}"

    def init(self, params: torch.Tensor, worker_id: int, timeout: float) -> tuple[int, bool]:
        def requests():
            yield pb.InitShardRequest(target=self.target, worker_id=worker_id)
            for chunk in codec.views(params, self.chunk_bytes):
                yield wire.Frame(None, chunk)

        def attempt():
            try:
                return self._init(requests(), timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, self._what("InitShard")) from None

        reply = self.retry.call(self._what("InitShard"), attempt)
        return reply.version, reply.already_initialized

    def push(self, header: pb.PushHeader, grad: torch.Tensor, out: torch.Tensor, timeout: float,
             commit: Callable[[], pb.PushCommit] | None = None,
             positions: torch.Tensor | None = None) -> PushReply:
        """Push ``grad`` (this shard's slice, or with ``positions`` only the values at those
        int32 positions) and write the returned slice into ``out``.

        With ``commit``, the stream ends with a PushCommit that ``commit()`` supplies
        (it may block until the caller knows the batch size and lr).
        """
        header.target.CopyFrom(self.target)

        def requests():
            yield pb.PushRequest(header=header)
            if positions is not None:
                for chunk in codec.views(positions, self.chunk_bytes):
                    yield wire.Frame(None, chunk, field=4)  # PushRequest.indices
            for chunk in codec.views(grad, self.chunk_bytes):
                yield wire.Frame(None, chunk)
            if commit is not None:
                yield pb.PushRequest(commit=commit())

        def attempt():  # the whole push again: the shard applies it at most once
            asm, result = codec.Assembler(out=out), None
            try:
                for frame in self._push(requests(), timeout=timeout, metadata=self._metadata):
                    if frame.fields is not None and frame.fields.HasField("result"):
                        result = frame.fields.result
                    if frame.chunk is not None:
                        asm.add(frame.chunk)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, self._what("Push")) from None
            asm.finish()
            return result

        result = self.retry.call(self._what("Push"), attempt)
        return PushReply(result.version, result.staleness, result.duplicate, result.dropped, result.next_step,
                         result.applied_lr, result.epoch)

    def pull(self, out: torch.Tensor, timeout: float, min_version: int = 0) -> int:
        """Write the current slice (once the shard reached ``min_version``) into ``out``; return its version."""
        request = pb.PullRequest(target=self.target, min_version=min_version)

        def attempt():
            asm, version = codec.Assembler(out=out), 0
            try:
                for frame in self._pull(request, timeout=timeout, metadata=self._metadata):
                    if frame.fields is not None and frame.fields.version:
                        version = frame.fields.version
                    if frame.chunk is not None:
                        asm.add(frame.chunk)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, self._what("Pull")) from None
            asm.finish()
            return version

        return self.retry.call(self._what("Pull"), attempt)

    def pull_state(self, timeout: float) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, {"param": slice, optimizer state key: tensor, ...}) at one instant."""
        request = pb.PullRequest(target=self.target, include_optimizer_state=True)

        def attempt():
            tensors: dict[str, codec.Assembler] = {}
            version = 0
            try:
                for frame in self._pull(request, timeout=timeout, metadata=self._metadata):
                    if frame.fields is not None and frame.fields.version:
                        version = frame.fields.version
                    if frame.chunk is not None:
                        name = (frame.fields.name if frame.fields is not None else "") or "param"
                        tensors.setdefault(name, codec.Assembler()).add(frame.chunk)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, self._what("Pull")) from None
            return version, {name: asm.finish() for name, asm in tensors.items()}

        return self.retry.call(self._what("Pull"), attempt)


class PSClient:
    """All shards of one job; every fan-out call runs on every shard concurrently."""

    def __init__(self, plan: list[ShardInfo], job_id: str, fingerprint: str, chunk_bytes: int, timeout: float,
                 compressor=None, retry: Retrier | None = None, worker_id: int = -1, security=None):
        self.plan, self.timeout, self.compressor = plan, timeout, compressor
        self.retry = retry if retry is not None else Retrier(budget=timeout)
        self.shards = [ShardChannel(info, job_id, fingerprint, chunk_bytes, self.retry, worker_id, security)
                       for info in plan]
        self._pool = ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="shardps-push")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for shard in self.shards:
            shard.close()

    def _fan_out(self, fn):
        return results([self._pool.submit(fn, shard) for shard in self.shards])

    @staticmethod
    def _slice(flat: torch.Tensor, shard: ShardChannel) -> torch.Tensor:
        return flat[shard.info.range.start:shard.info.range.stop]

    def init(self, values: torch.Tensor, worker_id: int) -> list[tuple[int, bool]]:
        return self._fan_out(lambda s: s.init(self._slice(values, s), worker_id, self.timeout))

    def push_pull(self, grads: torch.Tensor, values: torch.Tensor, header: pb.PushHeader,
                  base_versions: list[int]) -> list[PushReply]:
        return results([self.submit_push(s, grads, values, header, base_versions[s.info.range.shard_id])
                        for s in self.shards])

    def submit_push(self, shard: "ShardChannel", grads: torch.Tensor, values: torch.Tensor, header: pb.PushHeader,
                    base_version: int, commit: Callable[[], pb.PushCommit] | None = None):
        """Start one shard's push-pull on the pool; returns its Future[PushReply].

        With a compressor (top-k), the shard's slice is compressed on the pool thread too.
        """
        h = pb.PushHeader()
        h.CopyFrom(header)
        h.base_version = base_version
        r = shard.info.range

        def task():
            if self.compressor is not None and r.numel:
                positions, kept = self.compressor.compress(grads, r.start, r.stop)
                return shard.push(h, kept, self._slice(values, shard), self.timeout, commit, positions)
            return shard.push(h, self._slice(grads, shard), self._slice(values, shard), self.timeout, commit)

        return self._pool.submit(task)

    def pull(self, values: torch.Tensor, min_version: int = 0) -> list[int]:
        return self._fan_out(lambda s: s.pull(self._slice(values, s), self.timeout, min_version))

    def pull_state(self) -> list[tuple[int, dict[str, torch.Tensor]]]:
        return self._fan_out(lambda s: s.pull_state(self.timeout))


def results(futures: list[Future]) -> list:
    """Every future's result, waiting for all of them before raising the first failure: a
    caller that recovers from the error (pull and go on) must not race calls still writing
    into its buffers."""
    wait(futures)
    return [f.result() for f in futures]
