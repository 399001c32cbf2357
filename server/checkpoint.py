"""Durable shards: one safetensors file per checkpoint, written atomically.

A checkpoint holds everything a restarted shard needs to go on exactly where the
job was at that version: the fp32 slice, the optimizer's state tensors (by name,
``optim/<i>/<key>`` per piece), the param groups' hyper-parameters, shard 0's
buffers file, the version, the dedup table (each worker's last applied step) and
the job spec. The tensors are safetensors; the rest is the file's string metadata. Files are
named ``ckpt-<version>.safetensors`` inside the shard's own directory.

Writing: serialize to ``.ckpt-<version>.tmp-<pid>`` in the same directory,
flush and fsync it, rename it over the final name, fsync the directory. A crash
or a full disk at any point leaves either the old set of checkpoints or the old
set plus a complete new one, never a torn file under a final name; leftover
temporary files are removed at the next write. Reading checks the format tag
and the shard before trusting a file.

    store = CheckpointStore(Path("ckpt/shard-1"), keep=3)
    info = store.write(snapshot)            # a ShardState.snapshot_for_checkpoint()
    snap = store.load(store.versions()[-1])
"""
from __future__ import annotations

import base64
import json
import logging
import os
import queue
import re
import threading
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load, save_file as st_save_file

from ..proto.errors import CheckpointError, FailedPrecondition
from ..proto.process import release_free_memory

log = logging.getLogger("shardps.checkpoint")

FORMAT = "shardps-shard-checkpoint/2"
_NAME = re.compile(r"^ckpt-(\d{12})\.safetensors$")


@dataclass
class Snapshot:
    """A shard's training state at one version (copies, safe to write from another thread)."""

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


class CheckpointStore:
    """The checkpoints of one shard, in one directory."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.dir, self.keep = Path(directory), keep

    def path(self, version: int) -> Path:
        return self.dir / f"ckpt-{version:012d}.safetensors"

    def versions(self) -> list[int]:
        """Versions with a complete checkpoint file, ascending."""
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(self.dir)) if m)

    def write(self, snap: Snapshot) -> Written:
        """Write ``snap`` atomically; raises CheckpointError (previous checkpoints intact) on failure."""
        tensors = {"param": snap.param.contiguous()}
        tensors.update({k: v.contiguous() for k, v in snap.optimizer_state.items()})
        if snap.buffers is not None:
            tensors["buffers"] = torch.frombuffer(bytearray(snap.buffers), dtype=torch.uint8)
        metadata = {
            "format": FORMAT, "job_id": snap.job_id, "job_spec": base64.b64encode(snap.job_spec).decode(),
            "shard_id": str(snap.shard_id), "start": str(snap.start), "stop": str(snap.stop),
            "version": str(snap.version), "last_step": json.dumps({str(k): v for k, v in snap.last_step.items()}),
            "hyperparams": snap.hyper_json,
        }
        final = self.path(snap.version)
        tmp = self.dir / f".ckpt-{snap.version:012d}.tmp-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            # Streamed from the tensors to the file: no second in-memory copy of the whole slice.
            st_save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            size = os.path.getsize(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        except Exception as exc:  # OSError, or safetensors' own error around one (a full disk)
            tmp.unlink(missing_ok=True)
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CheckpointError(
                f"checkpoint of shard {snap.shard_id} at version {snap.version} failed in {self.dir}: "
                f"{reason}; the previous checkpoints are intact (free space or pick another --checkpoint-dir)"
            ) from None
        self._prune()
        return Written(snap.version, final, size)

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
        for name in os.listdir(self.dir):
            if name.startswith(".ckpt-") and ".tmp-" in name:
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
    """When a shard writes checkpoints: at version 0, every ``every`` versions, on request, at exit.

    ``on_version`` runs under the shard's lock at each new version; when a checkpoint
    is due it copies the state there (so every shard of a sync job checkpoints the
    same step) and hands the copy to one writer thread. At most one copy waits for
    the writer, so a slow disk slows training down rather than filling memory.
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
            waiting = self._requests.pop(version, [])
        if waiting or version == 0 or (self.every and version % self.every == 0):
            self._queue.put((state.checkpoint_snapshot(), waiting))

    def request(self, state, at_version: int, timeout: float) -> Written:
        """Checkpoint once the shard reaches ``at_version`` (now if it is there or past it); block
        until written. Raises CheckpointError, or WaitTimeout if the version is not reached in time."""
        done: Future = Future()
        with state.cond:
            if at_version <= state.version:
                self._queue.put((state.checkpoint_snapshot(), [done]))
            else:
                with self._lock:
                    self._requests.setdefault(at_version, []).append(done)
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

    def _run(self) -> None:
        while True:
            snap, waiting = self._queue.get()
            if snap is None:
                for f in waiting:
                    f.set_result(None)
                continue
            try:
                written = self.store.write(snap)
            except CheckpointError as exc:
                self.failures += 1
                self.last_error = str(exc)
                log.error("%s", exc)
                for f in waiting:
                    f.set_exception(exc)
                continue
            self.written += 1
            self.last = written
            del snap
            release_free_memory()
            log.info("checkpoint of version %d written to %s (%d bytes)", written.version, written.path,
                     written.bytes)
            for f in waiting:
                f.set_result(written)
