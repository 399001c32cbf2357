"""The same-host byte path: a worker's flat gradients and parameters in one shared-memory segment.

When a worker and a shard server share a host (and ``/dev/shm``), bytes need not cross
a socket: the worker's flat fp32 gradient and parameter vectors live in one file in
``/dev/shm``, backward writes the gradients straight into it (for an fp32 CPU model
they *are* the parameters' ``.grad``), each server reads the gradients of its range
through a file descriptor (``SegmentFile``: ``preadv`` into a buffer of its own; a
server never maps a worker's memory, so no worker can fault it by truncating or
replacing the file), and writes its updated slice back into the worker's parameters
(``pwritev``). gRPC
still carries every push's header, its step options, the exactly-once identity
``(job, worker, step)`` and the reply, so validation, deduplication, rollbacks and
fault injection are unchanged; only the bulk bytes move through memory.

A server's reply lands in the worker's memory from its handler thread, which can run
after the worker gave the call up (a deadline, a shard that moved, a paused primary
that woke). A worker whose push ended without the server saying its handler ended
(``rpc.HANDLER_ENDED``) marks the segment ``exposed`` and moves to a new one before
the step returns (``FlatParams.renew_segment``), so no late write reaches the model.

Negotiation is by trying: a push names the segment (``PushHeader.shm``); a server
that cannot open it (another host, a container without the worker's ``/dev/shm``)
refuses that push (``errors.NoSharedMemory``, a typed reason), and the worker sends
the same push again over gRPC and keeps that shard on gRPC.

Layout (little-endian): a 4096-byte header (magic, version, nonce, numel, the
creator's pid and pid namespace), then ``grads`` fp32[numel], then ``values``
fp32[numel], each starting on a 4096-byte boundary. The name is
``shardps-<32 hex>``. Nothing leaks when a worker is killed: it unlinks the name
when it closes; a server unlinks the segment of a worker that left the job or whose
lease ran out; and ``sweep`` (run by every new segment's creator and by servers when
a worker leaves) unlinks segments whose creator is dead, judged only in the
creator's own pid namespace.

    seg = Segment.create(numel)                        # worker
    seg.grads, seg.values                              # fp32 tensors over the shared memory
    seg = SegmentFile.open(name, nonce, numel)         # server (ShmUnavailable if it cannot)
    seg.read_grads(start, buf); seg.write_values(start, param); seg.retire()
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import struct
import threading

import torch

from ..proto import codec

SHM_DIR = "/dev/shm"
MAGIC = b"SHARDPS\x01"
HEADER = 4096
_FIELDS = struct.Struct("<8sI16sQIQ")  # magic, version, nonce, numel, creator pid, its pid namespace
NAME = re.compile(r"shardps-[0-9a-f]{32}")


class ShmUnavailable(RuntimeError):
    """This host cannot share that segment (another host, another /dev/shm, a full one)."""


def _aligned(n: int) -> int:
    return -(-n // HEADER) * HEADER


def segment_bytes(numel: int) -> int:
    return HEADER + 2 * _aligned(4 * numel)


class Segment:
    def __init__(self, name: str, nonce: bytes, numel: int, fd: int, owner: bool):
        self.name, self.nonce, self.numel, self.owner = name, nonce, numel, owner
        # (worker) a push through it was given up before its server answered: that server may still
        # write its reply in later, whenever it runs again; the worker moves to a new segment
        self.exposed = False
        self.path = os.path.join(SHM_DIR, name)
        size = segment_bytes(numel)
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fd)
        second = HEADER + _aligned(4 * numel)
        self.grads = torch.frombuffer(self._map, dtype=torch.float32, count=numel, offset=HEADER) \
            if numel else torch.zeros(0)
        self.values = torch.frombuffer(self._map, dtype=torch.float32, count=numel, offset=second) \
            if numel else torch.zeros(0)

    @classmethod
    def create(cls, numel: int) -> "Segment":
        """A new segment for ``numel`` elements, its space reserved now (a full /dev/shm raises
        ShmUnavailable here, never SIGBUS later)."""
        size = segment_bytes(numel)
        if not os.path.isdir(SHM_DIR):
            raise ShmUnavailable(f"{SHM_DIR} does not exist on this host")
        sweep()
        name, nonce = f"shardps-{secrets.token_hex(16)}", secrets.token_bytes(16)
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:  # not writable here (another user's /dev/shm, read-only): the bytes go elsewhere
            raise ShmUnavailable(f"cannot create a segment in {SHM_DIR}: {exc.strerror}") from None
        try:
            os.posix_fallocate(fd, 0, size)
            os.pwrite(fd, _FIELDS.pack(MAGIC, 1, nonce, numel, os.getpid(), _pid_namespace()), 0)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise ShmUnavailable(f"cannot reserve {size} bytes in {SHM_DIR}: {exc.strerror}") from None
        return cls(name, nonce, numel, fd, owner=True)

    def unlink(self) -> None:
        """Remove the name (the memory goes once nobody maps it)."""
        _unlink(self.path)

    def close(self) -> None:
        self.grads = self.values = None
        try:
            self._map.close()
        except BufferError:  # a tensor view still exists; the mapping goes with it
            pass


class SegmentFile:
    """A server's handle on a worker's segment: an open file descriptor, never a mapping.

    Bytes move with ``preadv``/``pwritev``, so nothing the worker does to its file can fault the
    server: a file truncated under it gives a short read (``ShmUnavailable``), never SIGBUS, and
    no memory of the worker's is mapped that could be unmapped under a reader. The descriptor is
    closed once the holder let it go (``retire``) and every use in flight ended (``acquire`` /
    ``release`` pair around each use), so it is never closed, or its number reused, mid-call.

    ``key`` is the file's identity (device, inode): a segment is the same file whatever its name.
    """

    def __init__(self, name: str, nonce: bytes, numel: int, fd: int, key: tuple[int, int]):
        self.name, self.nonce, self.numel, self.key = name, nonce, numel, key
        self.path = os.path.join(SHM_DIR, name)
        self.values_offset = HEADER + _aligned(4 * numel)
        self._fd, self._uses, self._lock = fd, 1, threading.Lock()  # the holder's own use

    @classmethod
    def open(cls, name: str, nonce: bytes, numel: int) -> "SegmentFile":
        """Open a worker's segment; ShmUnavailable unless it is a regular file of this user's (no
        symlink, FIFO or device), whole, and the one named. Never blocks."""
        if not NAME.fullmatch(name):
            raise ShmUnavailable(f"{name[:80]!r} is not a shardps segment name")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ShmUnavailable(f"no shared memory {name} on this host ({exc.strerror}): another host, or "
                                 f"another {SHM_DIR}, or not a plain file") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise ShmUnavailable(f"shared memory {name} is not a regular file of this user's")
            magic, version, found, count, _, _ = _FIELDS.unpack(os.pread(fd, _FIELDS.size, 0))
            if (magic, version, found, count, st.st_size) != (MAGIC, 1, bytes(nonce), numel, segment_bytes(numel)):
                raise ShmUnavailable(f"shared memory {name} is not the worker's segment of {numel} elements")
        except (OSError, struct.error) as exc:
            os.close(fd)
            raise ShmUnavailable(f"cannot read shared memory {name}: {exc}") from None
        except ShmUnavailable:
            os.close(fd)
            raise
        return cls(name, bytes(nonce), numel, fd, (st.st_dev, st.st_ino))

    def acquire(self) -> bool:
        """Start a use; False once the holder retired it and the descriptor is (being) closed."""
        with self._lock:
            if self._uses == 0:
                return False
            self._uses += 1
            return True

    def release(self) -> None:
        """End a use (or, once, the holder's own hold: ``retire``); the last one closes the file."""
        with self._lock:
            self._uses -= 1
            fd = self._fd if self._uses == 0 else None
        if fd is not None:
            os.close(fd)

    retire = release

    def unlink(self) -> None:
        """Remove the name (the memory goes once the worker unmaps it and every descriptor is closed)."""
        _unlink(self.path)

    def read_grads(self, start: int, out: torch.Tensor) -> None:
        """Copy gradient elements [start, start + out.numel()) into ``out`` (contiguous fp32).
        ShmUnavailable if the file ends before them (the worker truncated it): ``out`` is then
        partly written, the caller discards it."""
        _transfer(os.preadv, self._fd, _bytes(out), HEADER + 4 * start, self.name)

    def write_values(self, start: int, src: torch.Tensor) -> None:
        """Write ``src`` (contiguous fp32) over parameter elements [start, ...) of the worker's
        values. A truncated file grows back (a write into a file never faults)."""
        _transfer(os.pwritev, self._fd, _bytes(src), self.values_offset + 4 * start, self.name)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(codec.as_bytes(t)) if t.numel() else memoryview(b"")


def _transfer(call, fd: int, view: memoryview, offset: int, name: str) -> None:
    """preadv/pwritev the whole of ``view`` at ``offset`` (a regular file may move less per call)."""
    done, total = 0, len(view)
    while done < total:
        try:
            n = call(fd, [view[done:done + (1 << 30)]], offset + done)
        except OSError as exc:
            raise ShmUnavailable(f"cannot move bytes through shared memory {name}: {exc.strerror}") from None
        if n <= 0:
            raise ShmUnavailable(f"shared memory {name} ends at byte {offset + done}, before the "
                                 f"{total}-byte range at {offset} (it was truncated)")
        done += n


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def creator(path: str) -> tuple[int, int]:
    """The pid that created the segment at ``path`` and its pid namespace; (0, 0) if it is not one."""
    try:  # never follows a link, never blocks on a FIFO someone named like a segment
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0, 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0, 0
        magic, version, _, _, pid, ns = _FIELDS.unpack(os.pread(fd, _FIELDS.size, 0))
    except (OSError, struct.error):
        return 0, 0
    finally:
        os.close(fd)
    return (pid, ns) if (magic, version) == (MAGIC, 1) else (0, 0)


def sweep() -> list[str]:
    """Unlink the segments whose creator died (a SIGKILLed worker), judging only those created in
    this pid namespace (elsewhere a pid means nothing here). Returns the names removed."""
    removed, mine = [], _pid_namespace()
    try:
        names = [n for n in os.listdir(SHM_DIR) if NAME.fullmatch(n)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(SHM_DIR, name)
        pid, ns = creator(path)
        if ns == mine and mine and pid and not _alive(pid):
            try:
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
