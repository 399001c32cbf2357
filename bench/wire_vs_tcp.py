"""Push-pull throughput: shardps (1 worker -> S shard servers) vs raw loopback TCP between two processes.

    python bench/wire_vs_tcp.py --mb 100                    # gRPC bytes (what crosses hosts)
    python bench/wire_vs_tcp.py --mb 100 --transport tcp    # the byte link (raw TCP beside gRPC)
    python bench/wire_vs_tcp.py --mb 100 --transport auto   # same host: the shared-memory path

Raw TCP: a client sends N MB, the server echoes N MB back (sendall / recv_into with
preallocated buffers, the best a Python process does). shardps: one worker pushes
an N MB fp32 gradient to one shard server (async mode, SGD, so the apply is a few
ms) and receives the N MB updated slice: the real ShardedOptimizer path. Both
report bytes moved (both directions) per second; alternating, --reps times. With
``--transport auto`` the worker and servers share /dev/shm, so the bytes never cross a socket:
the figure is then how fast a push-pull goes, not a wire speed.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, stats  # noqa: E402


def _recv_exact(sock, view):
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def tcp_echo_server(port_queue, nbytes, rounds):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_queue.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    for _ in range(rounds):
        _recv_exact(conn, view)
        conn.sendall(view)
    conn.close()
    srv.close()


def run_tcp(nbytes: int, rounds: int) -> list[float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=tcp_echo_server, args=(q, nbytes, rounds))
    p.start()
    sock = socket.create_connection(("127.0.0.1", q.get(timeout=60)))
    out, back = bytearray(b"\1" * nbytes), bytearray(nbytes)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        sock.sendall(out)
        _recv_exact(sock, memoryview(back))
        times.append(time.perf_counter() - t)
    sock.close()
    p.join(30)
    return times


def run_shardps(nbytes: int, rounds: int, wire_dtype: str, transport: str, servers: int) -> list[float]:
    from shardps import LocalCluster, ShardedOptimizer

    numel = nbytes // 4
    param = torch.nn.Parameter(torch.zeros(numel))
    with LocalCluster(servers=servers) as cluster:
        opt = ShardedOptimizer([param], cluster=cluster.address, optimizer="sgd", lr=1e-9, mode="async",
                               wire_dtype=wire_dtype, transport=transport)
        param.grad = torch.ones(numel)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        shm = list(opt.ps.shm_ok)  # which shards took the bytes through shared memory
        linked = [s.links.on_link for s in opt.ps.shards]  # which took them on a byte link
        opt.close()
    assert all(shm) if transport == "auto" else not any(shm), (transport, shm)
    assert all(linked) if transport == "tcp" else not any(linked), (transport, linked)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100, help="megabytes each way per round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--wire-dtype", default="float32")
    ap.add_argument("--transport", choices=("grpc", "tcp", "auto"), default="grpc",
                    help="grpc: every byte inside gRPC; tcp: on the byte link; auto: shared memory when on one host")
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    nbytes = args.mb * 1_000_000 // 4 * 4
    tcp, ps = [], []
    for rep in range(args.reps):
        tcp.append(2 * nbytes / stats(run_tcp(nbytes, args.rounds)[2:])["median"])
        ps_bytes = nbytes + (nbytes // 2 if args.wire_dtype != "float32" else nbytes)
        ps.append(ps_bytes / stats(run_shardps(nbytes, args.rounds, args.wire_dtype, args.transport, args.servers)[2:])["median"])
        print(f"rep {rep}: tcp {tcp[-1] / 1e9:.2f} GB/s, shardps {ps[-1] / 1e9:.2f} GB/s", file=sys.stderr, flush=True)
    emit("wire_vs_tcp", {"config": vars(args), "tcp_bytes_per_s": stats(tcp), "shardps_bytes_per_s": stats(ps),
                         "ratio_shardps_over_tcp": stats([p / t for p, t in zip(ps, tcp)])}, args.out)


if __name__ == "__main__":
    main()
