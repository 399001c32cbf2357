"""The membership views one shard knows, and which members make up each step.

A view (``proto.messages.View``, from the coordinator) names a membership epoch, the first step it
governs and its member ids. Invariants, all under the shard's lock (``ShardState.cond``):

* a view, once installed for an epoch, is replaced only by a whole copy from the primary
  (``take``), never edited;
* step t is made up of the members of the newest view whose first step is at most t
  (``members_for``); before any view, of nobody;
* ``ShardState.learn_view`` decides the first step (never one this shard closed already, unless
  a dead worker's removal must unblock the open step) and lets the policy remake open steps.
"""
from __future__ import annotations

import json

from ..proto.errors import InvalidArgument


class Views:
    def __init__(self) -> None:
        self._by_epoch: dict[int, tuple[int, frozenset[int]]] = {}  # epoch -> (first step here, member ids)

    def __len__(self) -> int:
        return len(self._by_epoch)

    def __contains__(self, epoch: object) -> bool:
        return epoch in self._by_epoch

    @property
    def latest_epoch(self) -> int:
        """The newest epoch known (0: none). Safe to read without the lock (a view is only added)."""
        return max(self._by_epoch, default=0)

    def newest(self) -> tuple[int, frozenset[int]]:
        """(the newest view's epoch, its member ids); (0, none) before any view."""
        latest = self.latest_epoch
        return (latest, self._by_epoch[latest][1]) if self._by_epoch else (0, frozenset())

    def members_for(self, step: int) -> frozenset[int]:
        """Member ids of the newest known view that governs ``step``."""
        best = max((e for e, (start, _) in self._by_epoch.items() if start <= step), default=None)
        return self._by_epoch[best][1] if best is not None else frozenset()

    def member_later(self, worker_id: int, step: int) -> bool:
        """Whether ``worker_id`` is a member of a view that starts after ``step``."""
        return any(start > step and worker_id in ids for start, ids in self._by_epoch.values())

    def install(self, epoch: int, start: int, worker_ids: frozenset[int]) -> None:
        """The view of ``epoch``, governing from step ``start`` on (``ShardState.learn_view`` chose it)."""
        self._by_epoch[epoch] = (start, worker_ids)

    def to_json(self) -> str:
        """``{epoch: [start, [worker ids]]}``, as a whole copy carries them to a backup."""
        return json.dumps({str(e): [s, sorted(ids)] for e, (s, ids) in self._by_epoch.items()})

    @staticmethod
    def parse_json(text: str) -> dict[int, tuple[int, frozenset[int]]]:
        """A whole copy's views (``to_json``'s form; "": none), checked before anything changes:
        InvalidArgument when the text is not that form."""
        try:
            return {int(e): (int(v[0]), frozenset(int(w) for w in v[1])) for e, v in json.loads(text or "{}").items()}
        except (ValueError, TypeError, IndexError) as exc:
            raise InvalidArgument(f"a copy's views are not {{epoch: [start, [worker ids]]}}: {exc}") from None

    def take(self, views: dict[int, tuple[int, frozenset[int]]]) -> None:
        """Add a whole copy's views (``parse_json``'s result) to those known."""
        self._by_epoch.update(views)
