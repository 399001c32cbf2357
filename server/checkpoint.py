"""Durable shards: one safetensors file per checkpoint, written atomically.

A checkpoint holds everything a restarted shard needs to go on exactly where the
job was at that version: the fp32 slice, the optimizer's state tensors (by name,
``optim/<i>/<key>`` per piece), the param groups' hyper-parameters, shard 0's
buffers file, the version, the dedup table (each worker's last applied step) and
the job spec. The tensors are safetensors; the rest is the file's string metadata. Files are
named ``ckpt-<version>.safetensors`` inside the shard's own directory.

Writing: the tensors' bytes go from the shard's own tensors (no copy: server/tensorfile.py)
to ``.ckpt-<version>.tmp-<pid>-<n>`` in the same directory while the caller holds the
shard's lock (``begin``: one version, exactly); then, on the writer thread and without the
lock, fsync it, rename it over the final name, fsync the directory (``finish``). A crash
or a full disk at any point leaves either the old set of checkpoints or the old
set plus a complete new one, never a torn file under a final name; leftover
temporary files are removed at the next write. Reading checks the format tag
and the shard before trusting a file.

    store = CheckpointStore(Path("ckpt/shard-1"), keep=3)
    info = store.write(snapshot)            # a ShardState.checkpoint_snapshot()
    with state.cond:                        # or, without a copy of the state:
        pending = store.begin(state.checkpoint_snapshot(live=True))
    info = store.finish(pending)
    snap = store.load(store.versions()[-1])
"""
from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import queue
import re
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from ..proto.errors import CheckpointError, FailedPrecondition
from .tensorfile import safetensors_header, write_all, write_tensors

log = logging.getLogger("shardps.checkpoint")

FORMAT = "shardps-shard-checkpoint/2"
_NAME = re.compile(r"^ckpt-(\d{12})\.safetensors$")
_serial = itertools.count()  # temporary names: two writes of one version never share a file


@dataclass
class Snapshot:
    """A shard's training state at one version: copies, safe to use from another thread, or (``live``)
    the shard's own tensors, to be used only while its lock is held."""

    job_id: str
    job_spec: bytes  # serialized JobSpec
    shard_id: int
    start: int
    stop: int
    version: int
    last_step: dict[int, int]  # the dedup table
    param: torch.Tensor
    optimizer_state: dict[str, torch.Tensor]  # by "optim/<i>/<key>" (server.slice_optimizer)
    hyper_json: str = ""  # the param groups' hyper-parameters at this version
    buffers: bytes | None = None  # shard 0: the model's buffers file


@dataclass(frozen=True)
class Written:
    version: int
    path: Path
    bytes: int


@dataclass(frozen=True)
class Pending:
    """A checkpoint whose bytes are in its temporary file, not yet synced nor under its final name."""

    version: int
    shard_id: int
    tmp: Path
    seconds: float = 0.0  # how long writing the bytes took (under the shard's lock, for a live snapshot)


class CheckpointStore:
    """The checkpoints of one shard, in one directory."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.dir, self.keep = Path(directory), keep
        self._pending: set[str] = set()  # temporary files begun, not yet finished
        self._lock = threading.Lock()

    def path(self, version: int) -> Path:
        return self.dir / f"ckpt-{version:012d}.safetensors"

    def versions(self) -> list[int]:
        """Versions with a complete checkpoint file, ascending."""
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(self.dir)) if m)

    def write(self, snap: Snapshot) -> Written:
        """Write ``snap`` atomically; raises CheckpointError (previous checkpoints intact) on failure."""
        return self.finish(self.begin(snap))

    def begin(self, snap: Snapshot) -> Pending:
        """Write ``snap``'s bytes to a new temporary file, straight from its tensors (no copy: with a
        live snapshot, hold the shard's lock until this returns). Blocks for the write into the page
        cache, not for the disk. Raises CheckpointError (nothing left behind) on failure."""
        tensors = {"param": snap.param.contiguous()}
        tensors.update({k: v.contiguous() for k, v in sorted(snap.optimizer_state.items())})
        if snap.buffers is not None:
            tensors["buffers"] = torch.frombuffer(bytearray(snap.buffers), dtype=torch.uint8)
        metadata = {
            "format": FORMAT, "job_id": snap.job_id, "job_spec": base64.b64encode(snap.job_spec).decode(),
            "shard_id": str(snap.shard_id), "start": str(snap.start), "stop": str(snap.stop),
            "version": str(snap.version), "last_step": json.dumps({str(k): v for k, v in snap.last_step.items()}),
            "hyperparams": snap.hyper_json,
        }
        tmp = self.dir / f".ckpt-{snap.version:012d}.tmp-{os.getpid()}-{next(_serial)}"
        start = time.perf_counter()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            with self._lock:
                self._pending.add(tmp.name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, safetensors_header(tensors, metadata))
                write_tensors(fd, tensors)
            finally:
                os.close(fd)
        except Exception as exc:  # OSError: a full disk, an I/O error
            raise self._failed(snap.shard_id, snap.version, tmp, exc) from None
        return Pending(snap.version, snap.shard_id, tmp, time.perf_counter() - start)

    def finish(self, pending: Pending) -> Written:
        """fsync ``pending``'s file, rename it to its final name, fsync the directory, prune old ones.
        Blocks for the disk; needs no lock. Raises CheckpointError (previous checkpoints intact)."""
        final = self.path(pending.version)
        try:
            with open(pending.tmp, "rb+") as f:
                os.fsync(f.fileno())
            size = os.path.getsize(pending.tmp)
            os.replace(pending.tmp, final)
            _fsync_dir(self.dir)
        except Exception as exc:
            raise self._failed(pending.shard_id, pending.version, pending.tmp, exc) from None
        finally:
            with self._lock:
                self._pending.discard(pending.tmp.name)
        self._prune()
        return Written(pending.version, final, size)

    def _failed(self, shard_id: int, version: int, tmp: Path, exc: Exception) -> CheckpointError:
        tmp.unlink(missing_ok=True)
        with self._lock:
            self._pending.discard(tmp.name)
        reason = getattr(exc, "strerror", None) or str(exc)
        return CheckpointError(
            f"checkpoint of shard {shard_id} at version {version} failed in {self.dir}: "
            f"{reason}; the previous checkpoints are intact (free space or pick another --checkpoint-dir)")

    def load(self, version: int, shard_id: int | None = None) -> Snapshot:
        path = self.path(version)
        try:
            raw = path.read_bytes()
            tensors = st_load(raw)
            meta = _metadata(raw)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a shardps shard checkpoint (format {meta.get('format')!r})")
        if shard_id is not None and int(meta["shard_id"]) != shard_id:
            raise FailedPrecondition(f"{path} belongs to shard {meta['shard_id']}, not shard {shard_id}")
        buffers = tensors.pop("buffers", None)
        return Snapshot(
            job_id=meta["job_id"], job_spec=base64.b64decode(meta["job_spec"]), shard_id=int(meta["shard_id"]),
            start=int(meta["start"]), stop=int(meta["stop"]), version=int(meta["version"]),
            last_step={int(k): v for k, v in json.loads(meta["last_step"]).items()},
            param=tensors.pop("param"),
            optimizer_state=tensors,
            hyper_json=meta.get("hyperparams", ""),
            buffers=buffers.numpy().tobytes() if buffers is not None else None,
        )

    def latest(self, shard_id: int | None = None) -> Snapshot | None:
        """The newest checkpoint that reads back whole (an unreadable one is skipped, with a warning)."""
        for version in reversed(self.versions()):
            try:
                return self.load(version, shard_id)
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
        return None

    def _prune(self) -> None:
        for version in self.versions()[:-self.keep]:
            self.path(version).unlink(missing_ok=True)

    def _remove_leftovers(self) -> None:
        """Temporary files of earlier writers that died (not the ones this store is still finishing)."""
        with self._lock:
            pending = set(self._pending)
        for name in os.listdir(self.dir):
            if name.startswith(".ckpt-") and ".tmp-" in name and name not in pending:
                (self.dir / name).unlink(missing_ok=True)


def _metadata(raw: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file (the 8-byte header length, then JSON)."""
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or n > len(raw) - 8:
        raise ValueError("truncated safetensors header")
    return json.loads(raw[8:8 + n]).get("__metadata__", {})


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """When a shard writes checkpoints: at its first version (0, or an added param group's first
    step), every ``every`` versions, on request, at exit.

    ``on_version`` runs under the shard's lock at each new version; when a checkpoint
    is due it writes the state's bytes to a temporary file there, from the shard's own
    tensors (so every shard of a sync job checkpoints the same step, and the server's
    memory does not grow by a copy of its state), and hands the file to one writer
    thread, which syncs and renames it. At most one file waits for the writer, so a
    slow disk slows training down rather than piling up unsynced checkpoints.
    """

    def __init__(self, store: CheckpointStore, every: int = 0):
        if every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {every}")
        self.store, self.every = store, every
        self.written = self.failures = 0
        self.last: Written | None = None
        self.last_error = ""
        self._requests: dict[int, list[Future]] = {}  # version -> callers waiting for its checkpoint
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="shardps-checkpoint", daemon=True)
        self._thread.start()

    def on_version(self, state) -> None:
        version = state.version
        with self._lock:
            asked = version in self._requests  # by callers waiting for it, or by ``at`` (nobody waits)
            waiting = self._requests.pop(version, [])
        if asked or version == state.job.first_step or (self.every and version % self.every == 0):
            self._begin(state, waiting)

    def at(self, state, version: int) -> bool:
        """Checkpoint ``state`` when it reaches ``version`` (now if it is there), without waiting for it;
        returns False (writing nothing) if it is past ``version`` already. Takes ``state``'s lock."""
        return self._ask(state, version, None)

    def _ask(self, state, version: int, done: Future | None) -> bool:
        waiting = [done] if done is not None else []
        with state.cond:
            if version < state.version and done is None:
                return False
            if version <= state.version:
                self._begin(state, waiting)
            else:
                with self._lock:
                    self._requests.setdefault(version, []).extend(waiting)
        return True

    def request(self, state, at_version: int, timeout: float) -> Written:
        """Checkpoint once the shard reaches ``at_version`` (now if it is there or past it); block
        until written. Raises CheckpointError, or WaitTimeout if the version is not reached in time."""
        done: Future = Future()
        self._ask(state, at_version, done)
        try:
            return done.result(timeout=timeout)
        except FutureTimeout:
            from ..proto.errors import WaitTimeout

            with self._lock:
                if done in self._requests.get(at_version, []):
                    self._requests[at_version].remove(done)
            raise WaitTimeout(f"shard did not reach version {at_version} within {timeout:.0f}s "
                              "(is training running?); nothing was written") from None

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every queued checkpoint is written."""
        done: Future = Future()
        self._queue.put((None, [done]))
        done.result(timeout=timeout)

    def _begin(self, state, waiting: list[Future]) -> None:
        """Under the shard's lock: its bytes to a temporary file, then to the writer thread. A failure
        is the waiting callers' error (and a logged one), never the push's that reached the version."""
        try:
            pending = self.store.begin(state.checkpoint_snapshot(live=True))
        except CheckpointError as exc:
            self._failed(exc, waiting)
            return
        self._queue.put((pending, waiting))

    def _failed(self, exc: CheckpointError, waiting: list[Future]) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = str(exc)
        log.error("%s", exc)
        for f in waiting:
            f.set_exception(exc)

    def _run(self) -> None:
        while True:
            pending, waiting = self._queue.get()
            if pending is None:
                for f in waiting:
                    f.set_result(None)
                continue
            start = time.perf_counter()
            try:
                written = self.store.finish(pending)
            except CheckpointError as exc:
                self._failed(exc, waiting)
                continue
            with self._lock:
                self.written += 1
                self.last = written
            log.info("checkpoint of version %d written to %s (%d bytes; %.3f s writing under the shard's lock, "
                     "%.3f s syncing after)", written.version, written.path, written.bytes, pending.seconds,
                     time.perf_counter() - start)
            for f in waiting:
                f.set_result(written)
