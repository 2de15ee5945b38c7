"""Fault injection hooks for fsync failures and a full disk.

A `FaultInjector` is handed to a store through `StoreOptions.fault_injector`.
Tests call its methods directly; the chaos suite, which runs real daemons,
drives it through a control file instead: set `REPLICATOR_STORAGE_FAULTS` to a
path (or pass `control_path`), and the store polls that file before every sync.
The file holds whitespace-separated words:

- `fail_next_sync`: the next sync fails, once per modification of the file
  (rewrite the file, or touch it, to arm it again);
- `disk_full`: every write and sync fails with ENOSPC while the word is there;
- `slow_sync_ms=N`: every sync first waits N milliseconds (a slow or overloaded
  disk; 0 < N <= 10000), so writes stay unsynced that long.

Both faults make the store fail-stop (`StorageFailed`), as a real EIO from
fsync or ENOSPC from the WAL would.
"""

from __future__ import annotations

import errno
import os
import threading
import time

CONTROL_ENVIRONMENT_VARIABLE = "REPLICATOR_STORAGE_FAULTS"
SLOW_SYNC_MS_MAX = 10_000


class FaultInjector:
    def __init__(self, control_path: str | os.PathLike[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._sync_failures_armed = 0
        self._disk_full = False
        self._disk_full_from_file = False
        self._control_path = os.fspath(control_path) if control_path is not None else None
        self._control_stamp: tuple[int, int] | None = None
        self.slow_sync_ms = 0

    @classmethod
    def from_environment(cls) -> FaultInjector | None:
        """An injector polling the file named by REPLICATOR_STORAGE_FAULTS, or None when unset."""
        path = os.environ.get(CONTROL_ENVIRONMENT_VARIABLE, "")
        return cls(control_path=path) if path else None

    def fail_next_sync(self, count: int = 1) -> None:
        """Make the next `count` syncs fail with EIO."""
        assert count >= 1
        with self._lock:
            self._sync_failures_armed += count

    def disk_full(self, full: bool) -> None:
        """While full, every write and sync fails with ENOSPC."""
        with self._lock:
            self._disk_full = full

    @property
    def is_disk_full(self) -> bool:
        return self._disk_full or self._disk_full_from_file

    def check_write(self) -> None:
        """Raise the OSError a write would meet now, if any. Cheap: no file access."""
        if self._disk_full or self._disk_full_from_file:
            raise OSError(errno.ENOSPC, "injected fault: no space left on device")

    def check_sync(self) -> None:
        """Poll the control file, wait if syncs are slow, then raise the OSError a sync would meet now, if any."""
        self.poll()
        if self.slow_sync_ms:
            time.sleep(self.slow_sync_ms / 1000)
        with self._lock:
            if self._sync_failures_armed > 0:
                self._sync_failures_armed -= 1
                raise OSError(errno.EIO, "injected fault: fsync failed")
        if self._disk_full or self._disk_full_from_file:
            raise OSError(errno.ENOSPC, "injected fault: no space left on device")

    def poll(self) -> None:
        """Read the control file when it changed since the last poll."""
        if self._control_path is None:
            return
        try:
            status = os.stat(self._control_path)
        except FileNotFoundError:
            self._disk_full_from_file = False
            self.slow_sync_ms = 0
            self._control_stamp = None
            return
        stamp = (status.st_mtime_ns, status.st_size)
        if stamp == self._control_stamp:
            return
        self._control_stamp = stamp
        try:
            with open(self._control_path, encoding="utf-8") as control:
                words = set(control.read().split())
        except FileNotFoundError:
            words = set()
        self._disk_full_from_file = "disk_full" in words
        self.slow_sync_ms = _slow_sync_ms(words)
        if "fail_next_sync" in words:
            with self._lock:
                self._sync_failures_armed += 1


def _slow_sync_ms(words: set[str]) -> int:
    for word in words:
        name, _, value = word.partition("=")
        if name == "slow_sync_ms" and value.isdigit() and 0 < int(value) <= SLOW_SYNC_MS_MAX:
            return int(value)
    return 0
