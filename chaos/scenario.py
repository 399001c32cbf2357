"""Fault scenarios: a TOML file that schedules faults by time or by step, and the runner that fires them.

    name = "a server crash and a slow link"

    [[fault]]                      # one-shot, by step
    at_step = 40
    action = "kill"
    target = "server-1"

    [[fault]]
    at_step = 45
    action = "restart"
    target = "server-1"

    [[fault]]                      # a window, by time since training started: applied, then undone
    from_s = 20
    to_s = 35
    action = "link"
    target = "worker-0"
    delay_ms = 100
    loss = 5

    [[fault]]                      # a window that starts at a step and lasts 10 seconds
    at_step = 80
    for_s = 10
    action = "partition"
    target = "server-1"

    [chaos]                        # an MTBF loop: every 8 s SIGKILL a role drawn at random (seeded),
    every_s = 8                    # restart it down_s later; `failures` times, from start_s on
    kinds = ["kill", "pause"]      # optional: each failure a kill + restart, a pause + resume (SIGSTOP/SIGCONT)
                                   # or a partition + heal of the role's host (needs --hosts)
    failures = 5
    down_s = 1.0
    start_s = 5
    seed = 1
    targets = ["servers", "workers", "coordinator"]   # groups or names; the default is all three

Actions and what undoes them at the end of a window:

| action | target | parameters | undone by |
|---|---|---|---|
| kill | coordinator, server-k, worker-i | | (restart it with another fault) |
| pause | same | | resume |
| resume | same | | |
| restart | same | | |
| partition | a host (needs ``--hosts``) | | heal |
| cut | a host (needs ``--hosts``) | peer: another host; only the link between the two | mend |
| link | a host (needs ``--hosts``) | delay_ms, loss (%), rate_kbit | all three back to 0 |
| rpc | coordinator, server-k, servers, all | kind, method, status, probability, after, worker, delay_s | rules cleared |
| checkpoint | cluster | | |

A ``[chaos]`` table expands into ``kill`` + ``restart`` pairs (or ``pause`` + ``resume`` pairs, with
``kinds``) at those times (the same seed gives the same failures); it may stand alone or beside
``[[fault]]`` entries. Its failures are paced by what happened, not only by the clock: a failure's
end comes down_s after the failure was done, and the next failure no sooner than every_s - down_s
after that end returned (a restart waits until the role is healthy again). On a machine where a
restart takes down_s this is the schedule above (one failure every every_s); where one takes 20 s,
the failures behind it move later rather than piling up and firing back to back, so every failure
is followed by at least every_s - down_s of healthy running. The timeline records when each action
started and how long it took (``took_s``); ``chaos.report.chaos_pacing`` derives the realised MTBF
and downtime from it.

Everything the runner does is recorded in its timeline (time, step, action, target, outcome),
which ``shardps run --scenario`` writes into the run's report.
"""
from __future__ import annotations

import random
import time

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..runtime.history import NO_HISTORY, History

PROCESS_ACTIONS = ("kill", "pause", "resume", "restart")
NETWORK_ACTIONS = ("partition", "heal", "link", "cut", "mend")
ACTIONS = (*PROCESS_ACTIONS, *NETWORK_ACTIONS, "rpc", "checkpoint")
WINDOWED = ("pause", "partition", "link", "rpc", "cut")
_TIMES = ("at_step", "at_s", "from_step", "to_step", "from_s", "to_s", "for_s")
_PARAMS = {"link": ("delay_ms", "loss", "rate_kbit"), "cut": ("peer",), "mend": ("peer",),
           "rpc": ("kind", "method", "status", "probability", "after", "worker", "delay_s", "max_active")}


class ScenarioError(ValueError):
    """The scenario file is wrong; the message names the fault and the fix."""


@dataclass
class Fault:
    action: str
    target: str
    start: float  # step or seconds, see by_step
    end: float | None  # end of the window (None: one-shot)
    by_step: bool
    duration_s: float | None = None  # a window that lasts this long once applied (at_step/at_s + for_s)
    params: dict = field(default_factory=dict)
    # paced (a [chaos] table's faults): due no earlier than gap_s after ``after``'s action returned, so a
    # slow restart delays the faults behind it instead of leaving them overdue, to be fired back to back
    after: Fault | None = field(default=None, repr=False, compare=False)
    gap_s: float = 0.0
    applied: bool = False
    undone: bool = False
    applied_at: float = 0.0  # monotonic
    done_at: float | None = None  # monotonic: when its action returned

    def paced_due(self, now: float) -> bool:
        """Whether the fault it follows (if any) returned at least gap_s ago (monotonic ``now``)."""
        return self.after is None or (self.after.done_at is not None and now - self.after.done_at >= self.gap_s)

    def describe(self) -> str:
        unit = "step" if self.by_step else "s"
        when = f"{unit} {self.start:g}" + (f"-{self.end:g}" if self.end is not None else "")
        when += f" for {self.duration_s:g} s" if self.duration_s is not None else ""
        extra = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{when}: {self.action} {self.target}" + (f" {extra}" if extra else "")


@dataclass
class Scenario:
    name: str
    faults: list[Fault]

    @property
    def needs_hosts(self) -> bool:
        return any(f.action in NETWORK_ACTIONS for f in self.faults)


def load(path: str | Path, workers: int, servers: int) -> Scenario:
    """Parse and check a scenario file against a cluster of ``servers`` and ``workers``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario {path} is not valid TOML: {exc}") from None
    unknown = set(data) - {"name", "fault", "chaos"}
    if unknown:
        raise ScenarioError(f"scenario {path}: unknown top-level keys {sorted(unknown)}; use name, [[fault]] "
                            f"and [chaos]")
    processes = ["coordinator", *(f"server-{i}" for i in range(servers)), *(f"worker-{i}" for i in range(workers))]
    faults = [_fault(entry, i, path, processes) for i, entry in enumerate(data.get("fault", []))]
    if "chaos" in data:
        faults += _chaos(data["chaos"], path, processes)
    if not faults:
        raise ScenarioError(f"scenario {path} has no [[fault]] entries and no [chaos] table")
    return Scenario(str(data.get("name", path.stem)), faults)


def _fault(entry: dict, index: int, path: Path, processes: list[str]) -> Fault:
    where = f"scenario {path}, fault #{index + 1}"
    action = entry.get("action")
    if action not in ACTIONS:
        raise ScenarioError(f"{where}: action must be one of {', '.join(ACTIONS)}, got {action!r}")
    target = str(entry.get("target", "cluster" if action == "checkpoint" else ""))
    allowed = {"action", "target", *_TIMES, *_PARAMS.get(action, ())}
    extra = set(entry) - allowed
    if extra:
        raise ScenarioError(f"{where}: {action} does not take {sorted(extra)}; it takes {sorted(allowed)}")
    valid_targets = {
        **dict.fromkeys(PROCESS_ACTIONS, processes),
        **dict.fromkeys(NETWORK_ACTIONS, processes),
        "rpc": ["coordinator", "servers", "all", *(p for p in processes if p.startswith("server-"))],
        "checkpoint": ["cluster"],
    }[action]
    if target not in valid_targets:
        raise ScenarioError(f"{where}: target {target!r} is not one of {', '.join(valid_targets)}")
    times = {k: entry[k] for k in _TIMES if k in entry}
    duration = times.pop("for_s", None)
    shapes = [("at_step",), ("at_s",), ("from_step", "to_step"), ("from_s", "to_s")]
    shape = next((s for s in shapes if set(times) == set(s)), None)
    if shape is None or (duration is not None and len(shape) == 2):
        raise ScenarioError(f"{where}: say when with at_step or at_s (optionally with for_s), from_step + "
                            f"to_step, or from_s + to_s (got {sorted(entry.keys() & set(_TIMES)) or 'nothing'})")
    if (len(shape) == 2 or duration is not None) and action not in WINDOWED:
        raise ScenarioError(f"{where}: {action} happens at one moment; use at_step or at_s without for_s")
    if duration is not None and (not isinstance(duration, (int, float)) or duration <= 0):
        raise ScenarioError(f"{where}: for_s must be a number of seconds > 0")
    values = [times[k] for k in shape]
    if any(not isinstance(v, (int, float)) or v < 0 for v in values) or (len(values) == 2 and values[1] <= values[0]):
        raise ScenarioError(f"{where}: times must be numbers >= 0 and a window must end after it starts")
    params = {k: entry[k] for k in _PARAMS.get(action, ()) if k in entry}
    if action == "link" and not params:
        raise ScenarioError(f"{where}: link needs delay_ms, loss and/or rate_kbit")
    if action in ("cut", "mend") and (params.get("peer") not in processes or params["peer"] == target):
        raise ScenarioError(f"{where}: {action} needs peer = another host, one of {', '.join(processes)} "
                            f"(got {params.get('peer')!r})")
    if action == "rpc" and "kind" not in params:
        raise ScenarioError(f"{where}: rpc needs kind = \"delay\", \"abort\" or \"drop\"")
    return Fault(action, target, float(values[0]), float(values[1]) if len(values) == 2 else None,
                 shape[0].endswith("step"), params=params,
                 duration_s=float(duration) if duration is not None else None)


_CHAOS_KEYS = ("every_s", "failures", "down_s", "start_s", "seed", "targets", "kinds")
# a failure's action, and what ends it down_s later (a partition cuts the role's host off: needs --hosts)
CHAOS_KINDS = {"kill": "restart", "pause": "resume", "partition": "heal"}


def _chaos(entry, path: Path, processes: list[str]) -> list[Fault]:
    """A [chaos] table as kill + restart faults by time: failure i at start_s + i * every_s, its
    target drawn with ``random.Random(seed)`` from the targets, restarted down_s later; each also paced
    by the one before it (``Fault.after``): no sooner than down_s after its failure was done, and a
    failure no sooner than every_s - down_s after the previous failure's end returned."""
    where = f"scenario {path}, [chaos]"
    if not isinstance(entry, dict):
        raise ScenarioError(f"{where}: must be a table ([chaos] with every_s and failures)")
    extra = set(entry) - set(_CHAOS_KEYS)
    if extra:
        raise ScenarioError(f"{where}: unknown keys {sorted(extra)}; it takes {list(_CHAOS_KEYS)}")
    if "every_s" not in entry or "failures" not in entry:
        raise ScenarioError(f"{where}: say how often and how many: every_s = SECONDS, failures = N")
    every, failures = entry["every_s"], entry["failures"]
    down, seed = entry.get("down_s", 1.0), entry.get("seed", 0)
    start = entry.get("start_s", every)
    numbers = {"every_s": every, "down_s": down, "start_s": start}
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers.values()):
        raise ScenarioError(f"{where}: every_s, down_s and start_s must be numbers of seconds")
    if not (isinstance(failures, int) and not isinstance(failures, bool) and 1 <= failures <= 10_000):
        raise ScenarioError(f"{where}: failures must be a whole number from 1 to 10000, got {failures!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ScenarioError(f"{where}: seed must be a whole number, got {seed!r}")
    if not 0 < down < every or start < 0:
        raise ScenarioError(f"{where}: need 0 < down_s < every_s (a role is back before the next failure) and "
                            f"start_s >= 0; got down_s={down}, every_s={every}, start_s={start}")
    groups = {"servers": [p for p in processes if p.startswith("server-")],
              "workers": [p for p in processes if p.startswith("worker-")], "coordinator": ["coordinator"]}
    names = entry.get("targets", list(groups))
    if not isinstance(names, list) or not names:
        raise ScenarioError(f"{where}: targets must be a non-empty list of servers, workers, coordinator or names")
    pool: list[str] = []
    for name in names:
        if name not in groups and name not in processes:
            raise ScenarioError(f"{where}: target {name!r} is not one of servers, workers, coordinator, "
                                f"{', '.join(processes)}")
        pool += [p for p in groups.get(name, [name]) if p not in pool]
    kinds = entry.get("kinds", ["kill"])
    if not isinstance(kinds, list) or not kinds or any(k not in CHAOS_KINDS for k in kinds):
        raise ScenarioError(f"{where}: kinds must be a non-empty list of {', '.join(CHAOS_KINDS)}, got {kinds!r}")
    rng, faults = random.Random(seed), []
    for i in range(failures):
        at, target = float(start + i * every), rng.choice(pool)
        kind = kinds[0] if len(kinds) == 1 else rng.choice(kinds)  # one kind draws as before: same seed, same run
        # Paced: the failure waits for every_s - down_s of healthy running after the previous one's end
        # returned (the schedule's own gap), its end for down_s after the failure was done.
        failure = Fault(kind, target, at, None, False, after=faults[-1] if faults else None, gap_s=every - down)
        faults += [failure, Fault(CHAOS_KINDS[kind], target, at + down, None, False, after=failure, gap_s=down)]
    return faults


@dataclass
class Event:
    time_s: float  # since training started
    step: int
    action: str
    target: str
    detail: str
    unix: float = 0.0
    ok: bool = True
    error: str = ""
    took_s: float = 0.0  # how long the action took (a restart returns once the role is healthy again)


class ScenarioRunner:
    """Fires a scenario's faults as training reaches their step or time; records a timeline.

    ``actions`` maps an action name to a callable(target, params) that does it (the run
    supplies process, network, RPC and checkpoint actions); ``tick`` is called with the job's
    current step, every ``poll_s()`` seconds: often while a fault waits for a step (it fires at
    the first tick that sees the job at or past its step, and the timeline records that step).
    """

    def __init__(self, scenario: Scenario, actions: dict[str, Callable[[str, dict], str]],
                 history: History = NO_HISTORY):
        self.scenario, self.actions = scenario, actions
        self.history = history  # each fault is also an event of the run's history (shardps check)
        self.timeline: list[Event] = []
        self.started: float | None = None

    def poll_s(self) -> float:
        """How long the caller may wait before the next tick: 50 ms while a fault waits for a step
        (a small model takes tens of steps a second), else 250 ms or until the next fault by time is
        due, whichever is sooner (a paced chaos failure's end is due down_s after it, often < 250 ms)."""
        waiting = any(f.by_step and (not f.applied or (f.end is not None and not f.undone))
                      for f in self.scenario.faults)
        if waiting:
            return 0.05
        if self.started is None:
            return 0.25
        now, soonest = time.monotonic(), 0.25
        for f in self.scenario.faults:
            if not f.applied and not f.by_step and (f.after is None or f.after.done_at is not None):
                due = max(self.started + f.start, f.after.done_at + f.gap_s if f.after is not None else 0.0)
                soonest = min(soonest, due - now)
        return max(0.01, soonest)

    def tick(self, step: int) -> None:
        """Fire every fault due at ``step`` and now, in order; blocks while their actions run (a restart
        until the role is healthy again)."""
        if self.started is None and step > 0:
            self.started = time.monotonic()  # the clock of by-time faults starts with training: its first step closed
        for fault in self.scenario.faults:
            if not fault.by_step and self.started is None:
                continue
            # read the clock per fault: an action before it in this tick may have taken seconds
            now = time.monotonic()
            position = step if fault.by_step else now - (self.started or now)
            if not fault.applied and position >= fault.start and fault.paced_due(now):
                fault.applied, fault.applied_at = True, now
                self._do(fault.action, fault, step)
                fault.done_at = time.monotonic()
            due = (fault.end is not None and position >= fault.end) or (
                fault.duration_s is not None and time.monotonic() - fault.applied_at >= fault.duration_s)
            if fault.applied and not fault.undone and due and (fault.end is not None or fault.duration_s is not None):
                fault.undone = True
                self._do(_UNDO[fault.action], fault, step)

    def do_now(self, action: str, target: str, params: dict, step: int) -> Event:
        """An ad-hoc fault (``shardps chaos kill server-1 --run DIR``), recorded like scheduled ones."""
        fault = Fault(action, target, float(step), None, True, params=dict(params))
        self._do(action, fault, step)
        self.timeline[-1].detail = f"on request: {action} {target}"
        return self.timeline[-1]

    def finish(self, step: int) -> None:
        """Undo windows still open when training ended, and end a chaos failure that landed while the fault
        that ends it was still due (a chaos table's kill and restart, pause and resume, partition and heal
        are two faults each), so teardown and the run's report find a sane cluster."""
        for fault in self.scenario.faults:
            windowed = fault.end is not None or fault.duration_s is not None
            if windowed and fault.applied and not fault.undone:
                fault.undone = True
                self._do(_UNDO[fault.action], fault, step)
        ends = {end: failure for failure, end in CHAOS_KINDS.items()}
        still: dict[tuple[str, str], int] = {}  # (target, failure) -> failures that landed minus their ends that did
        for fault in (f for f in self.scenario.faults if f.applied):
            if fault.action in CHAOS_KINDS:
                still[fault.target, fault.action] = still.get((fault.target, fault.action), 0) + 1
            elif fault.action in ends:
                still[fault.target, ends[fault.action]] = still.get((fault.target, ends[fault.action]), 0) - 1
        for fault in self.scenario.faults:
            key = (fault.target, ends.get(fault.action, ""))
            if not fault.applied and fault.action in ends and still.get(key, 0) > 0:
                fault.applied = True
                still[key] -= 1
                self._do(fault.action, fault, step)
                fault.done_at = time.monotonic()

    def _do(self, action: str, fault: Fault, step: int) -> None:
        began = time.monotonic()
        elapsed = began - self.started if self.started is not None else 0.0
        event = Event(round(elapsed, 3), step, action, fault.target, fault.describe(), time.time())
        try:
            detail = self.actions[action](fault.target, fault.params)
            if detail:
                event.detail += f" ({detail})"
        except Exception as exc:  # an action that fails is part of the experiment's record
            event.ok, event.error = False, str(exc).splitlines()[0]
        event.took_s = round(time.monotonic() - began, 3)
        self.timeline.append(event)
        self.history.record("fault", action=action, target=fault.target, step=step, ok=event.ok, error=event.error)


_UNDO = {"pause": "resume", "partition": "heal", "link": "unlink", "rpc": "unrpc", "cut": "mend"}
