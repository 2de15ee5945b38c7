"""Typed storage errors.

`StorageFailed` is the fail-stop error: the store hit an operating error it
cannot recover from in this process (an fsync that failed, a full disk, an
I/O error from RocksDB). Once raised, the store refuses every further read,
write and sync; only `close()` works. Nothing acknowledged before the failure
is lost, and nothing written after the last good sync was ever reported as
durable. The process is expected to stop and be restarted (PostgreSQL learned
that retrying a failed fsync silently loses data).

`CorruptValue` is a detected checksum mismatch of one stored entry. It is not
fail-stop: the daemon answers it with read-repair from the peer.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error the storage layer raises on purpose."""


class StorageFailed(StorageError):
    """The store is fail-stopped; `cause` names the first failure."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class CorruptValue(StorageError):
    """The stored bytes of `key` in `column_family` do not match their CRC32C."""

    def __init__(self, key: bytes, column_family: str = "data", detail: str = "checksum mismatch") -> None:
        super().__init__(f"corrupt value in column family {column_family!r} at key {key!r}: {detail}")
        self.key = key
        self.column_family = column_family
        self.detail = detail


class WriteStalled(StorageError):
    """RocksDB is stalling writes (its memtable flushes are behind); nothing was written. Retry later.
    Only raised by `write(batch, blocking=False)`, which the group committer uses."""
