"""Process plumbing shared by the long-running roles: port files and stopping on signals."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path


def write_port_file(path: str | None, port: int) -> None:
    """Write the bound port atomically (temp + rename), so a launcher never reads half a number."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, target)


def wait_for_stop_signal() -> int:
    """Block until SIGTERM or SIGINT arrives (docker stop, Ctrl-C); return the signal number."""
    stop, got = threading.Event(), []

    def handler(signum, frame):
        got.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    while not stop.wait(timeout=3600):
        pass
    return got[0]


def release_free_memory() -> None:
    """Hand the allocator's free heap back to the OS (glibc's malloc_trim). The roles run with a high
    trim threshold so per-step buffers are reused, not returned; after a rare bulk transfer (a job's
    initial upload, a pull, a checkpoint) that would otherwise keep hundreds of MB of free heap."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
