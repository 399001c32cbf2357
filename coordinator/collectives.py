"""Small collectives among a job's workers, held by the coordinator (plain Python, no tensors).

What workers share beside the optimizer (a loss to log, a metric to average, "rank 0
saved the checkpoint", the checkpoint's path) is a few bytes per step. One primitive
covers all of it: an all-gather. Round ``r`` of the collective ``name`` closes once every
member of the job's current membership view has contributed its payload; every caller
then gets all payloads by rank (``worker.collectives`` builds all-reduce, barrier and
broadcast on it). Rounds count per name; every worker calls them in the same order, as
torch.distributed's collectives.

Bounded: a payload has at most ``MAX_PAYLOAD`` bytes, a job at most ``MAX_OPEN`` open
rounds, and the newest ``KEEP_DONE`` closed rounds are kept so that a worker whose answer
was lost (and retries) still gets it. Not journaled: a restarted coordinator forgets open
rounds; their callers time out and raise.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from ..proto.errors import FailedPrecondition, InvalidArgument, UnknownWorker

MAX_PAYLOAD = 64 * 1024  # bytes one worker contributes to one round
MAX_NAME = 128  # characters of a collective's name
MAX_OPEN = 256  # open rounds per job (every name together)
KEEP_DONE = 256  # closed rounds kept per job for callers that retry
MAX_NAMES = 1024  # distinct collective names per job


@dataclass
class Round:
    payloads: dict[int, bytes] = field(default_factory=dict)  # worker_id -> payload
    result: tuple[bytes, ...] | None = None  # by rank, once closed
    epoch: int = 0  # the view whose members closed it


class Rounds:
    """One job's collective rounds. Every method is called under the coordinator's lock."""

    def __init__(self):
        self.open: dict[tuple[str, int], Round] = {}
        self.done: OrderedDict[tuple[str, int], Round] = OrderedDict()
        self.highest_done: dict[str, int] = {}  # name -> highest closed round (older ones may be gone)

    def contribute(self, view, worker_id: int, name: str, round_: int, payload: bytes) -> Round:
        """Record ``worker_id``'s payload for (name, round) and close the round if the view's members
        are all in. Refuses a payload that is too big, a worker outside the view, and a round that
        closed so long ago that its result is gone; changes nothing then."""
        if not name or len(name) > MAX_NAME:
            raise InvalidArgument(f"a collective's name must have 1 to {MAX_NAME} characters, got {len(name)}")
        if round_ < 0:
            raise InvalidArgument(f"a collective's round must be >= 0, got {round_}")
        if len(payload) > MAX_PAYLOAD:
            raise InvalidArgument(f"collective {name!r}: a payload has at most {MAX_PAYLOAD} bytes, got "
                                  f"{len(payload)}; share a file's path instead of its contents")
        if worker_id not in view.worker_ids:
            raise UnknownWorker(f"worker {worker_id} is not in the job's membership (epoch {view.epoch}); "
                                "only members take part in collectives")
        key = (name, round_)
        if key in self.done:
            return self.done[key]
        if round_ <= self.highest_done.get(name, -1) and key not in self.open:
            raise FailedPrecondition(f"round {round_} of collective {name!r} closed long ago and its result is "
                                     "gone; every worker must call a name's collectives in the same order")
        r = self.open.get(key)
        if r is None:
            if name not in self.highest_done and len(self.highest_done) >= MAX_NAMES:
                raise FailedPrecondition(f"this job used {MAX_NAMES} collective names (its limit); reuse names "
                                         "(rounds count per name)")
            if len(self.open) >= MAX_OPEN:
                raise FailedPrecondition(f"{MAX_OPEN} collective rounds are open in this job (its limit): the "
                                         "workers do not call the same collectives in the same order")
            r = self.open[key] = Round()
            self.highest_done.setdefault(name, -1)
        r.payloads[worker_id] = bytes(payload)
        self.close_if_complete(view, key)
        return r

    def awaiting(self, worker_id: int) -> list[str]:
        """The names of the open rounds others contributed to and ``worker_id`` has not (the heartbeat
        tells a worker blocked elsewhere, e.g. in a step, that the others wait for it here)."""
        return sorted({name for (name, _), r in self.open.items() if r.payloads and worker_id not in r.payloads})

    def close_if_complete(self, view, key: tuple[str, int]) -> bool:
        """Close the round if every member of ``view`` contributed (a member that left the view no
        longer counts; its payload is dropped)."""
        r = self.open.get(key)
        if r is None:
            return key in self.done
        if not view.members or any(m.worker_id not in r.payloads for m in view.members):
            return False
        ranked = sorted(view.members, key=lambda m: m.rank)
        r.result, r.epoch = tuple(r.payloads[m.worker_id] for m in ranked), view.epoch
        r.payloads = {}
        del self.open[key]
        self.done[key] = r
        self.highest_done[key[0]] = max(self.highest_done.get(key[0], -1), key[1])
        while len(self.done) > KEEP_DONE:
            self.done.popitem(last=False)
        return True
