"""The durable store on RocksDB (rocksdict) with its own journal.

Layout of a store directory:

    <path>/rocksdb/                  the RocksDB database (WAL unused)
    <path>/journal-<number>.log      the journal (journal.py), the write-ahead log

All state lives in RocksDB's default column family, one key prefix byte per
kind of state (data, log, meta, dirty, dedup, dedup age: _format.py), plus a
marker key holding the sequence number of the last write applied. One column
family, not one per kind: RocksDB's WAL is off (see journal.py for why), so a
memtable flush is the only thing that persists RocksDB state, and only a
single column family is flushed atomically by every flush (rocksdict exposes
no multi-family atomic flush). One family makes every batch whole on disk.

A write: one RocksDB WriteBatch with the WAL disabled (memtable only, visible
at once, microseconds) plus the marker, then the journal entry queued in
memory. A sync: the queued entries are appended to the journal with writev and
fdatasync'd (both release the GIL). When the journal file passes
`journal_size_bytes_max` it is rotated, and a checkpoint thread flushes the
memtable (which holds every write of the old file) and deletes the old file.

Recovery (`Store.open`): RocksDB comes back as of its last flush, a consistent
cut at the sequence number in the marker; every journal entry after it is
replayed in order, the result flushed, and the journal files deleted. A flush
may have persisted writes the journal never synced (never acknowledged, but
whole): those are kept, and the journal entries up to the marker skipped.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator

from rocksdict import (
    BlockBasedOptions,
    Cache,
    Options,
    Rdict,
    RdictIter,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from replicator.storage import _format as fmt
from replicator.storage import journal
from replicator.storage.base import BaseStore, Mutation, StoreOptions
from replicator.storage.errors import StorageFailed, WriteStalled
from replicator.storage.faults import FaultInjector

_PREFIXES = [bytes([0x10 + index]) for index in range(len(fmt.COLUMN_FAMILIES))]
_PREFIX_ENDS = [bytes([0x11 + index]) for index in range(len(fmt.COLUMN_FAMILIES))]
_SEQUENCE_MARKER_KEY = b"\x01sequence"
_SEQUENCE = struct.Struct(">Q")
ROCKSDB_DIRECTORY = "rocksdb"


def _rocksdb_options(options: StoreOptions) -> Options:
    rocks = Options(raw_mode=True)
    rocks.create_if_missing(options.create_if_missing)
    rocks.set_paranoid_checks(True)
    rocks.set_max_background_jobs(options.background_jobs_max)
    rocks.set_keep_log_file_num(4)
    rocks.set_write_buffer_size(options.write_buffer_size_bytes)
    rocks.set_max_write_buffer_number(options.write_buffers_max)
    # Slow writes down late: a stalled write is refused (no_slowdown) and retried, see write().
    rocks.set_level_zero_slowdown_writes_trigger(40)
    rocks.set_level_zero_stop_writes_trigger(64)
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)
    if options.block_cache_size_bytes > 0:
        table.set_block_cache(Cache(options.block_cache_size_bytes))
    rocks.set_block_based_table_factory(table)
    return rocks


class RocksEngine:
    """The engine of `Store`: RocksDB for the state, the journal for durability."""

    def __init__(self, path: str, options: StoreOptions) -> None:
        self._path = path
        self._options = options
        database_path = os.path.join(path, ROCKSDB_DIRECTORY)
        if not os.path.exists(os.path.join(database_path, "CURRENT")):
            if not options.create_if_missing:
                raise StorageFailed(f"no store at {path!r} and create_if_missing is off")
            os.makedirs(path, exist_ok=True)
        self._db: Rdict | None = Rdict(database_path, _rocksdb_options(options))
        self._writing = WriteOptions()
        # `disable_wal` is a property at run time; rocksdict's stub wrongly declares a method.
        setattr(self._writing, "disable_wal", True)  # noqa: B010
        self._writing.no_slowdown = True
        self._writing_blocking = WriteOptions()
        setattr(self._writing_blocking, "disable_wal", True)  # noqa: B010
        self._pending: list[bytes] = []
        self._pending_lock = threading.Lock()
        self._descriptor = -1
        self._journal_number = 0
        self._journal_size_bytes = 0
        self._checkpoint_wanted = threading.Condition()
        self._checkpoint_up_to: int | None = None  # delete journal files numbered up to this once flushed
        self._checkpoint_error: BaseException | None = None
        self._checkpoint_thread: threading.Thread | None = None
        self._stopping = False
        try:
            self.last_sequence = self._recover()
        except BaseException:
            self._db.close()
            self._db = None
            raise

    @property
    def db(self) -> Rdict:
        assert self._db is not None, "engine closed"
        return self._db

    # Recovery.

    def _recover(self) -> int:
        marker = self.db.get(_SEQUENCE_MARKER_KEY)
        applied = 0 if marker is None else _SEQUENCE.unpack(marker)[0]
        last = applied
        replayed = 0
        for sequence, mutations in journal.recover(self._path):
            if sequence <= applied:
                continue
            if sequence != last + 1:
                raise StorageFailed(
                    f"journal in {self._path!r} starts at {sequence} but the database holds writes up to {last}"
                )
            self._apply(mutations, sequence, blocking=True)
            last = sequence
            replayed += 1
        files = journal.list_files(self._path)
        if replayed:
            self.db.flush(True)
        for _, file_path in files:
            os.unlink(file_path)
        self._journal_number = files[-1][0] + 1 if files else 1
        self._open_journal()
        return last

    def _open_journal(self) -> None:
        path = os.path.join(self._path, journal.file_name(self._journal_number))
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._journal_size_bytes = 0
        journal.fsync_directory(self._path)

    # The engine interface.

    def get(self, column_family: int, key: bytes) -> bytes | None:
        stored: bytes | None = self.db.get(_PREFIXES[column_family] + key)
        return stored

    def get_many(self, column_family: int, keys: list[bytes]) -> list[bytes | None]:
        prefix = _PREFIXES[column_family]
        if len(keys) == 1:
            return [self.db.get(prefix + keys[0])]
        found: list[bytes | None] = self.db.get([prefix + key for key in keys])  # type: ignore[assignment]
        return found

    def _apply(self, mutations: list[Mutation], sequence: int, blocking: bool) -> None:
        """One RocksDB write, WAL off. A write RocksDB would stall (its flushes are behind) is refused
        at once (no_slowdown), because rocksdict would hold the GIL for the whole stall; `blocking`
        then retries it with a write that waits, else WriteStalled tells the caller to retry later."""
        try:
            self.db.write(self._batch(mutations, sequence), self._writing)
        except Exception as error:
            if "Incomplete" not in str(error):
                raise
            if not blocking:
                raise WriteStalled("RocksDB is stalling writes until its flushes catch up") from error
            # A WriteBatch is consumed by a write, even a refused one: build it again.
            self.db.write(self._batch(mutations, sequence), self._writing_blocking)

    @staticmethod
    def _batch(mutations: list[Mutation], sequence: int) -> WriteBatch:
        batch = WriteBatch(raw_mode=True)
        prefixes = _PREFIXES
        for column_family, key, stored in mutations:
            if stored is None:
                batch.delete(prefixes[column_family] + key)
            else:
                batch.put(prefixes[column_family] + key, stored)
        batch.put(_SEQUENCE_MARKER_KEY, _SEQUENCE.pack(sequence))
        return batch

    def write(self, mutations: list[Mutation], sequence: int, blocking: bool = True) -> None:
        if self._checkpoint_error is not None:
            raise StorageFailed(f"checkpoint failed: {self._checkpoint_error}", self._checkpoint_error)
        entry = journal.encode_entry_parts(sequence, mutations)
        self._apply(mutations, sequence, blocking)
        with self._pending_lock:
            self._pending.extend(entry)

    def sync(self) -> None:
        if self._checkpoint_error is not None:
            raise StorageFailed(f"checkpoint failed: {self._checkpoint_error}", self._checkpoint_error)
        with self._pending_lock:
            chunks = self._pending
            self._pending = []
        if chunks:
            self._journal_size_bytes += journal.write_all(self._descriptor, chunks)
        os.fdatasync(self._descriptor)
        if self._journal_size_bytes >= self._options.journal_size_bytes_max:
            self._rotate()

    def _rotate(self) -> None:
        """Start a new journal file; the checkpoint thread retires the old one once flushed."""
        old_descriptor = self._descriptor
        old_number = self._journal_number
        self._journal_number += 1
        self._open_journal()
        os.close(old_descriptor)
        with self._checkpoint_wanted:
            self._checkpoint_up_to = old_number
            if self._checkpoint_thread is None:
                self._checkpoint_thread = threading.Thread(
                    target=self._checkpoint_loop, name="storage-checkpoint", daemon=True
                )
                self._checkpoint_thread.start()
            self._checkpoint_wanted.notify()

    def _checkpoint_loop(self) -> None:
        while True:
            with self._checkpoint_wanted:
                while self._checkpoint_up_to is None and not self._stopping:
                    self._checkpoint_wanted.wait()
                if self._stopping:
                    return
                up_to = self._checkpoint_up_to
                self._checkpoint_up_to = None
            assert up_to is not None
            try:
                # Every write of the old files reached the memtable before its entry was queued.
                self.db.flush(True)
                for number, file_path in journal.list_files(self._path):
                    if number <= up_to:
                        os.unlink(file_path)
                journal.fsync_directory(self._path)
            except BaseException as error:  # noqa: BLE001 - reported by the next write or sync
                self._checkpoint_error = error
                return

    def _iterator(self, column_family: int, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, RdictIter]]:
        """Yield (key without prefix, iterator) for start <= key < end in the family, in order."""
        prefix = _PREFIXES[column_family]
        lower = prefix + start
        upper = _PREFIX_ENDS[column_family] if end is None else prefix + end
        read_options = ReadOptions()
        read_options.set_iterate_lower_bound(lower)
        read_options.set_iterate_upper_bound(upper)
        # An iterator from `iter()` sees the data as of its creation (a snapshot's iter() does not,
        # in rocksdict 0.3.29), so it is created here, eagerly, not when the generator first runs.
        iterator = self.db.iter(read_options)
        iterator.seek(lower)

        def entries() -> Iterator[tuple[bytes, RdictIter]]:
            # The read options stay referenced while the iterator lives: rocksdict's iterator may point
            # at their bounds. The bound is also checked here, which costs one comparison per key.
            assert read_options is not None
            while iterator.valid():
                key = iterator.key()
                if key >= upper:
                    return
                yield key[1:], iterator
                iterator.next()

        return entries()

    def items(self, column_family: int, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        return ((key, iterator.value()) for key, iterator in self._iterator(column_family, start, end))

    def keys(self, column_family: int, start: bytes, end: bytes | None) -> Iterator[bytes]:
        return (key for key, _ in self._iterator(column_family, start, end))

    def close(self, clean: bool = True) -> None:
        if self._db is None:
            return
        with self._checkpoint_wanted:
            self._stopping = True
            self._checkpoint_wanted.notify()
        if self._checkpoint_thread is not None:
            self._checkpoint_thread.join()
        try:
            if clean and self._checkpoint_error is None:
                # Flush the memtable (every write so far), then the journal is no longer needed.
                self._db.flush(True)
                os.close(self._descriptor)
                self._descriptor = -1
                for _, file_path in journal.list_files(self._path):
                    os.unlink(file_path)
                journal.fsync_directory(self._path)
        finally:
            if self._descriptor >= 0:
                os.close(self._descriptor)
                self._descriptor = -1
            self._db.close()
            self._db = None


class Store(BaseStore):
    """The durable store. `Store.open(path, options)`; see BaseStore for the interface."""

    def __init__(self, engine: RocksEngine, path: str, options: StoreOptions, faults: FaultInjector | None) -> None:
        super().__init__(engine, options, faults)
        self.path = path
        self._rocks = engine

    @classmethod
    def open(cls, path: str | os.PathLike[str], options: StoreOptions | None = None) -> Store:
        options = options or StoreOptions()
        faults = options.fault_injector or FaultInjector.from_environment()
        path = os.fspath(path)
        try:
            engine = RocksEngine(path, options)
        except StorageFailed:
            raise
        except Exception as error:
            raise StorageFailed(f"cannot open the store at {path!r}: {error}", error) from error
        return cls(engine, path, options, faults)

    @property
    def db(self) -> Rdict:
        """The raw rocksdict handle, for tests and benchmarks only."""
        return self._rocks.db
