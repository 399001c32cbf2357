"""Fast failover: a dead primary's shards move as soon as a worker reports its connection refused.

Without help the coordinator learns that a primary died from its silence: placement calls go
unanswered for a whole lease (``Coordinator.replicas_renewed``), 1.5 s at the default. A worker
whose call to that primary was refused or reset has better evidence, and it says so when it asks
where the shards are now (``GetJob``'s ``suspect``, sent by ``worker.ps_client.Locator``). The
coordinator does not take a worker's word for it (a worker may be the one cut off): it opens a
fresh connection to the server itself, and only a *refused* connection, which means no process
listens on the server's port any more, declares the server dead now (failovers with reason
"refused"). A paused or partitioned server accepts connections or lets them time out: it is left
to its lease, as before.

Safe without waiting for the old primary's lease: a process that refuses connections is gone
(a server stopping gracefully has closed its port first; anything it still had in flight could only
be applied after its backups acknowledged it, and the promoted backup refuses an older placement
epoch). The new placement goes out before the worker is answered, so its retried call finds the
promoted backup already primary.
"""
from __future__ import annotations

import time

from ..proto.errors import InvalidArgument

MAX_SUSPECTS = 8  # addresses one call may name
PROBE_TIMEOUT_S = 0.5  # a server that neither answers nor refuses in this long is left to its lease
RECHECK_S = 0.2  # an address checked this recently is not checked again (many workers report one death)


class SuspectChecker:
    """Checks servers that workers found refusing; one per coordinator. Thread-safe (gRPC handlers)."""

    def __init__(self, coordinator, probe_timeout: float = PROBE_TIMEOUT_S):
        self.c, self.probe_timeout = coordinator, probe_timeout
        self._checked: dict[str, float] = {}  # address -> monotonic time of its last check

    def check(self, addresses) -> list[int]:
        """Check each address that is a replicated job's server and not already down; declare the ones
        whose port refuses dead, send the new placement and wait (at most a lease) until a placement
        round has carried it. Returns the servers declared dead. Blocks up to ``probe_timeout`` per
        address plus that wait; raises InvalidArgument for more than MAX_SUSPECTS addresses."""
        addresses = list(dict.fromkeys(addresses))
        if len(addresses) > MAX_SUSPECTS or any(len(a) > 256 for a in addresses):
            raise InvalidArgument(f"a call names at most {MAX_SUSPECTS} suspect servers (host:port, at most 256 "
                                  f"characters each), got {len(addresses)}")
        dead = []
        for address in addresses:
            sid = self._due(address)
            if sid is None or not self.c.shards.refuses(address, self.probe_timeout):
                continue
            with self.c.cond:
                if self.c.servers.get(sid) != address or sid in self.c.down:  # re-registered, or found meanwhile
                    continue
                self.c.declare_dead(sid, f"at {address} refuses connections (reported by a worker)", "refused")
                self.c.replanned()
                self.c.placement_due.set()
                after = self.c.rounds_started
                dead.append(sid)
        if dead:  # the promoted backups must know before the worker retries there
            with self.c.cond:
                self.c.cond.wait_for(lambda: self.c.rounds_sent > after, timeout=self.c.replica_lease_s)
        return dead

    def _due(self, address: str) -> int | None:
        """The server at ``address`` if it is to be checked now (a replicated job's, not down, not
        checked in the last RECHECK_S)."""
        now = time.monotonic()
        with self.c.cond:
            sid = next((s for s, a in self.c.servers.items() if a == address), None)
            replicated = any(j.placement is not None for j in self.c.jobs.values())
            if sid is None or sid in self.c.down or not replicated or self.c.shards is None:
                return None
            if now - self._checked.get(address, -RECHECK_S) < RECHECK_S:
                return None
            self._checked[address] = now
            return sid
