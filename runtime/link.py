"""The byte link: a push's gradient and its reply's slice as raw bytes on a plain TCP connection
beside gRPC, without gRPC's per-message work (a Python bytes object per 1 MiB chunk, protobuf
framing, HTTP/2 flow control under the GIL). gRPC still carries every push's header, options,
identity and result, so validation, exactly-once, rollbacks and fault injection are unchanged;
only the bulk bytes move here (as they move through /dev/shm on one host, ``proto/shm.py``).

A worker asks the shard for a link (``OpenLink``, an authenticated gRPC call), connects to the
port it is given and sends HELLO: MAGIC and the one-time ticket. The server binds the connection
to (job, shard, worker) and answers ACK. After that each push moves one frame each way:

    frame header: MAGIC (8 bytes), nonce (u64), dtype code (u8), byte count (u64), little-endian
    frame body:   the tensor's bytes, straight from and into tensor memory (no copies in Python)

The nonce is the push attempt's (``PushHeader.link.nonce``). A frame with another nonce, dtype or
size than the one expected means the two ends lost step: the link is closed, never resynced, and
the push is sent again (on a new link, or over gRPC), which the shard answers as the duplicate it
is. Every read and write runs under a deadline and an idle limit; any failure closes the socket.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

import torch

MAGIC = b"SPSLINK1"
TICKET_BYTES = 16
HELLO = struct.Struct(f"<8s{TICKET_BYTES}s")
FRAME = struct.Struct("<8sQBQ")  # magic, nonce, dtype code, byte count
ACK = b"\x06"
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class LinkError(Exception):
    """The link failed (closed, reset, timed out, out of step); it is closed and cannot be used again."""


class LinkSocket:
    """One end of a byte link: whole frames in and out. Not for concurrent use: one push at a time
    (``claim``/``release`` guard that on the server, where a retry may race its first try)."""

    def __init__(self, sock: socket.socket, idle_timeout: float):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.idle_timeout = sock, idle_timeout
        self._busy = threading.Lock()
        self.closed = False

    def claim(self) -> bool:
        """Take the link for one push (False: another push holds it, or it is closed)."""
        if self.closed or not self._busy.acquire(blocking=False):
            return False
        if self.closed:
            self._busy.release()
            return False
        return True

    def release(self) -> None:
        self._busy.release()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it (and on its ``duplex`` twin)
        except OSError:
            pass
        self.sock.close()

    def duplex(self) -> "LinkSocket":
        """A second end on the same connection, for one thread to write while another reads (a push
        in parts): its own descriptor and timeouts. ``close`` either end to break the connection;
        ``let_go`` the twin when done with it (its descriptor only)."""
        return LinkSocket(self.sock.dup(), self.idle_timeout)

    def let_go(self) -> None:
        """Close this end's descriptor without breaking the connection (a ``duplex`` twin that is done)."""
        self.closed = True
        self.sock.close()

    def send(self, nonce: int, tensor: torch.Tensor, deadline: float) -> None:
        """One frame: ``tensor`` (contiguous, CPU) under ``nonce``. ``deadline`` is time.monotonic()'s."""
        body = _bytes_of(tensor)

        def op():
            self._sendall(FRAME.pack(MAGIC, nonce, DTYPE_CODES[tensor.dtype], body.nbytes), deadline)
            self._sendall(body, deadline)

        self._io(op)

    def receive_header(self, nonce: int, deadline: float) -> tuple[torch.dtype, int]:
        """The next frame's (dtype, byte count), checked against ``nonce``; its body follows."""
        head = bytearray(FRAME.size)
        self._io(lambda: self._recv_into(memoryview(head), deadline))
        magic, got, code, nbytes = FRAME.unpack(head)
        if magic != MAGIC or got != nonce or code not in DTYPES:
            self.close()
            raise LinkError(f"the link is out of step (frame for nonce {got:#x}, dtype code {code}; expected nonce "
                            f"{nonce:#x})")
        return DTYPES[code], nbytes

    def receive_into(self, out: torch.Tensor, deadline: float) -> None:
        """The frame's body, straight into ``out`` (contiguous, CPU, of the frame's dtype and size)."""
        self._io(lambda: self._recv_into(_bytes_of(out), deadline))

    def receive(self, nonce: int, out: torch.Tensor, deadline: float) -> None:
        """One frame under ``nonce`` that must be exactly ``out``'s dtype and size, into ``out``."""
        dtype, nbytes = self.receive_header(nonce, deadline)
        if dtype != out.dtype or nbytes != out.numel() * out.element_size():
            self.close()
            raise LinkError(f"the link's frame holds {nbytes} bytes of {dtype}; expected {out.numel()} {out.dtype}")
        self.receive_into(out, deadline)

    # ------------------------------------------------------------------ plumbing

    def _io(self, op) -> None:
        if self.closed:
            raise LinkError("the link is closed")
        try:
            op()
        except LinkError:
            self.close()
            raise
        except OSError as exc:  # reset, refused, timed out (socket.timeout is an OSError)
            self.close()
            raise LinkError(f"the link failed: {exc or type(exc).__name__}") from None

    def _wait(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LinkError("the push's deadline passed while its bytes were on the link")
        self.sock.settimeout(min(left, self.idle_timeout))

    def _sendall(self, data, deadline: float) -> None:
        view = memoryview(data).cast("B")
        while view:
            self._wait(deadline)
            sent = self.sock.send(view)
            view = view[sent:]

    def _recv_into(self, view: memoryview, deadline: float) -> None:
        view = view.cast("B")
        while view:
            self._wait(deadline)
            got = self.sock.recv_into(view)
            if got == 0:
                raise LinkError("the other end closed the link")
            view = view[got:]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, bfloat16 included)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("link frames move contiguous CPU tensors")
    if not tensor.numel():
        return memoryview(bytearray())
    return memoryview(tensor.view(torch.uint8).numpy())  # type: ignore[arg-type]  # ndarray is a buffer


def split_address(address: str) -> str:
    """The host of a gRPC target (``host:port``, ``[v6]:port``, ``dns:///host:port``); "" where there is
    no TCP host to dial (a unix socket)."""
    if address.startswith("unix:"):
        return ""
    address = address.split("///", 1)[-1]
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")
