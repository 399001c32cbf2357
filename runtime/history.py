"""A run's history: what every process of it did, appended as it happens, for ``shardps check``.

Each role (coordinator, shard server, worker, the fault lab's driver) appends one JSON object a line
to a file of its own in the run's history folder (``SHARDPS_HISTORY_DIR``, ``--history-dir``;
``LocalCluster`` and ``shardps run`` give every role ``<log dir>/history``). A line reaches the
kernel as soon as it is written (line-buffered), so a SIGKILLed process loses nothing it recorded;
a file stops growing at ``max_bytes`` with a last ``truncated`` event, and the checker then says its
verdict covers only what was recorded. Recording costs one ``json.dumps`` and one ``write`` per event
(a shard records one event per applied step; bench/RESULTS.md has the figure).

Every event carries ``t`` (wall-clock seconds: the processes of a run share a host's clock, or
the checker orders them by versions, not by time), ``n`` (its place in its file), ``role``,
``pid`` and ``kind``. The kinds, and what ``chaos/checker.py`` proves with them:

| kind | who | fields |
|---|---|---|
| ``start`` | every process | |
| ``job`` | server | job, shard, mode, backup_workers, replicas |
| ``applied`` | server (the primary) | job, shard, version (after), step (sync) or null, pushed {worker: step}, members, placement |
| ``skipped`` | server | job, shard, version, step: a step closed without an update (fp16 overflow) |
| ``replayed`` | server (a backup) | job, shard, version, pushed, placement |
| ``restored`` | server | job, shard, version: the state went back to (or was copied at) this version |
| ``acked`` | worker | job, shard, worker, step, version: a reply the worker took |
| ``fault`` | fault lab | action, target |

    history = History.open(directory, "server")   # NO_HISTORY when directory is ""
    history.record("applied", job=..., shard=0, version=7, step=6, pushed={"0": 6, "1": 6})
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ..proto.defaults import setting

DEFAULT_MAX_BYTES = 256 << 20  # per process file: ~2 M applied steps; recording stops there, said so
ENV = setting("history_dir").env  # SHARDPS_HISTORY_DIR


class History:
    """One process's append-only history file. Thread-safe; ``record`` never raises for I/O errors
    (a history that cannot be written must not stop training: it records ``broken`` and stops)."""

    def __init__(self, path: Path, role: str, max_bytes: int = DEFAULT_MAX_BYTES):
        self.path, self.role, self.max_bytes = path, role, max_bytes
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the process's life
        self._lock = threading.Lock()
        self._count = self._bytes = 0
        self._stopped = False
        self.record("start")

    @classmethod
    def open(cls, directory: str | os.PathLike, role: str, max_bytes: int = DEFAULT_MAX_BYTES) -> "History":
        """A new file for this process in ``directory`` (made if missing); NO_HISTORY for ""."""
        if not directory:
            return NO_HISTORY
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder / f"{role}-{os.getpid()}-{time.time_ns()}.jsonl", role, max_bytes)

    def record(self, kind: str, **fields) -> None:
        with self._lock:
            if self._stopped:
                return
            event = {"t": time.time(), "n": self._count, "role": self.role, "pid": os.getpid(), "kind": kind,
                     **fields}
            line = json.dumps(event, separators=(",", ":")) + "\n"
            if self._bytes + len(line) > self.max_bytes:
                line, self._stopped = json.dumps({**event, "kind": "truncated"}) + "\n", True
            try:
                self._file.write(line)
            except (OSError, ValueError):
                self._stopped = True
                return
            self._count += 1
            self._bytes += len(line)

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._file.close()


class _NoHistory(History):
    """Records nothing (no history folder was given)."""

    def __init__(self):  # noqa: D107 - no file
        self.path, self.role = None, ""

    def record(self, kind: str, **fields) -> None:
        pass

    def close(self) -> None:
        pass


NO_HISTORY = _NoHistory()
