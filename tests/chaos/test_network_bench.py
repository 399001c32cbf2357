"""bench/network.py --quick end to end: every contender runs on namespace hosts over shaped links.

Needs root, iproute2 and iptables (skipped otherwise, with the reason). Checks what the report says
happened (every contender, its steps, bytes on the links it uses, the latency it was asked for), never
how fast anything was.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardps.chaos.netns import STATE_DIR, Network, NetworkError, available

ok, reason = available()
if not ok:
    pytest.skip(reason, allow_module_level=True)

BENCH = Path(__file__).resolve().parents[2] / "bench" / "network.py"
CONTENDERS = ["shardps", "shardps-bf16", "shardps-backup1", "ddp", "ddp-bf16", "ddp-powersgd2"]


def owned_by_a_live_process(namespace: str) -> bool:
    """Whether ``namespace`` belongs to a Network whose process still runs (another test or benchmark on
    this machine, started while this one ran): its state file names the owner's pid."""
    state = STATE_DIR / (namespace.split("-", 1)[0] + ".pid")
    try:
        pid = int(state.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


# Sends argv[2] bytes to argv[1]:argv[3] once the peer listens there.
SEND = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=30)
c.sendall(b"x" * int(sys.argv[2])); c.close()
"""
# Reads one connection on a free port to EOF; prints the port first, the byte count last.
SINK = r"""
import socket
s = socket.socket(); s.bind(("0.0.0.0", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); total = 0
while data := c.recv(1 << 20):
    total += len(data)
print(total, flush=True)
"""


@pytest.mark.timeout(120)
def test_link_bytes_count_a_transfer_on_both_ends_and_rtt_probe_sees_the_delay():
    size = 3_000_000
    with Network(["a", "b"]) as net:
        base = net.tcp_rtt_ms("b", "a")
        before = {h: net.link_bytes(h) for h in ("a", "b")}
        sink = net.popen("a", [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
        port = sink.stdout.readline().strip()
        sender = net.popen("b", [sys.executable, "-c", SEND, net.address("a"), str(size), port])
        assert sender.wait(timeout=30) == 0
        assert int(sink.stdout.readline()) == size
        sink.wait(timeout=10)
        after = {h: net.link_bytes(h) for h in ("a", "b")}
        # Payload plus TCP/IP headers one way; the acks the other way are far fewer bytes.
        assert size <= after["b"]["tx"] - before["b"]["tx"] < size * 1.1
        assert size <= after["a"]["rx"] - before["a"]["rx"] < size * 1.1
        assert after["a"]["tx"] - before["a"]["tx"] < size / 10

        net.delay("a", 15)
        net.delay("b", 15)
        assert net.tcp_rtt_ms("b", "a") >= 30 > base, "each host's 15 ms shows in a new connection's round trip"
        with pytest.raises(KeyError, match="no host 'c'"):
            net.link_bytes("c")
        net.partition("a")
        with pytest.raises(NetworkError, match="RTT probe b -> a"):
            net.tcp_rtt_ms("b", "a", timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_run_reports_every_contender_with_bytes_on_its_links(tmp_path):
    before = set(namespaces())
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--profiles", "lan", "--workload", "digits",
                           "--contenders", ",".join(CONTENDERS), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1100, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]
    left = {n for n in set(namespaces()) - before if not owned_by_a_live_process(n)}
    assert not left, f"the benchmark left namespaces behind: {sorted(left)}"

    result = json.loads((tmp_path / "network.json").read_text())
    (profile,) = result["profiles"]
    assert profile["profile"] == "lan" and profile["delay_ms"] == 1.0
    # The delay is there: each host's egress adds 1 ms, so a round trip at least 2 ms.
    assert profile["rtt_ms"] >= profile["expected_rtt_ms"] == 2.0
    rows = {r["contender"]: r for r in profile["rows"]}
    assert sorted(rows) == sorted(CONTENDERS)
    for name, row in rows.items():
        assert row["status"] == "ok", f"{name}: {row['status']}"
        assert row["steps"] == 6 and row["step_s"] > 0, name
        assert len(row["process_steps_per_s"]) == 2 and min(row["process_steps_per_s"]) > 0, name
        assert row["final_loss"] is not None and row["curve"], name
        used = ["worker-0", "worker-1"] + (["server-0", "server-1"] if name.startswith("shardps") else [])
        for host in used:
            link = row["links"][host]
            assert link["rx_per_step"] > 0 and link["tx_per_step"] > 0, f"{name}: no bytes on {host}: {link}"
            assert link["rate_mbit"] == 1000 and link["utilisation"] > 0, f"{name} {host}: {link}"
        if not name.startswith("shardps"):
            assert row["links"]["server-0"]["rx_per_step"] < row["links"]["worker-0"]["tx_per_step"], \
                f"{name}: DDP traffic should not cross the servers' links"

    # bf16 on the wire: a worker's pushes are about half the bytes of float32 ones.
    def pushed(name):
        return rows[name]["links"]["worker-0"]["tx_per_step"]

    assert pushed("shardps-bf16") < 0.8 * pushed("shardps")

    table = (tmp_path / "network.md").read_text()
    assert all(f"| {name} |" in table for name in CONTENDERS)
    assert (tmp_path / "network.png").stat().st_size > 0
