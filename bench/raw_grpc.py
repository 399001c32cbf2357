"""The floor: raw grpcio moving bytes, with nothing of shardps in it.

    python bench/raw_grpc.py

A bidirectional stream of 1 MiB ``bytes`` messages (identity serializers): the
client pushes N MB, then the server streams N MB back (the shape of a push-pull).
For sync and aio servers and clients it prints throughput and each side's CPU
time per MB, which bounds what any gRPC-based parameter server can do per core.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

CHUNK, N, ROUNDS = 1 << 20, 100, 12
OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def _ident(b):
    return b


def _handlers(fn):
    return grpc.method_handlers_generic_handler("bench.Echo", {"Run": grpc.stream_stream_rpc_method_handler(
        fn, request_deserializer=_ident, response_serializer=_ident)})


def _sync_handler(requests, context):
    for _ in requests:
        pass
    payload = b"x" * CHUNK
    for _ in range(N):
        yield payload


async def _aio_handler(requests, context):
    async for _ in requests:
        pass
    payload = b"x" * CHUNK
    for _ in range(N):
        yield payload


def serve_sync(q):
    server = grpc.server(futures.ThreadPoolExecutor(8), options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(_sync_handler),))
    q.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def serve_aio(q):
    async def main():
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((_handlers(_aio_handler),))
        q.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def sync_client(port) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
        call = ch.stream_stream("/bench.Echo/Run", request_serializer=_ident, response_deserializer=_ident)
        payload, times = b"y" * CHUNK, []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            for _ in call(iter([payload] * N), timeout=60):
                pass
            times.append(time.perf_counter() - t)
    return sorted(times[2:])[len(times[2:]) // 2]


def aio_client(port) -> float:
    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
            call = ch.stream_stream("/bench.Echo/Run", request_serializer=_ident, response_deserializer=_ident)
            payload, times = b"y" * CHUNK, []

            async def gen():
                for _ in range(N):
                    yield payload

            for _ in range(ROUNDS):
                t = time.perf_counter()
                async for _ in call(gen(), timeout=60):
                    pass
                times.append(time.perf_counter() - t)
            return sorted(times[2:])[len(times[2:]) // 2]

    return asyncio.run(main())


def _cpu_of(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    rows = []
    for sname, serve in (("sync", serve_sync), ("aio", serve_aio)):
        for cname, client in (("sync", sync_client), ("aio", aio_client)):
            q = mp.Queue()
            proc = mp.Process(target=serve, args=(q,), daemon=True)
            proc.start()
            port = q.get(timeout=30)
            s0, c0 = _cpu_of(proc.pid), _own_cpu()
            median = client(port)
            mb = ROUNDS * 2 * N * CHUNK / 1e6
            rows.append({"server": sname, "client": cname, "bytes_per_s": 2 * N * CHUNK / median,
                         "server_cpu_ms_per_mb": (_cpu_of(proc.pid) - s0) / mb * 1e3,
                         "client_cpu_ms_per_mb": (_own_cpu() - c0) / mb * 1e3})
            proc.terminate()
            print(rows[-1], file=sys.stderr, flush=True)
    emit("raw_grpc", {"rows": rows}, sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
