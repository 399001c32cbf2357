"""shardps.chaos.netns on real network namespaces: reachability, teardown, and each per-link fault.

Needs root, iproute2 and iptables (skipped otherwise, with the reason). Helper programs run inside
the hosts' namespaces as ``python -c`` scripts; each prints its result on stdout.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from shardps.chaos.netns import Network, NetworkError, available

ok, reason = available()
if not ok:
    pytest.skip(reason, allow_module_level=True)

pytestmark = pytest.mark.timeout(120)

PORT = 7000

# TCP echo server on 0.0.0.0:PORT, one thread per connection; prints "ready" once listening.
ECHO_SERVER = r"""
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d)); s.listen(128)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while data := c.recv(65536):
            c.sendall(data)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
""" % PORT

# UDP echo server on 0.0.0.0:PORT.
UDP_ECHO_SERVER = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", %d))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
""" % PORT

# TCP sink on 0.0.0.0:PORT: per connection, reads until EOF or argv[1] s after the first byte,
# then prints {"bytes": ..., "seconds": first to last byte}.
SINK = r"""
import json, socket, sys, time
cap = float(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d)); s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(cap)
    total, first, last = 0, None, None
    try:
        while data := c.recv(1 << 20):
            last = time.perf_counter()
            first = first or last
            total += len(data)
            if last - first > cap:
                break
    except OSError:
        pass
    c.close()
    print(json.dumps({"bytes": total, "seconds": (last - first) if first else 0.0}), flush=True)
""" % PORT

# Sends argv[2] bytes to argv[1]:PORT and closes; the sink may cut it short.
SOURCE = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], %d), timeout=30)
    c.sendall(b"x" * int(sys.argv[2])); c.close()
except OSError:
    pass
""" % PORT

# One TCP connect to argv[1]:PORT (or argv[2]) with a 1 s timeout, an echo through it: prints "ok"
# or "fail <error>".
CONNECT_ONCE = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2]) if sys.argv[2:] else %d), timeout=1.0)
    c.settimeout(1.0); c.sendall(b"hello")
    print("ok" if c.recv(5) == b"hello" else "fail bad echo")
except OSError as e:
    print("fail", e)
""" % PORT

# Sends argv[2] numbered datagrams 1 ms apart to argv[1]:PORT, collects echoes for 0.5 s more,
# prints how many distinct ones came back.
UDP_BURST = r"""
import socket, sys, time
n = int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
got = set()
def drain():
    while True:
        try:
            got.add(int(s.recv(64)))
        except BlockingIOError:
            return
for i in range(n):
    try:
        s.sendto(b"%%d" %% i, (sys.argv[1], %d))
    except PermissionError:
        pass  # dropped by the OUTPUT rule: netfilter tells a local sender with EPERM
    time.sleep(0.001); drain()
end = time.monotonic() + 0.5
while time.monotonic() < end:
    time.sleep(0.01); drain()
print(len(got))
""" % PORT

# Keeps one TCP connection to argv[1]:PORT; for each stdin line "ping N", prints the median echo
# round trip of N small messages in ms.
PINGER = r"""
import socket, statistics, sys, time
c = socket.create_connection((sys.argv[1], %d), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print("connected", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line.split()[1])):
        t = time.perf_counter(); c.sendall(b"p" * 16); n = 0
        while n < 16:
            n += len(c.recv(64))
        times.append((time.perf_counter() - t) * 1000)
    print(statistics.median(times), flush=True)
""" % PORT


def start_server(net: Network, host: str, script: str, *args: str) -> subprocess.Popen:
    """Start a helper server in ``host``; wait for its "ready" line."""
    proc = net.popen(host, [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", f"server in {host} did not start"
    return proc


def run_in(net: Network, host: str, script: str, *args: str, timeout: float = 30) -> str:
    """Run a helper client in ``host`` to completion; its stdout."""
    proc = net.popen(host, [sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"helper in {host} exited {proc.returncode}: {err}"
    return out.strip()


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def routes() -> str:
    return subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True, timeout=10).stdout


def test_hosts_reach_each_other_and_close_removes_everything():
    with Network(["a", "b"], name="reach") as net:
        octet = net.octet
        assert net.address("a") == f"10.213.{octet}.2" and net.address("b") == f"10.213.{octet}.3"
        assert net.namespace("a") in namespaces() and net.switch in namespaces()
        assert all(len(n) <= 15 for n in namespaces() if n.startswith(f"sps{octet}-"))
        assert f"blackhole 10.213.{octet}.0/24" in routes()

        server = start_server(net, "a", ECHO_SERVER)
        # The Popen's pid is the server itself (ip netns exec execs), inside a's namespace.
        assert os.readlink(f"/proc/{server.pid}/exe") == os.path.realpath(sys.executable)
        netns_inode = os.stat(f"/run/netns/{net.namespace('a')}").st_ino
        assert os.readlink(f"/proc/{server.pid}/ns/net") == f"net:[{netns_inode}]"

        assert run_in(net, "b", CONNECT_ONCE, net.address("a")) == "ok"
        # Nothing outside the subnet is reachable from a host ...
        assert run_in(net, "b", CONNECT_ONCE, "198.51.100.1", "80").startswith("fail")
        # ... and the root namespace cannot reach the hosts: the blackhole route stops it.
        with pytest.raises(OSError):
            socket.create_connection((net.address("a"), PORT), timeout=2).close()

        with Network(["c"]) as other:  # a second Network at the same time gets its own subnet
            assert other.octet != octet and other.namespace("c") != net.namespace("a")
    net.close()  # idempotent
    assert server.poll() is not None, "close() stops what popen started"
    assert not [n for n in namespaces() if n.startswith(f"sps{octet}-")]
    assert f"10.213.{octet}." not in routes()
    with pytest.raises(NetworkError):
        net.popen("a", ["true"])


def test_teardown_when_the_body_fails():
    with pytest.raises(RuntimeError, match="the test body failed"):
        with Network(["a"]) as net:
            octet = net.octet
            raise RuntimeError("the test body failed")
    assert not [n for n in namespaces() if n.startswith(f"sps{octet}-")]
    assert f"10.213.{octet}." not in routes()


def test_teardown_when_start_fails(monkeypatch):
    built = []
    real = Network._build_host

    def build_host(self, host, index):
        built.append(self.octet)
        if index == 1:
            raise NetworkError("injected failure")
        real(self, host, index)

    monkeypatch.setattr(Network, "_build_host", build_host)
    with pytest.raises(NetworkError, match="injected"):
        Network(["a", "b", "c"]).start()
    octet = built[0]
    assert not [n for n in namespaces() if n.startswith(f"sps{octet}-")]
    assert f"10.213.{octet}." not in routes()


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has exited
    except FileNotFoundError:
        return True


def test_delay_proxy_command_line_and_bounded_life():
    argv = [sys.executable, "-m", "shardps.chaos.delay_proxy", "--port", "0", "--delay-ms", "5"]
    with Network(["a"]) as net:
        proxy = net.popen("a", argv, stdout=subprocess.PIPE, text=True)
        assert proxy.stdout.readline().startswith("listening ")
        proxy.terminate()
        assert proxy.wait(timeout=5) == 0, "SIGTERM ends the proxy cleanly"

        # Its parent dies: it exits by itself.
        shell = net.popen("a", ["sh", "-c", " ".join(argv) + " >/dev/null & echo $!; sleep 0.5"],
                          stdout=subprocess.PIPE, text=True)
        orphan = int(shell.stdout.readline())
        shell.wait(timeout=10)
        deadline = time.monotonic() + 5
        while not process_gone(orphan) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(orphan), "the proxy outlived its parent"

        # Its parent is gone before the proxy even starts (a busy machine): it exits all the same.
        shell = net.popen("a", ["sh", "-c", " ".join(argv) + " >/dev/null & echo $!"], stdout=subprocess.PIPE,
                          text=True)
        early = int(shell.stdout.readline())
        shell.wait(timeout=10)
        deadline = time.monotonic() + 60  # python and its imports must start first
        while not process_gone(early) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(early), "the proxy whose parent died before it started lives on"


def test_partition_and_heal():
    with Network(["a", "b"]) as net:
        start_server(net, "a", ECHO_SERVER)
        assert run_in(net, "b", CONNECT_ONCE, net.address("a")) == "ok"
        net.partition("a")
        assert net.faults() == {"a": {"partitioned": True}, "b": {}}
        assert run_in(net, "b", CONNECT_ONCE, net.address("a")).startswith("fail")
        net.heal("a")
        assert net.faults() == {"a": {}, "b": {}}
        assert run_in(net, "b", CONNECT_ONCE, net.address("a")) == "ok"


def test_cut_and_mend_one_link_only():
    with Network(["a", "b", "c"]) as net:
        start_server(net, "a", ECHO_SERVER)
        net.cut("a", "b")
        assert net.faults() == {"a": {"cut_from": ["b"]}, "b": {"cut_from": ["a"]}, "c": {}}
        assert run_in(net, "b", CONNECT_ONCE, net.address("a")).startswith("fail")
        assert run_in(net, "c", CONNECT_ONCE, net.address("a")) == "ok"  # a still reaches the rest
        net.mend("b", "a")  # either order
        assert net.faults() == {"a": {}, "b": {}, "c": {}}
        assert run_in(net, "b", CONNECT_ONCE, net.address("a")) == "ok"
        with pytest.raises(ValueError, match="from itself"):
            net.cut("a", "a")


def test_loss():
    sent = 200
    with Network(["a", "b"]) as net:
        start_server(net, "a", UDP_ECHO_SERVER)
        net.loss("b", 30)
        assert net.faults()["b"] == {"loss_percent": 30.0}
        failed = 1 - int(run_in(net, "b", UDP_BURST, net.address("a"), str(sent))) / sent
        # 30 % each way: a round trip fails with probability 1 - 0.7^2 = 0.51 (sd 0.035 over 200).
        assert 0.35 <= failed <= 0.67, f"{failed:.0%} of round trips lost at 30% loss each way"
        net.loss("b", 0)
        assert net.faults()["b"] == {}
        failed = 1 - int(run_in(net, "b", UDP_BURST, net.address("a"), str(sent))) / sent
        assert failed <= 0.01, f"{failed:.0%} of round trips lost with no loss set"


def test_rate():
    size, cap, kbit = 2_000_000, 2.0, 800

    def transfer(sink: subprocess.Popen, sender: str, receiver: str) -> float:
        run_in(net, sender, SOURCE, net.address(receiver), str(size))
        result = json.loads(sink.stdout.readline())
        assert result["bytes"] > 0
        return result["bytes"] / max(result["seconds"], 1e-6) * 8 / 1000  # kbit/s

    with Network(["a", "b"]) as net:
        into_a = start_server(net, "a", SINK, str(cap))
        into_b = start_server(net, "b", SINK, str(cap))
        free = transfer(into_a, "b", "a")
        net.rate("b", kbit)
        assert net.faults()["b"] == {"rate_kbit": kbit}
        up = transfer(into_a, "b", "a")    # b's side of the link shapes what b sends
        down = transfer(into_b, "a", "b")  # the switch side shapes what b receives
        net.rate("b", 0)
        again = transfer(into_a, "b", "a")
    for name, measured in (("upload", up), ("download", down)):
        assert measured < free / 10, f"{name} at {measured:.0f} kbit/s, unlimited {free:.0f} kbit/s"
        assert kbit / 4 < measured < kbit * 3, f"{name} at {measured:.0f} kbit/s with a {kbit} kbit/s limit"
    assert again > up * 10, f"after rate(0): {again:.0f} kbit/s, limited {up:.0f} kbit/s"


def test_delay():
    with Network(["a", "b"]) as net:
        start_server(net, "a", ECHO_SERVER)

        def pinger() -> subprocess.Popen:
            proc = net.popen("b", [sys.executable, "-c", PINGER, net.address("a")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, bufsize=1)
            assert proc.stdout.readline().strip() == "connected"
            return proc

        def ping(proc: subprocess.Popen, n: int = 9) -> float:
            proc.stdin.write(f"ping {n}\n")
            return float(proc.stdout.readline())

        direct = pinger()
        base = ping(direct)
        net.delay("b", 100)
        assert net.faults()["b"] == {"delay_ms": 100.0}
        added = ping(direct) - base
        assert added < 20, f"a connection opened before delay() keeps its direct path, got {added:.1f} ms more"
        through_proxy = pinger()  # opened after delay(): goes through b's delay
        added = ping(through_proxy) - base
        assert 90 <= added < 180, f"delay(b, 100) added {added:.1f} ms to a round trip"

        net.delay("b", 30)  # changes apply to open connections at once
        added = ping(through_proxy) - base
        assert 25 <= added < 90, f"delay(b, 30) added {added:.1f} ms to a round trip"

        net.delay("a", 100)  # a's replies are late too, on connections a accepts
        added = ping(pinger()) - base
        assert 120 <= added < 220, f"delay(b, 30) + delay(a, 100) added {added:.1f} ms"

        net.delay("a", 0)
        net.delay("b", 0)
        assert net.faults() == {"a": {}, "b": {}}
        for proc, what in ((through_proxy, "an open proxied connection"), (pinger(), "a new connection")):
            added = ping(proc) - base
            assert added < 20, f"{what} after delay(0) still has {added:.1f} ms more"
        proxies = [h.proxy for h in net._hosts.values() if h.proxy is not None]
        assert proxies
    assert all(p.poll() is not None for p in proxies), "close() stops the delay proxies"


def test_delay_keeps_throughput():
    """The delay is a pipelined queue: a 16 MB stream is late by the delay, not slowed chunk by chunk."""
    size = 16_000_000
    with Network(["a", "b"]) as net:
        sink = start_server(net, "a", SINK, "10")
        net.delay("b", 100)
        start = time.monotonic()
        run_in(net, "b", SOURCE, net.address("a"), str(size))
        result = json.loads(sink.stdout.readline())
        elapsed = time.monotonic() - start  # includes starting the sender, ~0.1 s
    assert result["bytes"] == size
    # Late by the delay, but a sleep per 64 KiB chunk in series would take 25 s.
    assert 0.1 <= elapsed < 3, f"16 MB through a 100 ms delay took {elapsed:.2f} s"
