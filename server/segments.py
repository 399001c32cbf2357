"""The same-host workers' shared-memory segments one shard holds (``runtime/shm.py``).

Invariants, all under the shard's lock (``ShardState.cond``, handed in as ``lock``):

* a segment is opened only for a member of the newest membership view, and is bound to that
  worker: another worker naming it is refused (``shm_not_yours``); a worker may move to a new
  segment of its own, and the old one is closed once the calls using it are done;
* a segment of a worker that left the job (or whose lease ran out) is closed and unlinked;
* a file that stops holding the gradients (truncated by its worker) is let go, failing only
  the push that found it so (``shm_unreadable``): the worker then pushes another way.

Every refusal is ``NoSharedMemory`` (the worker sends the same push on its byte link or inside
gRPC) or ``UnknownWorker``, and changes nothing.
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

import torch

from ..proto.errors import NoSharedMemory, ShardpsError, UnknownWorker
from ..runtime.shm import SegmentFile, ShmUnavailable, sweep


class SegmentTable:
    def __init__(self, lock: threading.Condition, numel: int, start: int, shard_id: int,
                 members: Callable[[], tuple[int, frozenset[int]]], rejections: Counter):
        """``numel``: the job's (a segment holds the whole flat vector); ``start``: this shard's
        offset in it; ``members()``: (newest epoch, its member ids), called under ``lock``."""
        self._lock, self.numel, self.start, self.shard_id = lock, numel, start, shard_id
        self._members, self._rejections = members, rejections
        self._held: dict[int, SegmentFile] = {}

    def __getitem__(self, worker_id: int) -> SegmentFile:
        return self._held[worker_id]

    def __contains__(self, worker_id: int) -> bool:
        return worker_id in self._held

    def open(self, worker_id: int, name: str, nonce: bytes) -> SegmentFile:
        """Worker ``worker_id``'s segment, opened on first use, with a use started: the caller calls
        ``release()`` on it when done (it stays open until then, whatever happens to the worker's
        membership or segment meanwhile). Blocks on nothing but the file's open (``O_NONBLOCK``)."""
        with self._lock:
            self._check_member(worker_id)
            seg = self._held.get(worker_id)
            if seg is not None and seg.name == name and seg.nonce == bytes(nonce) and seg.acquire():
                return seg
        try:
            seg = SegmentFile.open(name, nonce, self.numel)
        except ShmUnavailable as exc:
            raise NoSharedMemory(f"no shared memory: {exc}") from None
        with self._lock:
            try:
                self._check_member(worker_id)  # (it may have left while the file was opened)
                holder = next((w for w, held in self._held.items() if held.key == seg.key and w != worker_id), None)
                if holder is not None:
                    self._rejections["shm_not_yours"] += 1
                    raise NoSharedMemory(f"no shared memory: segment {name} is worker {holder}'s on shard "
                                         f"{self.shard_id}; worker {worker_id} must push through a "
                                         f"segment of its own (or over gRPC)")
            except ShardpsError:
                seg.retire()
                raise
            old, self._held[worker_id] = self._held.get(worker_id), seg
            seg.acquire()
        if old is not None:
            old.retire()  # closed once the calls still using it are done with it
        return seg

    def read(self, worker_id: int, seg: SegmentFile, out: torch.Tensor) -> None:
        """Copy this shard's range of ``seg``'s gradients into ``out`` (a buffer of the server's: the
        worker can change nothing in it afterwards). A file that no longer holds them fails this push
        only (NoSharedMemory), and the segment is let go."""
        try:
            seg.read_grads(self.start, out)
        except ShmUnavailable as exc:
            with self._lock:
                if self._held.get(worker_id) is seg:
                    del self._held[worker_id]
                    seg.retire()
                self._rejections["shm_unreadable"] += 1
            raise NoSharedMemory(f"no shared memory: {exc}") from None

    def write(self, seg: SegmentFile, param: torch.Tensor) -> None:
        """Write ``param`` (this shard's slice) into the worker's values in ``seg`` (the caller holds the
        lock, so the slice is of one version). NoSharedMemory when the file refuses (a full /dev/shm)."""
        try:
            seg.write_values(self.start, param)
        except ShmUnavailable as exc:
            raise NoSharedMemory(f"no shared memory: {exc}") from None

    def forget_departed(self) -> None:
        """Close, and unlink, the segments of workers no longer in the newest view (a killed worker
        leaks no shared memory); also sweep segments whose creator died before it pushed here. Under
        the lock."""
        epoch, members = self._members()
        if not epoch:
            return
        for w in [w for w in self._held if w not in members]:
            seg = self._held.pop(w)
            seg.unlink()
            seg.retire()
        sweep()

    def _check_member(self, worker_id: int) -> None:
        epoch, members = self._members()
        if worker_id not in members:
            self._rejections[UnknownWorker.reason] += 1
            raise UnknownWorker(f"worker {worker_id} is not a member of the newest view (epoch {epoch}, members "
                                f"{sorted(members)}): its shared memory is not opened; register with the coordinator")
