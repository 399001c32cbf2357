"""shardps vs DDP across shaped links: every role on its own network-namespace host.

    sudo python bench/network.py --profiles lan,wan --workload charlm --steps 40 --out bench/results/network
    sudo python bench/network.py --quick --profiles lan --workload digits --out /tmp/netbench   # smoke run

Hosts. One ``chaos.netns.Network`` per profile (built by the profile's ``LocalCluster(hosts=True)``):
``coordinator``, ``server-<k>`` and ``worker-<i>``, each in its own namespace with one veth into a
bridge. Every contender of the profile runs on those same hosts and links, one after another:
shardps jobs (one job name each) on the profile's coordinator and servers, their bytes on the
servers' byte links (``transport="tcp"``, what "auto" picks across machines: these hosts share one
/dev/shm, where "auto" would take shared memory; ``shardps-grpc``: every byte inside gRPC); the ``diloco*`` ones as DiLoCo jobs (an outer step every
20 steps; their step time is a median inner step, so compare their time to the target; they push
inside gRPC, as when they were measured); DDP over gloo among the worker hosts (rank 0's
address is the rendezvous, ``GLOO_SOCKET_IFNAME=eth0``). The worker processes are
``bench/netpeer.py``. DDP hooks on gloo/CPU: ``bf16_compress_hook`` runs, registered under
another name (DDP refuses that name without CUDA+NCCL, though gloo all-reduces bfloat16 on CPU);
PowerSGD (rank 2, compressing from step 2) runs with a single DDP bucket, since with several its
chained all-reduces reach gloo in a different order on each rank and the job aborts.

Links. Rate: ``Network.rate`` puts a ``tc tbf`` qdisc on both ends of each host's veth (what the
host sends and what it receives, each direction at the rate). Latency: this kernel has no netem,
so ``Network.delay`` runs the fault lab's delay proxy (``chaos/delay_proxy.py``) in every host:
NAT rules send the host's TCP through it and it holds back what the host sends by the profile's
delay, so a round trip between two hosts grows by twice the delay (``delay_ms`` below is one way,
host to host). The run measures it: a TCP echo round trip worker-0 -> server-0 (``Network.tcp_rtt_ms``)
per profile, in the report as ``rtt_ms`` beside the ``expected_rtt_ms``. Only TCP is delayed (all
the traffic here is TCP). The proxy is user-space Python: at 1 Gbit/s and above it costs CPU.

Measures, per profile and contender: the step time (each worker process's median over the steps
after --warmup, its own evaluations left out; the fastest of them, the pace the job steps at),
bytes per step on each host's link (the kernel's eth0 rx/tx counters read
before and after the contender, divided by its steps: includes its start, i.e. the first pull or
DDP's initial broadcast), link utilisation (busier direction's bytes/s over the link's rate) and the
training time rank 0 took to a held-out loss <= --target (evaluated every --eval-every steps).

Bounded: each contender runs --steps steps or is stopped after --max-seconds (its finished steps
still count: ``status`` says "timed out"); --total-seconds skips what would start after it. Every
namespace, qdisc, proxy and process is removed at the end, also on failure (``LocalCluster.stop``
and ``Network.close`` in finally blocks). Needs root, iproute2 and iptables.
Writes network.json, network.md and network.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, stats  # noqa: E402
from netreport import write_report  # noqa: E402

NETPEER = Path(__file__).resolve().with_name("netpeer.py")
DDP_PORT = 29400


@dataclass(frozen=True)
class Profile:
    rate_mbit: float  # every link, each way
    delay_ms: float = 0.0  # one way, host to host (each host's egress)
    slow_last_worker_mbit: float = 0.0  # one-slow-link: the last worker's link at this rate instead


PROFILES = {
    "rack": Profile(10_000),
    "lan": Profile(1_000, 1.0),
    "wan": Profile(100, 20.0),
    "slowlink": Profile(1_000, slow_last_worker_mbit=100),
    "gigabit": Profile(1_000),  # slowlink's all-fast twin: what its fast workers would do without the slow one
}

CONTENDERS = {
    # The hosts are network namespaces of one machine: they share /dev/shm, so transport "auto" would
    # move the bytes through shared memory and never cross the shaped link. "tcp": the byte link.
    "shardps": dict(kind="shardps", transport="tcp"),
    "shardps-whole": dict(kind="shardps", transport="tcp", link_parts=1),  # pushes not cut into parts
    "shardps-grpc": dict(kind="shardps", transport="grpc"),  # every byte inside gRPC
    "shardps-bf16": dict(kind="shardps", wire_dtype="bfloat16", transport="tcp"),
    # bf16 both ways: gradients pushed and parameters pulled (the workers hold the fp32 masters rounded)
    "shardps-bf16-both": dict(kind="shardps", wire_dtype="bfloat16", pull_dtype="bfloat16", transport="tcp"),
    "shardps-backup1": dict(kind="shardps", backup_workers=1, transport="tcp"),  # one-slow-link only
    "ddp": dict(kind="ddp"),
    "ddp-bf16": dict(kind="ddp", hook="bf16"),
    "ddp-powersgd2": dict(kind="ddp", hook="powersgd2"),
    # DiLoCo: the workload's optimizer as the inner one, H = 20 inner steps per outer (Nesterov) step.
    "diloco20": dict(kind="diloco", sync_every=20),
    "diloco20-bf16": dict(kind="diloco", sync_every=20, wire_dtype="bfloat16"),
    "diloco20-int8": dict(kind="diloco", sync_every=20, wire_dtype="int8"),
    "diloco20-stream4": dict(kind="diloco", sync_every=20, fragments=4),  # a quarter of the model every 5 steps
    # Async outer steps: each worker's outer gradient applied on arrival, nobody waits for a slow link; the
    # outer lr halved (two workers' outer steps per round where sync takes one, Liu et al. 2024).
    "diloco20-async": dict(kind="diloco", sync_every=20, mode="async", outer_lr=0.35),
}

TARGETS = {"digits": 0.5, "charlm": 2.8, "charlm25m": 3.0}  # held-out loss (nats) for time-to-target


@dataclass
class Row:
    profile: str
    contender: str
    status: str = "ok"
    steps: int = 0
    step_s: float | None = None
    process_step_s: list = field(default_factory=list)  # per worker process (host order), median
    # per worker process: steps / seconds over its steps after warmup, waits and outer steps included (the
    # throughput a slow link takes away; a median step hides a DiLoCo round's outer step)
    process_steps_per_s: list = field(default_factory=list)
    links: dict = field(default_factory=dict)  # host -> {rx_per_step, tx_per_step, rate_mbit, utilisation}
    time_to_target_s: float | None = None
    final_loss: float | None = None
    curve: list = field(default_factory=list)  # [(train_s, held-out loss)]


def contenders_for(profile: str, names: list[str] | None) -> list[str]:
    """``names`` as given, or by default every contender (shardps-backup1 only where a link is slow)."""
    if names is not None:
        return names
    return [c for c in CONTENDERS if c != "shardps-backup1" or PROFILES[profile].slow_last_worker_mbit]


def link_rates(profile: Profile, hosts: list[str], workers: int) -> dict[str, float]:
    rates = dict.fromkeys(hosts, profile.rate_mbit)
    if profile.slow_last_worker_mbit:
        rates[f"worker-{workers - 1}"] = profile.slow_last_worker_mbit
    return rates


def run_profile(name: str, args, deadline: float) -> dict:
    """Build the profile's hosts and links, check the latency, run every contender; tear all down."""
    from shardps.client.local import LocalCluster

    profile = PROFILES[name]
    logs = Path(args.out) / "logs" / name
    cluster = LocalCluster(servers=args.servers, hosts=True, worker_hosts=args.workers, durable=False, log_dir=logs,
                           step_timeout=args.max_seconds)
    net = cluster.network
    rows, rtt, rates = [], None, {}
    try:
        net.start()
        rates = link_rates(profile, net.hosts, args.workers)
        for host, mbit in rates.items():  # before any process starts: the proxy takes new connections only
            net.rate(host, int(mbit * 1000))
            if profile.delay_ms:
                net.delay(host, profile.delay_ms)
        rtt = net.tcp_rtt_ms("worker-0", "server-0")
        print(f"[{name}] links {sorted(set(rates.values()))} Mbit/s, delay {profile.delay_ms} ms one way: "
              f"TCP RTT worker-0 -> server-0 {rtt:.2f} ms", file=sys.stderr, flush=True)
        cluster.start()
        for k, contender in enumerate(contenders_for(name, args.contenders)):
            if time.monotonic() + args.max_seconds > deadline:
                rows.append(Row(name, contender, status="skipped: --total-seconds reached"))
                continue
            rows.append(run_contender(cluster, name, contender, rates, args, logs, port=DDP_PORT + k))
            r = rows[-1]
            print(f"[{name}] {contender:15s} {r.status}: {r.steps} steps, step {_fmt(r.step_s, 3)} s, "
                  f"to target {_fmt(r.time_to_target_s, 1)} s, final loss {_fmt(r.final_loss, 3)}",
                  file=sys.stderr, flush=True)
    finally:
        cluster.stop()
        net.close()  # also when cluster.start() never ran
    return {"profile": name, **asdict(profile), "link_mbit": rates,
            "rtt_ms": rtt, "expected_rtt_ms": 2 * profile.delay_ms, "rows": [asdict(r) for r in rows]}


def run_contender(cluster, profile: str, contender: str, rates: dict, args, logs: Path, port: int) -> Row:
    net, row = cluster.network, Row(profile, contender)
    cfg = {**CONTENDERS[contender], "workload": args.workload, "world": args.workers, "batch": args.batch,
           "steps": args.steps, "eval_every": args.eval_every, "optimizer": args.optimizer, "lr": args.lr,
           "cluster": cluster.address, "job": f"{profile}-{contender}", "master": f"{net.address('worker-0')}:{port}",
           "connect_timeout_s": min(120.0, args.max_seconds), "threads": args.threads}
    paths = [logs / f"{contender}.worker-{i}.jsonl" for i in range(args.workers)]
    cfg["logs"] = [str(p) for p in paths]
    before = {h: net.link_bytes(h) for h in net.hosts}
    procs = []
    for i, path in enumerate(paths):
        path.unlink(missing_ok=True)
        path.with_suffix(".done").unlink(missing_ok=True)
        err = open(logs / f"{contender}.worker-{i}.err", "wb")
        procs.append(cluster.worker_popen(i, [sys.executable, str(NETPEER), json.dumps(cfg), str(i), str(path)],
                                          stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL))
        err.close()
    end = time.monotonic() + args.max_seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            row.status = f"timed out after {args.max_seconds:g} s"
    for i, proc in enumerate(procs):  # ours, by Popen: SIGKILL what the time limit left running
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        elif proc.returncode != 0 and row.status == "ok":
            tail = (logs / f"{contender}.worker-{i}.err").read_text(errors="replace").strip().splitlines()[-1:]
            row.status = f"failed: worker-{i} exited {proc.returncode}: {' '.join(tail)[-300:]} (see {logs})"
    after = {h: net.link_bytes(h) for h in net.hosts}
    fill(row, [_read_lines(p) for p in paths], before, after, rates, args)
    return row


def fill(row: Row, logs: list[list[dict]], before: dict, after: dict, rates: dict, args) -> None:
    """Step time, time to target and bytes per step from the workers' lines and the link counters."""
    steps = [[r for r in lines if "step_s" in r] for lines in logs]
    # The job's steps: the furthest any process got (a backup worker's slow process skips some).
    done = row.steps = max((s[-1]["step"] + 1 for s in steps if s), default=0)
    # Each process's median step after warmup; the job steps at its fastest process's pace (all the
    # same in sync and DDP; with a backup worker the slow one falls behind and its pushes are dropped).
    medians = [stats([r["step_s"] for r in s[args.warmup:]] or [r["step_s"] for r in s])["median"]
               for s in steps if s]
    row.process_step_s = medians
    row.process_steps_per_s = [len(kept) / sum(r["step_s"] for r in kept)
                               for kept in ((s[args.warmup:] or s) for s in steps if s)]
    row.step_s = min(medians) if medians else None
    rank0 = next((i for i, lines in enumerate(logs) if any("eval" in r for r in lines)), None)
    if rank0 is not None:
        row.curve = [(r["train_s"], r["eval"]) for r in logs[rank0] if "eval" in r]
        row.final_loss = row.curve[-1][1] if row.curve else None
        row.time_to_target_s = next((t for t, loss in row.curve if loss <= args.target), None)
    for host in before:
        rx, tx = (after[host][d] - before[host][d] for d in ("rx", "tx"))
        link = {"rx_bytes": rx, "tx_bytes": tx, "rate_mbit": rates[host],
                "rx_per_step": rx / done if done else None, "tx_per_step": tx / done if done else None}
        if done and row.step_s:
            link["utilisation"] = max(rx, tx) / done / row.step_s / (rates[host] * 1e6 / 8)
        row.links[host] = link


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed process may be cut short
            pass
    return out


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", default="rack,lan,wan,slowlink", help=f"comma list of {', '.join(PROFILES)}")
    ap.add_argument("--contenders", default="", help=f"comma list of {', '.join(CONTENDERS)} (default: all; "
                    "shardps-backup1 only on profiles with a slow link unless named here)")
    ap.add_argument("--workload", default="charlm", help="digits, charlm or charlm25m (worker/workloads.py)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="samples per worker per step (0: the workload's)")
    ap.add_argument("--optimizer", default="", help="adamw, adam or sgd (default: the workload's)")
    ap.add_argument("--lr", type=float, default=0.0, help="0: the workload's")
    ap.add_argument("--steps", type=int, default=40, help="steps per contender")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the step time")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.0, help="held-out loss for time-to-target (0: per workload)")
    ap.add_argument("--max-seconds", type=float, default=600, help="stop a contender after this long")
    ap.add_argument("--total-seconds", type=float, default=4 * 3600, help="start no contender past this")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    ap.add_argument("--quick", action="store_true", help="6 steps, eval every 3, warmup 1, 120 s per contender")
    ap.add_argument("--out", required=True, help="output folder: network.json, network.md, network.png, logs/")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.warmup, args.max_seconds = 6, 3, 1, min(args.max_seconds, 120)
    args.profiles = [p for p in args.profiles.split(",") if p]
    args.contenders = [c for c in args.contenders.split(",") if c] or None
    for value, known, flag in ((args.profiles, PROFILES, "--profiles"), (args.contenders or [], CONTENDERS,
                                                                        "--contenders")):
        if bad := [v for v in value if v not in known]:
            ap.error(f"{flag}: unknown {bad}; choose from {', '.join(known)}")
    from shardps.worker.workloads import WORKLOADS, get_workload

    if args.workload not in WORKLOADS:
        ap.error(f"--workload: unknown {args.workload!r}; choose from {', '.join(WORKLOADS)}")
    defaults = get_workload(args.workload).defaults
    args.batch = args.batch or defaults.batch_size
    args.optimizer, args.lr = args.optimizer or defaults.optimizer, args.lr or defaults.lr
    args.target = args.target or TARGETS[args.workload]
    if args.workers < 2 and "slowlink" in args.profiles:
        ap.error("--workers must be >= 2 for the slowlink profile (one slow worker among fast ones)")
    from shardps.chaos.netns import available

    ok, reason = available()
    if not ok:
        ap.error(reason)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # SIGTERM (a `timeout`, a CI runner) unwinds like Ctrl-C: the finally blocks remove the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.total_seconds
    result = {"benchmark": "network", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "machine": {**machine(), "load_avg_at_start": os.getloadavg()},
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "profiles": []}
    for name in args.profiles:
        if time.monotonic() + args.max_seconds > deadline:
            result["profiles"].append({"profile": name, **asdict(PROFILES[name]), "link_mbit": {}, "rtt_ms": None,
                                       "expected_rtt_ms": 2 * PROFILES[name].delay_ms, "rows": [
                                           asdict(Row(name, c, status="skipped: --total-seconds reached"))
                                           for c in contenders_for(name, args.contenders)]})
            continue
        result["profiles"].append(run_profile(name, args, deadline))
        write_report(result, Path(args.out))  # after each profile: a later failure keeps what was measured
    return result


if __name__ == "__main__":
    main()
