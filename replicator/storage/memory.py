"""The in-memory test double of `Store`, for the deterministic simulator and unit tests.

It runs the same store logic (BaseStore) on an engine made of dicts, and
models the disk: writes are visible at once, `sync` makes them durable, and
`crash()` drops everything written but not synced, as a power loss after the
last fsync would. The same fault hooks (FaultInjector) apply.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from replicator.storage import _format as fmt
from replicator.storage.base import BaseStore, Mutation, StoreOptions


class _Family:
    """One column family: a dict and its keys kept sorted for ordered scans."""

    __slots__ = ("entries", "sorted_keys")

    def __init__(self, entries: dict[bytes, bytes] | None = None) -> None:
        self.entries: dict[bytes, bytes] = dict(entries or {})
        self.sorted_keys: list[bytes] = sorted(self.entries)

    def put(self, key: bytes, stored: bytes) -> None:
        if key not in self.entries:
            bisect.insort(self.sorted_keys, key)
        self.entries[key] = stored

    def delete(self, key: bytes) -> None:
        if self.entries.pop(key, None) is not None:
            del self.sorted_keys[bisect.bisect_left(self.sorted_keys, key)]

    def range_keys(self, start: bytes, end: bytes | None) -> list[bytes]:
        low = bisect.bisect_left(self.sorted_keys, start)
        high = len(self.sorted_keys) if end is None else bisect.bisect_left(self.sorted_keys, end)
        return self.sorted_keys[low:high]


class MemoryEngine:
    def __init__(self) -> None:
        self.families = [_Family() for _ in fmt.COLUMN_FAMILIES]
        self.durable: list[dict[bytes, bytes]] = [{} for _ in fmt.COLUMN_FAMILIES]
        self.unsynced: list[list[Mutation]] = []
        self.last_sequence = 0
        self.written_sequence = 0
        self.durable_sequence = 0

    def get(self, column_family: int, key: bytes) -> bytes | None:
        return self.families[column_family].entries.get(key)

    def get_many(self, column_family: int, keys: list[bytes]) -> list[bytes | None]:
        entries = self.families[column_family].entries
        return [entries.get(key) for key in keys]

    def write(self, mutations: list[Mutation], sequence: int, blocking: bool = True) -> None:
        families = self.families
        for column_family, key, stored in mutations:
            if stored is None:
                families[column_family].delete(key)
            else:
                families[column_family].put(key, stored)
        self.unsynced.append(mutations)
        self.written_sequence = sequence

    def sync(self) -> None:
        self.durable_sequence = self.written_sequence
        for mutations in self.unsynced:
            for column_family, key, stored in mutations:
                if stored is None:
                    self.durable[column_family].pop(key, None)
                else:
                    self.durable[column_family][key] = stored
        self.unsynced = []

    def items(self, column_family: int, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        family = self.families[column_family]
        # Materialised now: the view is as of the call, like a RocksDB iterator.
        snapshot = [(key, family.entries[key]) for key in family.range_keys(start, end)]
        return iter(snapshot)

    def keys(self, column_family: int, start: bytes, end: bytes | None) -> Iterator[bytes]:
        return iter(self.families[column_family].range_keys(start, end))

    def crash(self) -> None:
        self.unsynced = []
        self.families = [_Family(entries) for entries in self.durable]
        self.last_sequence = self.durable_sequence

    def close(self, clean: bool = True) -> None:
        pass


class MemoryStore(BaseStore):
    """Same interface as Store, in memory. `crash()` simulates a power loss and a restart."""

    def __init__(self, options: StoreOptions | None = None) -> None:
        options = options or StoreOptions()
        self._memory = MemoryEngine()
        super().__init__(self._memory, options, options.fault_injector)

    def crash(self) -> None:
        """Drop every write not synced, and reopen: the fail-stop state and the sequence numbers are
        reset as in a new process. The fault injector keeps its settings (a full disk stays full)."""
        with self._write_lock, self._sync_lock:
            self._memory.crash()
            BaseStore.__init__(self, self._memory, self._options, self._faults)

    @property
    def unsynced_write_count(self) -> int:
        return len(self._memory.unsynced)
