"""The dedup table: which request ids committed, and at which ts.

A client's retry of a request id that committed is answered from here. The
table is bounded twice, as the store is (storage/base.py): by age (entries
older than `dedup_age_ms` go, once the table holds more than
`PRUNE_BY_AGE_ABOVE_ENTRIES`) and by count (`dedup_entries_max`: the oldest
go first). A min-heap of (ts, request id) finds the old ones without a scan;
an entry set again (to another ts) leaves a stale heap item, skipped when
popped, and the heap is rebuilt when the stale items outnumber the live ones.
"""

from __future__ import annotations

import heapq

from replicator.core.errors import invariant
from replicator.core.hlc import wall_ms_of

# Below this many entries, age pruning is not worth its time (the count bound still holds).
PRUNE_BY_AGE_ABOVE_ENTRIES = 1024
# The heap is rebuilt once it holds this many more items than twice the live entries.
HEAP_SLACK_ENTRIES = 1024


class DedupTable:
    def __init__(self, entries: dict[bytes, int], age_ms: int, entries_max: int) -> None:
        self.entries: dict[bytes, int] = dict(entries)
        self.age_ms = age_ms
        self.entries_max = entries_max
        self.expiry: list[tuple[int, bytes]] = [(ts, r) for r, ts in self.entries.items()]
        heapq.heapify(self.expiry)
        self._evict_over_count()

    def __contains__(self, request_id: bytes) -> bool:
        return request_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, request_id: bytes) -> int | None:
        return self.entries.get(request_id)

    def put(self, request_id: bytes, ts: int) -> None:
        self.entries[request_id] = ts
        heapq.heappush(self.expiry, (ts, request_id))
        self._evict_over_count()

    def prune(self, wall_ms: int) -> None:
        """Forget entries older than the age bound; rebuild the heap when it is mostly stale."""
        entries = len(self.entries)
        if entries <= PRUNE_BY_AGE_ABOVE_ENTRIES and len(self.expiry) <= 2 * entries + HEAP_SLACK_ENTRIES:
            return  # the common case, at every step: nothing to do
        if entries > PRUNE_BY_AGE_ABOVE_ENTRIES:
            horizon = wall_ms - self.age_ms
            while self.expiry and wall_ms_of(self.expiry[0][0]) < horizon:
                self._pop_oldest()
        if len(self.expiry) > 2 * len(self.entries) + HEAP_SLACK_ENTRIES:
            self.expiry = [(ts, r) for r, ts in self.entries.items()]
            heapq.heapify(self.expiry)
        invariant(len(self.entries) <= self.entries_max, "the dedup table outgrew dedup_entries_max")
        invariant(len(self.expiry) >= len(self.entries), "a dedup entry without its expiry")

    def sorted_items(self) -> list[tuple[bytes, int]]:
        return sorted(self.entries.items())

    def _pop_oldest(self) -> None:
        ts, request_id = heapq.heappop(self.expiry)
        if self.entries.get(request_id) == ts:
            del self.entries[request_id]

    def _evict_over_count(self) -> None:
        while len(self.entries) > self.entries_max:
            self._pop_oldest()
