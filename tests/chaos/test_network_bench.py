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

from shardps.chaos.netns import available

ok, reason = available()
if not ok:
    pytest.skip(reason, allow_module_level=True)

BENCH = Path(__file__).resolve().parents[2] / "bench" / "network.py"
CONTENDERS = ["shardps", "shardps-bf16", "shardps-backup1", "ddp", "ddp-bf16", "ddp-powersgd2"]


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_run_reports_every_contender_with_bytes_on_its_links(tmp_path):
    before = set(namespaces())
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--profiles", "lan", "--workload", "digits",
                           "--contenders", ",".join(CONTENDERS), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1100, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(namespaces()) <= before, "the benchmark left namespaces behind"

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
