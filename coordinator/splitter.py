"""The batch splitter: each window's cut of a job's global batch between its workers, by measured throughput.

A plain-Python piece of a job's state (``JobState.balancer``): the coordinator calls
``report`` under its lock when a worker reports its samples/s (``ReportThroughput``),
and the journal keeps it (``to_dict``/``from_dict``) so every worker sees the same split
after a restart. Workers cut their batches with ``worker.balance``; before the first
decided window, and when the membership changed, they split with ``proportional_split``
at equal weights.
"""
from __future__ import annotations

from ..proto.errors import InvalidArgument


class BatchSplitter:
    """Splits each global batch between ranks in proportion to their measured throughput.

    Windows are ``balance_every`` steps long. At the start of window n a worker
    reports the samples/s it measured over window n - 1 and asks for window n's
    split. Window n's split is decided by the first worker that asks (then kept, so
    every worker uses the same one) from the rates measured over window n - 2:
    those were reported at the start of window n - 1, before any worker could have
    finished it, so in sync mode they are all in. If some are missing (a backup
    worker skipped the window) the split stays as it was. Splitting the global
    batch, never resizing it, keeps sync training the same as one process on the
    union batch: only who computes which rows changes.
    """

    def __init__(self):
        self.global_batch = 0
        self.splits: dict[int, tuple[int, ...]] = {}  # window -> batch size by rank
        self.rates: dict[int, dict[int, float]] = {}  # window -> worker_id -> samples/s measured over it

    def to_dict(self) -> dict:
        return {"global_batch": self.global_batch, "splits": {str(w): list(s) for w, s in self.splits.items()},
                "rates": {str(w): {str(k): v for k, v in r.items()} for w, r in self.rates.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "BatchSplitter":
        out = cls()
        out.global_batch = int(d.get("global_batch", 0))
        out.splits = {int(w): tuple(s) for w, s in d.get("splits", {}).items()}
        out.rates = {int(w): {int(k): float(v) for k, v in r.items()} for w, r in d.get("rates", {}).items()}
        return out

    def report(self, members, worker_id: int, window: int, rate: float, global_batch: int) -> tuple[int, ...]:
        if global_batch < len(members):
            raise InvalidArgument(f"a global batch of {global_batch} cannot be split between {len(members)} workers")
        if self.global_batch and global_batch != self.global_batch:
            raise InvalidArgument(f"global batch {global_batch} differs from the job's {self.global_batch}; "
                                  "every worker must use the same --batch-size")
        self.global_batch = global_batch
        if window > 0 and rate > 0:
            self.rates.setdefault(window - 1, {})[worker_id] = rate
        if window not in self.splits:
            self.splits[window] = self._decide(members, window)
            for old in [w for w in self.rates if w < window - 2]:
                del self.rates[old]
            for old in sorted(self.splits)[:-8]:  # a late worker asks for at most a few windows back
                del self.splits[old]
        return self.splits[window]

    def _decide(self, members, window: int) -> tuple[int, ...]:
        rates = self.rates.get(window - 2, {})
        if all(m.worker_id in rates for m in members):
            return proportional_split(self.global_batch, [rates[m.worker_id] for m in members])
        earlier = [w for w in self.splits if w < window]
        return self.splits[max(earlier)] if earlier else proportional_split(self.global_batch, [1.0] * len(members))


def proportional_split(total: int, weights: list[float]) -> tuple[int, ...]:
    """``total`` cut into len(weights) parts >= 1 in proportion to ``weights`` (largest remainders)."""
    n = len(weights)
    spare, whole = total - n, sum(weights)
    shares = [spare * w / whole for w in weights]
    sizes = [1 + int(s) for s in shares]
    by_remainder = sorted(range(n), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in by_remainder[:total - sum(sizes)]:
        sizes[i] += 1
    return tuple(sizes)
