"""A shard server's byte links (``runtime/link.py``): the listener, the tickets and the bound links.

``OpenLink`` (authenticated like every worker call) asks ``ticket`` for a one-time ticket bound to
(job, shard, worker). The worker connects to ``port`` and sends it; the handshake binds the
connection to that key (replacing, and closing, the worker's older link there) and answers ACK.
A push that names a link ``take``s it for the push and ``give``s it back.

Nothing a caller does here can hold the server: the listener accepts with a timeout; at most
``max_pending`` handshakes run at once (more connections are closed at once), each with
``handshake_timeout``; tickets expire after ``ticket_ttl`` and at most ``max_tickets`` wait;
at most ``max_links`` links stay bound (the oldest goes first). A link's socket is closed on any
failure, and a worker without one pushes again on a new link or over gRPC.
"""
from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from typing import Hashable

from ..proto.errors import NoLink
from ..runtime.link import ACK, HELLO, MAGIC, LinkSocket

log = logging.getLogger("shardps.server")


class LinkHub:
    def __init__(self, host: str, port: int = 0, *, idle_timeout: float = 5.0, handshake_timeout: float = 5.0,
                 ticket_ttl: float = 30.0, max_tickets: int = 256, max_links: int = 1024, max_pending: int = 32):
        """Bind ``host:port`` (0: any free port) and start accepting. OSError when it cannot bind."""
        self.idle_timeout, self.handshake_timeout, self.ticket_ttl = idle_timeout, handshake_timeout, ticket_ttl
        self.max_tickets, self.max_links = max_tickets, max_links
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host.strip("[]"), port))
        self._listener.listen(128)
        self._listener.settimeout(0.5)  # the accept loop looks at ``closed`` this often
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._tickets: OrderedDict[bytes, tuple[Hashable, float]] = OrderedDict()
        self._links: OrderedDict[Hashable, LinkSocket] = OrderedDict()
        self._pending = threading.BoundedSemaphore(max_pending)
        self.closed = False
        self.refused = 0  # connections closed without binding (bad hello, expired ticket, too many at once)
        threading.Thread(target=self._accept_loop, name="shardps-link-accept", daemon=True).start()

    def ticket(self, key: Hashable) -> bytes:
        """A fresh one-time ticket for ``key`` (the oldest outstanding one is dropped past ``max_tickets``)."""
        ticket = secrets.token_bytes(16)
        now = time.monotonic()
        with self._lock:
            while self._tickets and (len(self._tickets) >= self.max_tickets
                                     or next(iter(self._tickets.values()))[1] < now):
                self._tickets.popitem(last=False)
            self._tickets[ticket] = (key, now + self.ticket_ttl)
        return ticket

    def take(self, key: Hashable) -> LinkSocket:
        """``key``'s link, claimed for one push (``give`` it back). NoLink when there is none free."""
        with self._lock:
            link = self._links.get(key)
        if link is None or not link.claim():
            raise NoLink("no byte link for this worker here (never opened, broken, or replaced): open a new one, "
                         "or push over gRPC")
        return link

    def give(self, key: Hashable, link: LinkSocket) -> None:
        """Hand back a link ``take`` gave; a closed one is forgotten."""
        link.release()
        if link.closed:
            self.drop(key, link)

    def drop(self, key: Hashable, link: LinkSocket | None = None) -> None:
        """Close and forget ``key``'s link (only if it is still ``link``, when given)."""
        with self._lock:
            held = self._links.get(key)
            if held is None or (link is not None and held is not link):
                return
            del self._links[key]
        held.close()

    def drop_where(self, keep) -> None:
        """Close the links whose key ``keep(key)`` refuses (workers that left the job)."""
        with self._lock:
            gone = [(k, link) for k, link in self._links.items() if not keep(k)]
            for k, _ in gone:
                del self._links[k]
        for _, link in gone:
            link.close()

    def links(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        self.closed = True
        self._listener.close()
        with self._lock:
            links, self._links = list(self._links.values()), OrderedDict()
        for link in links:
            link.close()

    # ------------------------------------------------------------------ accepting

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.closed:
                    return
                time.sleep(0.05)  # out of descriptors: let the next try find some
                continue
            if not self._pending.acquire(blocking=False):
                self.refused += 1
                conn.close()  # too many handshakes at once: this one is not waited for
                continue
            threading.Thread(target=self._handshake, args=(conn,), name="shardps-link-hello", daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            key = self._hello(conn)
            if key is None:
                self.refused += 1
                conn.close()
                return
            link = LinkSocket(conn, self.idle_timeout)
            with self._lock:
                old = self._links.pop(key, None)
                self._links[key] = link
                extra = [self._links.popitem(last=False)[1] for _ in range(len(self._links) - self.max_links)]
            for stale in ([old] if old is not None else []) + extra:
                stale.close()
            try:
                conn.settimeout(self.handshake_timeout)
                conn.sendall(ACK)
            except OSError:
                self.drop(key, link)
        finally:
            self._pending.release()

    def _hello(self, conn: socket.socket) -> Hashable | None:
        """The key of a valid hello's ticket (used up), or None."""
        deadline = time.monotonic() + self.handshake_timeout  # for the whole hello, however it trickles in
        data = bytearray()
        try:
            while len(data) < HELLO.size:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                conn.settimeout(left)
                chunk = conn.recv(HELLO.size - len(data))
                if not chunk:
                    return None
                data += chunk
        except OSError:
            return None
        magic, ticket = HELLO.unpack(bytes(data))
        if magic != MAGIC:
            return None
        with self._lock:
            entry = self._tickets.pop(ticket, None)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]
