"""A simulated disk under the real store: `BaseStore` on `MemoryEngine`.

The store's own rules run (last-writer-wins on ts, the dedup bound, checksums,
sequence numbers, fail-stop); the engine holds what was written (visible at
once) apart from what was synced. `crash()` loses every write not synced, as
a power loss after the last fsync does, and reopens the store as a new
process would. Faults: `full` (every write and sync fails with ENOSPC) and
`fail_next_sync` (the next sync fails with EIO); either fail-stops the store
until the next crash, as on a real site.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from replicator.driver import decode_meta
from replicator.storage import _format as fmt
from replicator.storage.base import BaseStore, StoreOptions
from replicator.storage.faults import FaultInjector
from replicator.storage.memory import MemoryEngine


class SimFaults(FaultInjector):
    """The simulator's storage faults: set by the world, no control file, no sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.fail_next_sync = False

    def check_write(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "simulated fault: no space left on device")

    def check_sync(self) -> None:
        if self.fail_next_sync:
            self.fail_next_sync = False
            raise OSError(errno.EIO, "simulated fault: fsync failed")
        if self.full:
            raise OSError(errno.ENOSPC, "simulated fault: no space left on device")

    @property
    def is_disk_full(self) -> bool:
        return self.full


@dataclass(frozen=True)
class DiskImage:
    """A copy of what a disk holds durably (an operator's backup, restored later)."""

    families: tuple[dict[bytes, bytes], ...]

    def meta(self, name: str) -> int | bytes | str | None:
        stored = self.families[fmt.META].get(fmt.meta_key(name))
        if stored is None:
            return None
        payload = fmt.unframe(fmt.meta_key(name), stored)
        return None if payload is None else decode_meta(payload)


class SimDisk:
    def __init__(self, dedup_entries_max: int | None = None) -> None:
        self.faults = SimFaults()
        bound = StoreOptions().dedup_entries_max if dedup_entries_max is None else dedup_entries_max
        self.options = StoreOptions(dedup_entries_max=bound, fault_injector=self.faults)
        self.engine = MemoryEngine()
        self.store = BaseStore(self.engine, self.options, self.faults)

    # ---------------------------------------------------------- faults
    @property
    def full(self) -> bool:
        return self.faults.full

    @full.setter
    def full(self, full: bool) -> None:
        self.faults.full = full

    @property
    def fail_next_sync(self) -> bool:
        return self.faults.fail_next_sync

    @fail_next_sync.setter
    def fail_next_sync(self, fail: bool) -> None:
        self.faults.fail_next_sync = fail

    # ---------------------------------------------------------- life cycle
    def sync(self) -> int:
        """Sync the store; its durable sequence. Raises StorageFailed when the sync fails."""
        return self.store.sync()

    def crash(self) -> None:
        """A power loss: what was not synced is gone; the store reopens (its fail-stop cleared)."""
        self.engine.crash()
        self.store = BaseStore(self.engine, self.options, self.faults)

    def wipe(self) -> None:
        self.engine = MemoryEngine()
        self.store = BaseStore(self.engine, self.options, self.faults)

    def image(self) -> DiskImage:
        return DiskImage(tuple(dict(family) for family in self.engine.durable))

    def restore(self, image: DiskImage) -> None:
        """Replace the disk by `image` (the process must be stopped: the store reopens)."""
        engine = MemoryEngine()
        engine.durable = [dict(family) for family in image.families]
        engine.crash()
        self.engine = engine
        self.store = BaseStore(engine, self.options, self.faults)

    # ---------------------------------------------------------- reading (checkers, scripts)
    def data(self) -> dict[bytes, tuple[int, bytes | None]]:
        """The visible data, key -> (ts, value or None for a tombstone), read under the store."""
        out: dict[bytes, tuple[int, bytes | None]] = {}
        for key, stored in self.engine.families[fmt.DATA].entries.items():
            decoded = fmt.decode_value(key, stored)
            assert decoded is not None, f"simulated disk: corrupt value of {key!r}"
            out[key] = decoded
        return out

    def value(self, key: bytes) -> bytes | None:
        stored = self.engine.families[fmt.DATA].entries.get(key)
        if stored is None:
            return None
        decoded = fmt.decode_value(key, stored)
        assert decoded is not None, f"simulated disk: corrupt value of {key!r}"
        return decoded[1]
