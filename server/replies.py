"""The reply slices one shard keeps per version, shared by every reply of that version.

The N workers released by one sync step are answered with the same slice: it is encoded (or
copied) once. Invariants, under the shard's lock (``ShardState.cond``):

* a cached slice is of the version it names: the state calls ``forget`` whenever the slice
  changes without its version moving on (initialised, restored, copied, voided) and before a
  new version is made (so a cache never lives beside the next step's receive buffers);
* a new version's slice replaces the old one (the old one is dropped first: only replies
  still streaming keep it alive).
"""
from __future__ import annotations

from typing import Callable

import torch


class ReplyCache:
    def __init__(self) -> None:
        self._encoded: tuple[int, list] | None = None  # (version, encoded slice) for gRPC replies
        # dtype -> (version, a copy of the slice in it) for link replies and narrow (bf16/fp16) ones
        self._copies: dict[torch.dtype, tuple[int, torch.Tensor]] = {}

    def forget(self) -> None:
        """Drop every cached slice: the slice changed without its version moving on."""
        self._encoded = None
        self._copies.clear()

    def copy(self, version: int, param: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[int, torch.Tensor]:
        """(version, a copy of ``param`` at ``version`` in ``dtype``), made once per version and dtype."""
        kept = self._copies.get(dtype)
        if kept is None or kept[0] != version:
            self._copies.pop(dtype, None)  # free the old copy before making the new one
            kept = self._copies[dtype] = (version, param.to(dtype, copy=True))
        return kept

    def encoded(self, version: int, param: torch.Tensor, encode: Callable[[torch.Tensor], list]) -> tuple[int, list]:
        """(version, encode(param)), encoded once per version; ``encode`` must copy what it needs."""
        if self._encoded is None or self._encoded[0] != version:
            self._encoded = None  # free the old encoding before making the new one
            self._encoded = (version, encode(param))
        return self._encoded
