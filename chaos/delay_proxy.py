"""A transparent TCP proxy that adds latency: ``shardps.chaos.netns``'s ``delay()`` when the kernel lacks netem.

    python -m shardps.chaos.delay_proxy --port P --delay-ms D [--control-stdin]

It runs inside a host's network namespace; iptables NAT rules in that namespace steer the host's
TCP connections to it (see ``Network.delay``):

* ``nat OUTPUT ... -j REDIRECT --to-ports P``: connections the host *opens* arrive from 127.0.0.1.
  Data flowing host -> peer is delayed, and so is the connect to the peer (the SYN leaves late).
* ``nat PREROUTING -i eth0 ... -j REDIRECT --to-ports P``: connections *to* the host arrive on its
  own address. Data flowing back, host -> peer, is delayed.

Either way it is the host's outgoing bytes that are late by ``D`` ms, as netem's egress delay would
make them, so a round trip over the host's link grows by ``D``. The proxy learns the real
destination with ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` and marks its own outgoing sockets with
``SO_MARK`` (``--mark``) so the NAT rules let them through instead of looping them back.

Delay is a pipelined queue per direction: each chunk is stamped ``read time + D`` when read and
written when that time comes, while reading goes on, so order is kept and throughput is not reduced
(the queue is bounded, giving back-pressure). Only TCP is delayed.

Bounded life: it exits on SIGTERM/SIGINT, when its parent process dies (its parent pid changes),
and, with ``--control-stdin``, when stdin reaches EOF. With ``--control-stdin`` it also reads
commands, one per line, and answers each on stdout: ``delay <ms>`` changes the delay of every
connection, existing ones included, and answers ``ok``. Its first stdout line is
``listening <port>`` once it accepts connections (``--port 0`` picks a free port).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
DEFAULT_MARK = 0x5157
CHUNK = 64 * 1024
QUEUE_CHUNKS = 256  # per direction: at most 16 MiB in flight, i.e. 160 MB/s at 100 ms
PARENT_POLL_S = 0.25


class Proxy:
    """The proxy's state: the current delay, the mark for its own sockets, the live connections."""

    def __init__(self, delay_ms: float, mark: int):
        self.delay_s = max(0.0, delay_ms) / 1000.0
        self.mark = mark
        self.tasks: set[asyncio.Task] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One accepted connection: connect to its original destination and relay both ways."""
        task = asyncio.current_task()
        self.tasks.add(task)
        up_writer = None
        try:
            sock = writer.get_extra_info("socket")
            local = sock.getsockname()
            dest = original_destination(sock)
            if dest == local[:2]:
                return  # reached directly, not through a NAT rule: relaying would loop to ourselves
            outgoing = local[0].startswith("127.")  # OUTPUT REDIRECT maps to 127.0.0.1
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if outgoing and self.delay_s > 0:
                await asyncio.sleep(self.delay_s)  # the SYN leaves the host late
            up_reader, up_writer = await self.connect(dest)
            await first_failure(
                self.pump(reader, up_writer, delayed=outgoing),
                self.pump(up_reader, writer, delayed=not outgoing),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass  # refused, reset, unreachable: closing our side tells the peer
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            self.tasks.discard(task)

    async def connect(self, dest: tuple[str, int]):
        """Open a marked connection to ``dest`` (the mark exempts it from the REDIRECT rules)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, dest)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=CHUNK)

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool) -> None:
        """Copy ``reader`` to ``writer``, each chunk written ``delay`` after it was read (if ``delayed``)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)

        async def read_side() -> None:
            due = 0.0
            while True:
                data = await reader.read(CHUNK)
                # Never earlier than the chunk before: a lowered delay must not reorder the stream.
                due = max(loop.time() + (self.delay_s if delayed else 0.0), due)
                await queue.put((due, data))
                if not data:
                    return

        async def write_side() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # EOF: pass the half-close on
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        await first_failure(read_side(), write_side())


async def first_failure(*coros) -> None:
    """Run ``coros`` concurrently until all finish or one raises; then cancel the rest and re-raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in done if not t.cancelled()]
        for error in errors:
            if error is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The (address, port) a NAT-redirected connection was addressed to."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


def _watch_stdin(loop: asyncio.AbstractEventLoop, proxy: Proxy, stop: asyncio.Event) -> None:
    """Thread: apply ``delay <ms>`` commands from stdin; EOF (the parent is gone) stops the proxy."""
    def apply(line: str) -> None:
        words = line.split()
        try:
            if len(words) == 2 and words[0] == "delay":
                proxy.delay_s = max(0.0, float(words[1])) / 1000.0
                answer = "ok"
            else:
                answer = f"error unknown command {line.strip()!r}"
        except ValueError:
            answer = f"error bad number {words[1]!r}"
        print(answer, flush=True)

    for line in sys.stdin:
        loop.call_soon_threadsafe(apply, line)
    loop.call_soon_threadsafe(stop.set)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    # A parent of 1 (init) means ours died before we looked (a start slower than a short-lived shell):
    # watching init would keep the proxy for ever.
    while os.getppid() == parent != 1:
        await asyncio.sleep(PARENT_POLL_S)
    stop.set()


async def serve(port: int, delay_ms: float, *, listen: str = "0.0.0.0", mark: int = DEFAULT_MARK,
                control_stdin: bool = False, parent: int | None = None) -> None:
    """Run the proxy until SIGTERM/SIGINT, the parent's death or (``control_stdin``) stdin EOF."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    proxy = Proxy(delay_ms, mark)
    server = await asyncio.start_server(proxy.handle, listen, port, reuse_address=True, limit=CHUNK, backlog=512)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    watchers = [asyncio.ensure_future(_watch_parent(os.getppid() if parent is None else parent, stop))]
    if control_stdin:
        threading.Thread(target=_watch_stdin, args=(loop, proxy, stop), daemon=True).start()
    try:
        await stop.wait()
    finally:
        server.close()
        for task in [*watchers, *proxy.tasks]:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*proxy.tasks, return_exceptions=True), 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardps.chaos.delay_proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any; printed as 'listening P')")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency added to the host's outgoing bytes")
    parser.add_argument("--listen", default="0.0.0.0", help="address to listen on (both NAT rules need 0.0.0.0)")
    parser.add_argument("--mark", type=lambda s: int(s, 0), default=DEFAULT_MARK, help="SO_MARK of own sockets")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this is no longer our parent")
    parser.add_argument("--control-stdin", action="store_true", help="read 'delay MS' lines; exit at EOF")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.delay_ms, listen=args.listen, mark=args.mark,
                      control_stdin=args.control_stdin, parent=args.parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
