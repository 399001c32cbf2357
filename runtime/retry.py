"""Client-side retries: exponential backoff with jitter, under one overall deadline.

gRPC's own retry policy does not replay large or already-committed streaming calls
(a push is a stream of megabytes), so shardps retries whole calls itself. That is
safe because every call it retries is idempotent on the server: a push is
identified by (job, worker, step) and a shard applies it at most once, answering a
repeat as it answered the first (see ``server/modes.py``); init and pull change
nothing twice.

    retry = Retrier(budget=120.0)
    reply = retry.call("Push to shard 1", lambda: send_push())

Only transient failures are retried: the server unreachable or restarting
(UNAVAILABLE), an attempt that ran past its deadline (DEADLINE_EXCEEDED: a paused
server, a lost reply), or a call the server aborted (ABORTED). Anything else (bad
input, wrong job) is raised at once. Each retry is counted in ``RetryStats``.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from typing import Callable, TypeVar

from ..proto.errors import ShardpsError

T = TypeVar("T")
log = logging.getLogger("shardps.retry")

RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"})


class RetryStats:
    """Thread-safe counters of what retrying saw: by status code, plus attempts that gave up."""

    def __init__(self):
        self._lock = threading.Lock()
        self.by_code: Counter = Counter()  # status code -> failed attempts that were retried
        self.gave_up = 0  # calls that ran out of budget

    def record(self, code: str) -> None:
        with self._lock:
            self.by_code[code] += 1

    def give_up(self) -> None:
        with self._lock:
            self.gave_up += 1

    @property
    def retries(self) -> int:
        return sum(self.by_code.values())

    @property
    def timeouts(self) -> int:
        return self.by_code["DEADLINE_EXCEEDED"]

    def as_dict(self) -> dict:
        with self._lock:
            return {"retries": sum(self.by_code.values()), "timeouts": self.by_code["DEADLINE_EXCEEDED"],
                    "gave_up": self.gave_up, "by_code": dict(self.by_code)}


class Retrier:
    """Calls a function until it succeeds, fails for good, or ``budget`` seconds have passed."""

    def __init__(self, budget: float, initial: float = 0.05, maximum: float = 2.0, stats: RetryStats | None = None,
                 retryable: frozenset[str] = RETRYABLE):
        if budget < 0 or initial <= 0 or maximum < initial:
            raise ValueError("retry budget must be >= 0 and 0 < initial backoff <= maximum backoff")
        self.budget, self.initial, self.maximum = budget, initial, maximum
        self.stats = stats if stats is not None else RetryStats()
        self.retryable = retryable
        self.aborted = ""  # set by abort(): calls stop retrying and raise this

    def abort(self, reason: str) -> None:
        """Stop every retry loop now (the caller gave up on what they were for)."""
        self.aborted = reason

    def call(self, what: str, fn: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        """``sleep(seconds)`` waits between attempts (a caller may cut it short: its target moved)."""
        start = time.monotonic()
        deadline, delay, attempt = start + self.budget, self.initial, 1
        while True:
            try:
                return fn()
            except ShardpsError as exc:
                code = getattr(exc, "code", "")
                if code not in self.retryable or self.aborted:
                    raise
                pause = delay * random.uniform(0.5, 1.5)  # jitter: retries from many workers spread out
                if time.monotonic() + pause > deadline:
                    self.stats.give_up()
                    exc.args = ((f"{exc} (gave up after {attempt} attempts over "
                                 f"{time.monotonic() - start:.1f}s)"),)
                    raise
                self.stats.record(code)
                log.warning("%s failed (%s, attempt %d); retrying in %.2fs", what, code, attempt, pause)
                sleep(pause)
                delay, attempt = min(delay * 2, self.maximum), attempt + 1
