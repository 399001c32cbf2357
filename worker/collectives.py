"""All-reduce, barrier and broadcast of small values among a job's workers, through the coordinator.

For what workers share beside the optimizer (a loss or metric to log, "wait until rank 0
saved", a path rank 0 chose); the gradients themselves go to the shards. Every worker must
call the same collectives in the same order (as torch.distributed's). Values are floats,
ints, JSON-able objects or small tensors (at most 64 KiB encoded; nothing is pickled).

    coll = opt.collectives                      # a ShardedOptimizer's (its job's members take part)
    mean_loss = coll.all_reduce(loss.detach())  # a tensor, a float or an int; op="sum"/"mean"/"max"/"min"
    coll.barrier()
    path = coll.broadcast(path if opt.rank == 0 else None)

Each call blocks until every member of the job's current membership view made the same call,
or ``timeout`` seconds pass (then ``WaitTimeout``: a worker skipped the call or died; the job's
state is unchanged, but this worker's rounds are out of step with the others, so stop).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import torch

from ..proto.errors import WaitTimeout

POLL_S = 30.0  # one long poll; the coordinator caps it at its MAX_WATCH_S
OPS = ("sum", "mean", "max", "min")


class Collectives:
    def __init__(self, coordinator, job_id: str, worker_id: int, timeout: float = 300.0):
        """``coordinator``: a ``CoordinatorClient`` of the job (a ShardedOptimizer's)."""
        self.coordinator, self.job_id, self.worker_id, self.timeout = coordinator, job_id, worker_id, timeout
        self._rounds: dict[str, int] = defaultdict(int)  # name -> the next round this worker calls

    def all_gather(self, value: Any, name: str = "all_gather", timeout: float | None = None) -> list:
        """Every member's ``value``, by rank."""
        return [decode(p) for p in self._exchange(name, encode(value), timeout)]

    def all_reduce(self, value, op: str = "mean", name: str = "all_reduce", timeout: float | None = None):
        """``value`` (a tensor, float or int) reduced over every member with ``op``; the same type back
        (a tensor on ``value``'s device and dtype)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if not isinstance(value, (torch.Tensor, int, float)) or isinstance(value, bool):
            raise TypeError(f"all_reduce takes a tensor, float or int, got {type(value).__name__}")
        parts = self.all_gather(value, name, timeout)
        if isinstance(value, torch.Tensor):
            stacked = torch.stack([p.to(torch.float64) for p in parts])
            out = {"sum": stacked.sum(0), "mean": stacked.mean(0), "max": stacked.amax(0),
                   "min": stacked.amin(0)}[op]
            return out.to(dtype=value.dtype, device=value.device)
        out = {"sum": sum(parts), "mean": sum(parts) / len(parts), "max": max(parts), "min": min(parts)}[op]
        return out

    def barrier(self, name: str = "barrier", timeout: float | None = None) -> None:
        """Return once every member reached the same barrier."""
        self._exchange(name, b"", timeout)

    def broadcast(self, value: Any, src: int = 0, name: str = "broadcast", timeout: float | None = None):
        """Rank ``src``'s ``value`` on every member (the others' ``value`` is ignored)."""
        payloads = self._exchange(name, encode(value), timeout)
        if not 0 <= src < len(payloads):
            raise ValueError(f"src rank {src} is outside 0..{len(payloads) - 1}")
        return decode(payloads[src])

    def _exchange(self, name: str, payload: bytes, timeout: float | None) -> list[bytes]:
        round_ = self._rounds[name]
        wait = self.timeout if timeout is None else timeout
        deadline, delay = time.monotonic() + wait, 0.02
        while True:
            started = time.monotonic()
            poll = max(0.0, min(deadline - started, POLL_S))
            payloads, epoch = self.coordinator.collective(self.job_id, self.worker_id, name, round_, payload, poll)
            if payloads is not None:
                self._rounds[name] = round_ + 1
                return payloads
            now = time.monotonic()
            if now - started < poll / 2:  # answered without waiting (the coordinator's wait slots were full)
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 1.0)
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"collective {name!r} (round {round_}) did not close within {wait:.0f}s: some "
                                  f"member of membership epoch {epoch} did not make the same call (every worker "
                                  "must call the same collectives in the same order)")


def encode(value: Any) -> bytes:
    """A tensor as b"T" + a JSON header line + its bytes; anything else as b"J" + JSON."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        header = json.dumps({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)})
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return b"T" + header.encode() + b"\n" + raw
    try:
        return b"J" + json.dumps(value, separators=(",", ":"), allow_nan=True).encode()
    except TypeError:
        raise TypeError(f"collectives carry tensors and JSON-able values, not {type(value).__name__}") from None


def decode(payload: bytes) -> Any:
    if payload[:1] == b"T":
        header, _, raw = payload[1:].partition(b"\n")
        meta = json.loads(header)
        dtype = getattr(torch, meta["dtype"])
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(meta["shape"]).clone()
    if payload[:1] == b"J":
        return json.loads(payload[1:])
    raise ValueError("not a collective payload (a worker of another shardps version?)")
