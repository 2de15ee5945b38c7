"""Hybrid logical clock: timestamps that order writes across both sites.

A timestamp is one integer: `(wall_ms << 22) | (counter << 1) | origin_bit`.
The origin bit breaks ties between the two sites (DESIGN.md section 3), the
counter orders events within one millisecond, and the wall part keeps
timestamps close to real time so that dedup ages and metrics make sense.

A new timestamp is greater than every timestamp this site has issued or
observed (records received from the peer, the clock high-water recovered from
disk). That is what makes last-writer-wins agree with real time for writes
that do not overlap: a write acknowledged at one site was prepared at the
other first, so the other site observed its ts before it can start a later
write.
"""

from __future__ import annotations

WALL_SHIFT = 22
COUNTER_MASK = (1 << (WALL_SHIFT - 1)) - 1


def wall_ms_of(ts: int) -> int:
    return ts >> WALL_SHIFT


class HybridLogicalClock:
    def __init__(self, origin_bit: int, high_water: int = 0) -> None:
        assert origin_bit in (0, 1)
        self.origin_bit = origin_bit
        self.high_water = high_water

    def observe(self, ts: int) -> None:
        if ts > self.high_water:
            self.high_water = ts

    def next(self, wall_ms: int) -> int:
        candidate = (max(wall_ms, 0) << WALL_SHIFT) | self.origin_bit
        if candidate <= self.high_water:
            # Same or earlier millisecond than something already seen: step
            # the counter above the high-water and put our origin bit in.
            candidate = (((self.high_water >> 1) + 1) << 1) | self.origin_bit
        self.high_water = candidate
        return candidate
