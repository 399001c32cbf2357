"""Named tensors written straight from their own memory to a file, and read back a chunk at a time.

A shard saves its state (a checkpoint, an export) as one version of the slice, its
optimizer state and its dedup table. Cloning all of it first would double the
server's memory exactly when it saves; instead the caller holds the shard's lock
while the tensors' bytes go from their memory to the file (``os.write`` of
zero-copy views: the bytes land in the kernel's page cache, which is not the
process's memory and which the kernel writes back and frees on its own), then lets
go: pushes wait for the write, not for the disk (fsync comes after, outside it).

    header = safetensors_header(tensors, {"format": "..."})
    write_all(fd, header); write_tensors(fd, tensors)     # a safetensors file
    spill = Spill(tensors, directory)                     # a private copy on disk
    for name, chunk in spill.chunks(1 << 20): ...         # wire.Chunk, read with pread
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterator

import torch

from ..proto import codec, wire
from ..proto.errors import SpillError

WRITE_BYTES = 64 << 20  # one os.write at a time (Linux writes at most ~2 GiB per call anyway)

# safetensors' dtype names for what a shard keeps (fp32 state, a uint8 buffers file, scalar steps)
_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a view of its memory (no copy)."""
    return memoryview(codec.as_bytes(tensor.detach())).cast("B")


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file whose data section is ``tensors``'
    bytes in this order (what ``write_tensors`` writes); padded to 8 bytes as safetensors does."""
    entries: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: cannot write {t.dtype} to a safetensors file")
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_all(fd: int, data) -> None:
    """Write all of ``data`` (bytes or a memoryview) to ``fd``; raises OSError (ENOSPC, EIO)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        done = os.write(fd, view[:WRITE_BYTES])
        view = view[done:]


def write_tensors(fd: int, tensors: dict[str, torch.Tensor]) -> None:
    """Each tensor's bytes, one after the other, from its own memory."""
    for t in tensors.values():
        write_all(fd, raw(t))


class Spill:
    """A private copy of named tensors in an unlinked temporary file (gone when closed, or when the
    process dies), taken at the cost of a write into the page cache (call it under the lock that
    keeps them still); read back a chunk at a time. ``directory`` (made if missing) defaults to the
    system's temporary one. Raises SpillError when it cannot be written (full, read-only)."""

    def __init__(self, tensors: dict[str, torch.Tensor], directory: str | os.PathLike | None = None):
        self.index: list[tuple[str, torch.dtype, list[int], int, int]] = []  # name, dtype, shape, offset, bytes
        self._file = None
        offset = 0
        try:
            if directory is not None:
                os.makedirs(directory, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=directory, prefix=".shardps-spill-")
            for name, t in tensors.items():
                n = t.numel() * t.element_size()
                write_all(self._file.fileno(), raw(t))
                self.index.append((name, t.dtype, list(t.shape), offset, n))
                offset += n
        except OSError as exc:
            self.close()
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            raise SpillError(f"a copy of {total} bytes could not be written to "
                             f"{directory or tempfile.gettempdir()}: {exc.strerror or exc}; free space there "
                             "or point TMPDIR (or the server's --checkpoint-dir) at a disk that has it") from None

    def chunks(self, chunk_bytes: int) -> Iterator[tuple[str, wire.Chunk]]:
        """(name, chunk) for every tensor in order, each chunk at most ``chunk_bytes`` read from the
        file (at least one chunk per tensor, even an empty one)."""
        fd = self._file.fileno()
        for name, dtype, shape, offset, n in self.index:
            code = codec.wire_dtype(dtype)
            if n == 0:
                yield name, wire.Chunk(code, shape, 0, b"")
            for at in range(0, n, chunk_bytes):
                data = os.pread(fd, min(chunk_bytes, n - at), offset + at)
                if len(data) != min(chunk_bytes, n - at):
                    raise OSError(f"spill file ended early reading {name!r} at byte {at}")
                yield name, wire.Chunk(code, shape, at, data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
