"""Polling for the tests that drive real processes."""
import time

from shardps.proto.errors import ShardpsError


def wait_until(predicate, timeout=120, what="condition", every=0.05):
    """The predicate's first true value. A status call that fails meanwhile (a process restarting, a
    machine busy with other tests) or an assertion inside the predicate counts as "not yet"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (ShardpsError, AssertionError):
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
