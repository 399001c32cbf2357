"""The shard plan: cut the flat vector [0, numel) into contiguous ranges, one per shard.

A pure function of (numel, num_shards, align), as ps-lite's key ranges are: every
worker and server computes the same plan from the same numbers. Ranges are
half-open [start, stop); every boundary but the last is a multiple of ``align``
(64 elements by default, a cache line of fp32 times four), and sizes differ by at
most ``align`` elements. When numel has fewer aligned blocks than there are
shards, the first shards are empty.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

DEFAULT_ALIGN = 64


@dataclass(frozen=True)
class ShardRange:
    """Elements [start, stop) of the flat vector, owned by shard ``shard_id``."""

    shard_id: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def plan_shards(numel: int, num_shards: int, align: int = DEFAULT_ALIGN) -> list[ShardRange]:
    """Split [0, numel) into ``num_shards`` contiguous ranges of near-equal size.

    >>> [(r.start, r.stop) for r in plan_shards(300, 2, align=64)]
    [(0, 128), (128, 300)]
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    blocks = -(-numel // align)  # ceil: number of aligned blocks
    base, extra = divmod(blocks, num_shards)
    ranges, block = [], 0
    for shard_id in range(num_shards):
        # The extra blocks go to the last shards, so the final (possibly partial) block
        # lands on a bigger shard and sizes stay within `align` of each other.
        n_blocks = base + (1 if shard_id >= num_shards - extra else 0)
        start = min(block * align, numel)
        block += n_blocks
        stop = min(block * align, numel)
        ranges.append(ShardRange(shard_id, start, stop))
    return ranges


def owner_of(ranges: list[ShardRange], index: int) -> ShardRange:
    """The range that owns flat element ``index``."""
    if not ranges or not 0 <= index < ranges[-1].stop:
        raise IndexError(f"element {index} is outside [0, {ranges[-1].stop if ranges else 0})")
    starts = [r.start for r in ranges]
    i = bisect.bisect_right(starts, index) - 1
    while ranges[i].numel == 0 or index >= ranges[i].stop:  # skip empty shards sharing a start
        i += 1
    return ranges[i]


MIN_PART_NUMEL = 1 << 17  # 512 KiB of fp32: a smaller part costs more in frames and waits than it overlaps


def part_stops(boundaries: list[int], numel: int, parts: int, min_numel: int = MIN_PART_NUMEL) -> list[int]:
    """Where a slice of ``numel`` elements is cut into at most ``parts`` contiguous parts of near-equal
    size for a push in parts (``LinkTransfer.parts``): the end offset of each part, the last one
    ``numel``. Cuts fall only on ``boundaries`` (offsets in the slice where one parameter's piece
    ends and the next begins), so a part's optimizer step covers whole pieces; a part is at least
    ``min_numel`` elements. Returns [numel] (one part: the push goes whole) when no cut is worth it.

    >>> part_stops([100, 200, 300], 400, 2, min_numel=1)
    [200, 400]
    """
    if parts <= 1 or numel < 2 * min_numel:
        return [numel]
    stops: list[int] = []
    cuts = sorted(b for b in boundaries if 0 < b < numel)
    for k in range(1, parts):
        target = numel * k // parts
        i = bisect.bisect_left(cuts, target)
        near = cuts[max(0, i - 1):i + 1]
        if not near:
            continue
        cut = min(near, key=lambda c: abs(c - target))
        last = stops[-1] if stops else 0
        if cut - last >= min_numel and numel - cut >= min_numel:
            stops.append(cut)
    return sorted(set(stops)) + [numel]


def part_bounds(stops: list[int]) -> list[tuple[int, int]]:
    """Each part's [lo, hi) in the slice, from ``part_stops``' end offsets.

    >>> part_bounds([200, 400])
    [(0, 200), (200, 400)]
    """
    return list(zip([0, *stops[:-1]], stops))
