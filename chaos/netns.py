"""Run processes on separate Linux network namespaces joined by a bridge, and break their links.

    with Network(["coordinator", "server-0", "worker-0"]) as net:
        proc = net.popen("server-0", [sys.executable, "-m", "...", "--bind", net.address("server-0")])
        net.delay("worker-0", 100)     # 100 ms more on everything worker-0 sends over TCP
        net.loss("server-0", 5)        # 5 % of packets in and out of server-0 dropped
        net.partition("worker-0")      # worker-0 cut off ...
        net.heal("worker-0")           # ... and back
        net.cut("server-0", "coordinator")  # only that link: both still reach everyone else
        net.mend("server-0", "coordinator")
        net.link_bytes("server-0")     # {"rx": ..., "tx": ...}: bytes through its eth0 so far
        net.tcp_rtt_ms("worker-0", "server-0")  # a measured TCP round trip between two hosts

Design
------
One ``Network`` owns one private /24, ``10.213.N.0/24``, and these namespaces (names stay short,
carry ``N`` so several Networks coexist, and are listed by ``ip netns``)::

    sps<N>-sw    the "switch": bridge br0 with one port h<i> per host
    sps<N>-h<i>  host i: lo, and eth0 = 10.213.N.(i+2)/24, the other end of h<i>

A host's namespace has no route but its /24, so it reaches the other hosts and its own loopback,
nothing else; eth0 has no IPv6 address (hosts talk IPv4, which every fault covers). Connection
tracking is on in every host from the start (see ``_build_host``). Per-link faults act on the
host's veth pair:

* ``partition``: the switch-side end ``h<i>`` is set down; ``heal`` sets it up again.
* ``cut``: one link between two hosts: iptables DROP rules (INPUT from, OUTPUT to the other's
  address) in the first host; ``mend`` deletes them.
* ``loss``: iptables ``-m statistic --mode random`` DROP rules on eth0 in the host (INPUT and
  OUTPUT, so each direction loses ``percent``). TCP retransmits as over a lossy wire; a UDP
  sender whose datagram the OUTPUT rule drops gets EPERM from sendto().
* ``rate``: a ``tc tbf`` qdisc on both ends (eth0 shapes what the host sends, h<i> what it gets).
* ``delay``: netem on eth0 when the kernel has it (probed once); otherwise ``delay_proxy``, a
  transparent TCP proxy run inside the host's namespace, which NAT rules (nat OUTPUT -o eth0 and
  nat PREROUTING -i eth0, REDIRECT) feed with the host's TCP connections, and which holds back what
  the host *sends* by ``ms``. See ``chaos/delay_proxy.py``; differences from netem are listed at
  ``Network.delay``.

Safety rules
------------
* Before anything is created, a blackhole route for the /24 is added in the root namespace: the
  route claims the subnet (adding it fails if another Network holds it) and makes sure a packet
  for the hosts never leaves the machine from the root namespace (which has no link into the
  bridge: talk to the hosts through processes started with ``popen``).
* Everything created is torn down by ``close()``: processes started by ``popen`` and the delay
  proxies (by their Popen, i.e. by PID: SIGTERM, then SIGKILL), the namespaces (deleting them takes
  their veths, qdiscs and iptables rules along) and the blackhole route. ``close()`` is idempotent
  and runs from ``__exit__``, from ``start()`` when that fails half-way, and from ``atexit``.
  A process we did not start is never signalled; one still inside a namespace at close is named
  in a warning (the namespace, cut off from everything, lives on until it exits).
* A process killed without running ``atexit`` (SIGKILL) leaves its network behind; each Network
  records its owner's PID in ``/run/shardps-netns/``, and ``cleanup_stale()`` removes the networks
  whose owner is dead.

Every command runs with a timeout, through ``run()``, which raises ``NetworkError`` with the
command's stderr. Needs root, iproute2 (``ip``, ``tc``) and iptables; ``available()`` says whether
this machine has them, and why not.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

SUBNET_PREFIX = "10.213"
OCTETS = range(20, 220)  # third octets a Network may claim
PREFIX = "sps"
BRIDGE = "br0"
HOST_IF = "eth0"
PROXY_MARK = 0x5157
CMD_TIMEOUT_S = 15.0
PROXY_START_S = 15.0
STOP_GRACE_S = 3.0
STATE_DIR = Path("/run/shardps-netns")
DELAY_PROXY = Path(__file__).with_name("delay_proxy.py")


class NetworkError(RuntimeError):
    """A namespace network could not be set up or changed; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# commands


def _tool(name: str) -> str | None:
    """Path of an admin tool; sbin may be missing from PATH even for root."""
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin") if (p := Path(d) / name).exists()), None)


def run(cmd: list[str], *, timeout: float = CMD_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` (text output captured); raise NetworkError naming it and its stderr if it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise NetworkError(f"`{' '.join(cmd)}` did not finish within {timeout:g} s") from e
    except FileNotFoundError as e:
        raise NetworkError(f"`{cmd[0]}` not found: install iproute2 and iptables, or drop --hosts") from e
    if check and done.returncode != 0:
        raise NetworkError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([_tool("ip") or "ip", *args], check=check)


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([_tool("tc") or "tc", "-n", ns, *args], check=check)


def _iptables(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([_tool("ip") or "ip", "netns", "exec", ns, _tool("iptables") or "iptables", "-w", "10", *args],
               check=check)


@functools.lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """``(True, "")`` if this process can build Networks, else ``(False, reason naming the fix)``."""
    if not sys.platform.startswith("linux"):
        return False, "network namespaces need Linux: drop --hosts"
    if os.geteuid() != 0:
        return False, "network namespaces need root: run as root or drop --hosts"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("iptables", "iptables")):
        if _tool(tool) is None:
            return False, f"`{tool}` is missing: install it (apt-get install -y {package}) or drop --hosts"
    probe = f"{PREFIX}-probe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except NetworkError as e:
        return False, f"cannot create a network namespace ({e}): run privileged (CAP_SYS_ADMIN) or drop --hosts"
    try:
        _iptables(probe, "-t", "nat", "-L", "-n")
    except NetworkError as e:
        return False, f"iptables does not work inside a namespace ({e}): check the kernel's nf_tables/nat support"
    finally:
        _ip("netns", "del", probe, check=False)
    return True, ""


_NETEM: bool | None = None


def _netem_works(ns: str) -> bool:
    """Probe once (on ``ns``'s loopback) whether the kernel has the netem qdisc."""
    global _NETEM
    if _NETEM is None:
        _NETEM = _tc(ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False).returncode == 0
        if _NETEM:
            _tc(ns, "qdisc", "del", "dev", "lo", "root", check=False)
    return _NETEM


# ---------------------------------------------------------------------------------------------
# subnet claim and stale networks


def _claim_octet() -> int:
    """Pick a free 10.213.N.0/24 and claim it by adding its blackhole route in the root namespace."""
    seen = " ".join([_ip("-4", "route", "show", "table", "all").stdout, _ip("-4", "addr").stdout,
                     _ip("netns", "list").stdout])
    start = os.getpid() % len(OCTETS)
    for k in range(len(OCTETS)):
        n = OCTETS[(start + k) % len(OCTETS)]
        if f"{SUBNET_PREFIX}.{n}." in seen or f"{PREFIX}{n}-" in seen:
            continue
        done = _ip("route", "add", "blackhole", f"{SUBNET_PREFIX}.{n}.0/24", check=False)
        if done.returncode == 0:
            return n
        if "exists" not in done.stderr:
            raise NetworkError(f"`ip route add blackhole {SUBNET_PREFIX}.{n}.0/24` failed: {done.stderr.strip()}")
    raise NetworkError(f"no free {SUBNET_PREFIX}.N.0/24 subnet left: close other Networks or run cleanup_stale()")


def _state_file(octet: int) -> Path:
    return STATE_DIR / f"{PREFIX}{octet}.pid"


def _remove_network(octet: int) -> list[str]:
    """Delete every namespace named ``sps<octet>-*`` and the /24's blackhole route; return the names."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    mine = [n for n in names if n.startswith(f"{PREFIX}{octet}-")]
    _ip("link", "del", f"{PREFIX}{octet}-dr", check=False)  # the driver link, with its routes
    for name in mine:
        _ip("netns", "del", name, check=False)
    _ip("route", "del", "blackhole", f"{SUBNET_PREFIX}.{octet}.0/24", check=False)
    with contextlib.suppress(OSError):
        _state_file(octet).unlink()
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Remove the networks left by processes that died without closing them; return namespaces removed."""
    removed: list[str] = []
    for record in sorted(STATE_DIR.glob(f"{PREFIX}*.pid")) if STATE_DIR.is_dir() else []:
        try:
            octet, owner = int(record.stem[len(PREFIX):]), int(record.read_text().split()[0])
        except (ValueError, IndexError, OSError):
            continue
        if owner != os.getpid() and not _alive(owner):
            removed += _remove_network(octet)
    return removed


# ---------------------------------------------------------------------------------------------
# the network


@dataclass
class _Host:
    name: str
    index: int
    namespace: str
    address: str
    peer: str  # the switch-side end of its veth pair, in the switch namespace
    partitioned: bool = False
    cut: set[str] = field(default_factory=set)  # hosts cut from this one by rules in this one's namespace
    loss: float = 0.0
    rate: int = 0
    delay: float = 0.0
    proxy: subprocess.Popen | None = None  # the delay proxy, when delay runs through it
    proxy_port: int = 0
    proxy_redirect: bool = False  # whether the NAT rules feeding the proxy are in place
    proxy_log: object = field(default=None, repr=False)


_OPEN: set["Network"] = set()
_OPEN_LOCK = threading.Lock()


@atexit.register
def _close_all() -> None:
    with _OPEN_LOCK:
        networks = list(_OPEN)
    for network in networks:
        network.close()


class Network:
    """Hosts in their own network namespaces, joined by a bridge; see the module docstring."""

    def __init__(self, hosts: list[str], *, name: str = "", delay_backend: str = "auto", driver: bool = False):
        """``hosts``: unique names ("coordinator", "server-0", ...); ``name``: a label for reports.
        ``delay_backend``: "auto" (netem if the kernel has it, else the proxy), "netem" or "proxy".
        ``driver``: also link the root namespace into the bridge (address ``.1``, one /32 route per
        host, so the /24's blackhole route still catches every other address), for a process that
        drives the hosts (health checks, status, chaos) from outside them."""
        hosts = list(hosts)
        if not hosts:
            raise ValueError("a Network needs at least one host")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"host names must be unique: {hosts}")
        if len(hosts) > 250:
            raise ValueError("at most 250 hosts fit in a /24")
        if delay_backend not in ("auto", "netem", "proxy"):
            raise ValueError(f"delay_backend must be 'auto', 'netem' or 'proxy', not {delay_backend!r}")
        self.name = name
        self.hosts = hosts
        self.octet: int | None = None
        self._delay_backend = delay_backend
        self.driver = driver
        self._hosts: dict[str, _Host] = {}
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.RLock()
        self._started = self._closed = False

    # -- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> "Network":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        parts = [self.name] if self.name else []
        parts += [self.subnet] if self.octet is not None else []
        parts += [f"hosts={self.hosts}"] + (["closed"] if self._closed else [])
        return f"<Network {' '.join(parts)}>"

    @property
    def subnet(self) -> str:
        self._require_octet()
        return f"{SUBNET_PREFIX}.{self.octet}.0/24"

    @property
    def switch(self) -> str:
        """The namespace holding the bridge."""
        self._require_octet()
        return f"{PREFIX}{self.octet}-sw"

    def start(self) -> "Network":
        """Claim a subnet and build the switch and the hosts; on failure, undo everything and raise."""
        with self._lock:
            if self._closed:
                raise NetworkError("this Network was closed: make a new one")
            if self._started:
                return self
            ok, reason = available()
            if not ok:
                raise NetworkError(reason)
            self._started = True
            with _OPEN_LOCK:
                _OPEN.add(self)  # from here on, atexit tears down whatever gets built
            try:
                self.octet = _claim_octet()
                self._record_owner()
                self._build_switch()
                for index, host in enumerate(self.hosts):
                    self._build_host(host, index)
                if self.driver:
                    self._build_driver()
            except BaseException:
                self.close()
                raise
            return self

    def _record_owner(self) -> None:
        with contextlib.suppress(OSError):
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            _state_file(self.octet).write_text(f"{os.getpid()} {self.name}\n")

    def _build_switch(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", sw, "link", "set", BRIDGE, "addrgenmode", "none")
        _ip("-n", sw, "link", "set", BRIDGE, "up")

    @property
    def driver_address(self) -> str:
        """The root namespace's address on the bridge (with ``driver=True``)."""
        self._require_octet()
        return f"{SUBNET_PREFIX}.{self.octet}.1"

    def _build_driver(self) -> None:
        link = f"{PREFIX}{self.octet}-dr"
        _ip("link", "add", link, "type", "veth", "peer", "name", "dr", "netns", self.switch)
        _ip("-n", self.switch, "link", "set", "dr", "addrgenmode", "none")
        _ip("-n", self.switch, "link", "set", "dr", "master", BRIDGE, "up")
        _ip("link", "set", link, "addrgenmode", "none")
        _ip("addr", "add", f"{self.driver_address}/32", "dev", link)
        _ip("link", "set", link, "up")
        for h in self._hosts.values():  # /32s: more specific than the blackhole, which keeps the rest
            _ip("route", "add", f"{h.address}/32", "dev", link, "src", self.driver_address)

    def _build_host(self, host: str, index: int) -> None:
        ns, peer = f"{PREFIX}{self.octet}-h{index}", f"h{index}"
        h = _Host(host, index, ns, f"{SUBNET_PREFIX}.{self.octet}.{index + 2}", peer)
        _ip("netns", "add", ns)
        self._hosts[host] = h
        # Both ends are created directly inside their namespaces: nothing appears in the root one.
        _ip("link", "add", HOST_IF, "netns", ns, "type", "veth", "peer", "name", peer, "netns", self.switch)
        # No IPv6 link-local addresses: hosts talk IPv4 only, which every fault covers.
        _ip("-n", self.switch, "link", "set", peer, "addrgenmode", "none")
        _ip("-n", self.switch, "link", "set", peer, "master", BRIDGE, "up")
        _ip("-n", ns, "link", "set", HOST_IF, "addrgenmode", "none")
        _ip("-n", ns, "addr", "add", f"{h.address}/24", "dev", HOST_IF)
        _ip("-n", ns, "link", "set", HOST_IF, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        # Turn connection tracking on in the namespace now (a conntrack match does; nat chains alone
        # do not). Started later, by delay's first REDIRECT rule, conntrack would pick up the
        # connections already open mid-stream as new ones and send them to the proxy, which knows
        # nothing of them: they would break instead of keeping their direct path.
        for chain in ("PREROUTING", "OUTPUT"):
            _iptables(ns, "-t", "nat", "-A", chain, "-m", "conntrack", "--ctstate", "NEW", "-j", "RETURN")

    def close(self) -> None:
        """Stop what we started, delete the namespaces and the blackhole route. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Each step on its own: one failing (a command timing out) must not keep the rest.
            for proc in self._procs:
                _attempt(_stop, proc)
            for h in self._hosts.values():
                _attempt(self._stop_proxy, h)
            if self.octet is not None:
                for ns in [h.namespace for h in self._hosts.values()] + [self.switch]:
                    _attempt(_warn_leftovers, ns)
                _attempt(_remove_network, self.octet)
        with _OPEN_LOCK:
            _OPEN.discard(self)

    # -- hosts -----------------------------------------------------------------------------------

    def _host(self, host: str) -> _Host:
        if not self._started or self._closed:
            raise NetworkError(f"{self!r} is not running: use it inside `with Network(...)` or call start()")
        try:
            return self._hosts[host]
        except KeyError:
            raise KeyError(f"no host {host!r} in this Network; hosts: {self.hosts}") from None

    def _require_octet(self) -> None:
        if self.octet is None:
            raise NetworkError("the Network has not been started")

    def address(self, host: str) -> str:
        """The host's IPv4 address, 10.213.N.(i+2)."""
        return self._host(host).address

    def namespace(self, host: str) -> str:
        """The host's namespace name (for ``ip netns exec``)."""
        return self._host(host).namespace

    def popen(self, host: str, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the host's namespace. ``ip netns exec`` execs ``argv`` in place (it
        does not fork), so the Popen's pid is the program's own. Still running at ``close()``, it is
        sent SIGTERM, then SIGKILL."""
        with self._lock:
            ns = self._host(host).namespace
            proc = subprocess.Popen([_tool("ip") or "ip", "netns", "exec", ns, *argv], **popen_kwargs)
            self._procs = [p for p in self._procs if p.returncode is None] + [proc]  # forget reaped ones
            return proc

    # -- faults ----------------------------------------------------------------------------------

    def partition(self, host: str) -> None:
        """Cut the host off: its link is set down on the switch side; all its traffic is dropped."""
        with self._lock:
            h = self._host(host)
            _ip("-n", self.switch, "link", "set", h.peer, "down")
            h.partitioned = True

    def heal(self, host: str) -> None:
        """Undo ``partition``."""
        with self._lock:
            h = self._host(host)
            _ip("-n", self.switch, "link", "set", h.peer, "up")
            h.partitioned = False

    def cut(self, a: str, b: str) -> None:
        """Cut the link between hosts ``a`` and ``b`` only (both ways; each still reaches every other
        host): DROP rules in ``a`` for ``b``'s address, so open connections hang as over a broken path
        rather than being refused. ``mend`` undoes it."""
        if a == b:
            raise ValueError(f"cannot cut {a!r} from itself")
        with self._lock:
            ha, hb = self._host(a), self._host(b)
            if b in ha.cut or a in hb.cut:
                return
            for rule in _cut_rules(hb.address):
                _iptables(ha.namespace, "-I", *rule)
            ha.cut.add(b)

    def mend(self, a: str, b: str) -> None:
        """Undo ``cut(a, b)`` (in either order)."""
        with self._lock:
            for h, other in ((self._host(a), self._host(b)), (self._host(b), self._host(a))):
                if other.name in h.cut:
                    for rule in _cut_rules(other.address):
                        _iptables(h.namespace, "-D", *rule)
                    h.cut.discard(other.name)

    def loss(self, host: str, percent: float) -> None:
        """Drop ``percent`` % of the packets the host sends and, independently, of those it receives
        (so a round trip is lost with probability 1 - (1 - p)^2). 0 removes the loss."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be within 0..100, not {percent}")
        with self._lock:
            h = self._host(host)
            if h.loss:
                for rule in _loss_rules(h.loss):
                    _iptables(h.namespace, "-D", *rule)
                h.loss = 0.0
            if percent:
                for rule in _loss_rules(percent):
                    _iptables(h.namespace, "-I", *rule)
                h.loss = float(percent)

    def rate(self, host: str, kbit: int) -> None:
        """Limit the host's link to ``kbit`` kbit/s each way (tc tbf on both ends). 0 removes it."""
        if kbit < 0:
            raise ValueError(f"rate must be >= 0 kbit/s, not {kbit}")
        with self._lock:
            h = self._host(host)
            h.rate = int(kbit)
            self._apply_host_qdisc(h)
            if h.rate:
                _tc(self.switch, "qdisc", "replace", "dev", h.peer, "root", *_tbf(h.rate))
            else:
                _tc(self.switch, "qdisc", "del", "dev", h.peer, "root", check=False)

    def delay(self, host: str, ms: float) -> None:
        """Add ``ms`` of latency to what the host sends. 0 removes it.

        With netem (if the kernel has it) every packet leaving the host's eth0 is held ``ms``. Without,
        the host's TCP goes through ``delay_proxy`` and differs from netem in that: only TCP is
        delayed; only connections opened after the call go through the proxy (ones already open keep
        their direct path); for connections the host accepts, the peer's connect() does not wait
        (the host's data does); a connection to a closed port on the host is accepted, then closed.
        Changing the delay applies at once to every proxied connection. Setting it to 0 removes the
        NAT rules (new connections go direct) and sets the proxy's delay to 0, so connections through
        it go on, undelayed; the proxy is stopped at ``close()``.
        """
        if ms < 0:
            raise ValueError(f"delay must be >= 0 ms, not {ms}")
        with self._lock:
            h = self._host(host)
            if self._use_netem(h):
                h.delay = float(ms)
                self._apply_host_qdisc(h)
                return
            if ms and h.proxy is None:
                self._start_proxy(h, ms)
            if h.proxy is not None:
                self._proxy_command(h, f"delay {ms:g}")
            self._set_redirect(h, bool(ms))
            h.delay = float(ms)

    def faults(self) -> dict[str, dict]:
        """What is applied now, per host: ``{"worker-0": {"delay_ms": 100.0}, "server-0": {}, ...}``
        with keys ``partitioned``, ``cut_from`` (the hosts ``cut`` from it), ``loss_percent``, ``rate_kbit``
        and ``delay_ms`` when set."""
        with self._lock:
            report: dict[str, dict] = {}
            for name, h in self._hosts.items():
                entry: dict = {}
                if h.partitioned:
                    entry["partitioned"] = True
                cut = sorted(h.cut | {o.name for o in self._hosts.values() if name in o.cut})
                if cut:
                    entry["cut_from"] = cut
                if h.loss:
                    entry["loss_percent"] = h.loss
                if h.rate:
                    entry["rate_kbit"] = h.rate
                if h.delay:
                    entry["delay_ms"] = h.delay
                report[name] = entry
            return report

    # -- measuring links ---------------------------------------------------------------------------

    def link_bytes(self, host: str) -> dict[str, int]:
        """Bytes the host's eth0 has received and sent so far: ``{"rx": ..., "tx": ...}`` (the kernel's
        counters, as in /sys/class/net/eth0/statistics; the delay proxy's loopback hops are not in them)."""
        ns = self._host(host).namespace
        stats = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", HOST_IF).stdout)[0]["stats64"]
        return {"rx": int(stats["rx"]["bytes"]), "tx": int(stats["tx"]["bytes"])}

    def tcp_rtt_ms(self, src: str, dst: str, *, samples: int = 20, timeout: float = 60.0) -> float:
        """Median round trip, in ms, of a 16-byte message echoed over one TCP connection that ``src``
        opens to ``dst`` (so it goes through both hosts' delay, as a new connection of theirs would).
        Blocks up to ``timeout`` s; raises NetworkError if the probe fails (the hosts cannot reach each
        other: a partition, or a delay proxy that did not come up)."""
        with self._lock:
            self._host(src), self._host(dst)
        server = self.popen(dst, [sys.executable, "-c", _RTT_ECHO], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=0)
        try:
            port = _read_line(server, timeout)
            if not port.isdigit():
                raise NetworkError(f"the RTT echo server on {dst} did not start (got {port!r})")
            client = self.popen(src, [sys.executable, "-c", _RTT_CLIENT, self.address(dst), port, str(samples)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                out, err = client.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop(client)
                raise NetworkError(f"the RTT probe {src} -> {dst} did not finish within {timeout:g} s") from None
            if client.returncode != 0:
                raise NetworkError(f"the RTT probe {src} -> {dst} failed: {err.strip()[-500:]}")
            return float(out)
        finally:
            _stop(server)

    # -- qdiscs ----------------------------------------------------------------------------------

    def _use_netem(self, h: _Host) -> bool:
        if self._delay_backend == "proxy":
            return False
        if _netem_works(h.namespace):
            return True
        if self._delay_backend == "netem":
            raise NetworkError("this kernel has no netem qdisc (sch_netem): use delay_backend='auto' or 'proxy'")
        return False

    def _apply_host_qdisc(self, h: _Host) -> None:
        """The host-side qdisc on eth0: netem (delay, with its own rate option) or tbf or none."""
        if h.delay and self._use_netem(h):
            spec = ["netem", "delay", f"{h.delay:g}ms", "limit", "100000"]
            if h.rate:
                spec += ["rate", f"{h.rate}kbit"]
            _tc(h.namespace, "qdisc", "replace", "dev", HOST_IF, "root", *spec)
        elif h.rate:
            _tc(h.namespace, "qdisc", "replace", "dev", HOST_IF, "root", *_tbf(h.rate))
        else:
            _tc(h.namespace, "qdisc", "del", "dev", HOST_IF, "root", check=False)

    # -- the delay proxy -------------------------------------------------------------------------

    def _start_proxy(self, h: _Host, ms: float) -> None:
        log = tempfile.TemporaryFile()
        argv = [sys.executable, str(DELAY_PROXY), "--port", "0", "--delay-ms", f"{ms:g}",
                "--mark", hex(PROXY_MARK), "--parent-pid", str(os.getpid()), "--control-stdin"]
        proc = subprocess.Popen([_tool("ip") or "ip", "netns", "exec", h.namespace, *argv],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, bufsize=0)
        h.proxy, h.proxy_log = proc, log
        line = _read_line(proc, PROXY_START_S)
        if not line.startswith("listening "):
            log.seek(0)
            err = log.read().decode(errors="replace").strip()[-2000:]
            self._stop_proxy(h)
            raise NetworkError(f"the delay proxy for {h.name} did not start (got {line!r}): {err}")
        h.proxy_port = int(line.split()[1])

    def _proxy_command(self, h: _Host, command: str) -> None:
        try:
            h.proxy.stdin.write(command.encode() + b"\n")
            answer = _read_line(h.proxy, CMD_TIMEOUT_S)
        except OSError as e:
            answer = f"({e})"
        if answer != "ok":
            raise NetworkError(f"the delay proxy for {h.name} refused {command!r}: {answer!r}")

    def _set_redirect(self, h: _Host, on: bool) -> None:
        """Add or remove the NAT rules that send the host's TCP through its proxy."""
        if on == h.proxy_redirect:
            return
        action = "-I" if on else "-D"
        for chain, rule in _redirect_rules(h.proxy_port):
            _iptables(h.namespace, "-t", "nat", action, chain, *rule)
        h.proxy_redirect = on

    def _stop_proxy(self, h: _Host) -> None:
        if h.proxy is not None:
            with contextlib.suppress(OSError):
                h.proxy.stdin.close()  # EOF: the proxy exits by itself
            _stop(h.proxy, own_exit_s=1.0)
            h.proxy = None
        if h.proxy_log is not None:
            h.proxy_log.close()
            h.proxy_log = None


# tcp_rtt_ms's helpers, run with ``python -c`` inside the hosts: an echo server on a free port that
# prints the port, serving one connection; a client that prints the median round trip in ms.
_RTT_ECHO = r"""
import socket
s = socket.socket(); s.bind(("0.0.0.0", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
s.settimeout(60); c, _ = s.accept(); c.settimeout(60)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := c.recv(4096):
    c.sendall(data)
"""
_RTT_CLIENT = r"""
import socket, statistics, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); c.sendall(b"p" * 16); n = 0
    while n < 16:
        data = c.recv(64)
        if not data:
            sys.exit("the echo connection closed")
        n += len(data)
    times.append((time.perf_counter() - t) * 1000)
print(statistics.median(times))
"""


def _cut_rules(address: str) -> list[list[str]]:
    return [["INPUT", "-i", HOST_IF, "-s", address, "-j", "DROP"], ["OUTPUT", "-o", HOST_IF, "-d", address, "-j", "DROP"]]


def _loss_rules(percent: float) -> list[list[str]]:
    match = ["-m", "statistic", "--mode", "random", "--probability", f"{percent / 100:.6f}", "-j", "DROP"]
    return [["INPUT", "-i", HOST_IF, *match], ["OUTPUT", "-o", HOST_IF, *match]]


def _redirect_rules(port: int) -> list[tuple[str, list[str]]]:
    """Connections the host opens over eth0 (bar the proxy's own, which carry PROXY_MARK) and
    connections arriving on eth0 are redirected to the proxy's port."""
    to = ["-j", "REDIRECT", "--to-ports", str(port)]
    return [("OUTPUT", ["-o", HOST_IF, "-p", "tcp", "-m", "mark", "!", "--mark", hex(PROXY_MARK), *to]),
            ("PREROUTING", ["-i", HOST_IF, "-p", "tcp", *to])]


def _tbf(kbit: int) -> list[str]:
    """tbf arguments for ``kbit``: a burst of 20 ms of traffic (at least 16 KiB), 100 ms of queue."""
    burst = max(16 * 1024, kbit * 1000 // 8 // 50)
    return ["tbf", "rate", f"{kbit}kbit", "burst", str(burst), "latency", "100ms"]


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line from ``proc``'s unbuffered stdout, waiting at most ``timeout``; "" on EOF/timeout."""
    fd, data, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1)  # byte by byte: nothing past the line is consumed
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _stop(proc: subprocess.Popen, *, own_exit_s: float = 0.0) -> None:
    """Stop a process we started: give it ``own_exit_s`` to exit by itself, then SIGTERM, then SIGKILL.
    Going through its Popen (not a bare PID) makes sure the signal reaches the process we started."""
    if own_exit_s and proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=own_exit_s)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _attempt(step, *args) -> None:
    """Run one teardown step; a failure becomes a warning so that the next steps still run."""
    try:
        step(*args)
    except Exception as e:  # teardown goes on whatever went wrong
        warnings.warn(f"network teardown: {getattr(step, '__name__', step)}{args}: {e}", RuntimeWarning, stacklevel=3)


def _warn_leftovers(ns: str) -> None:
    """Warn about processes someone else started in ``ns``: they keep it alive after deletion."""
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    if pids:
        warnings.warn(f"processes {', '.join(pids)} still run in namespace {ns}; it is deleted from "
                      f"`ip netns` but lives on, cut off, until they exit", RuntimeWarning, stacklevel=4)
