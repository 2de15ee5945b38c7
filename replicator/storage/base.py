"""The store's logic, above a minimal key-value engine.

`BaseStore` holds everything the core and the daemon rely on: batches
resolved against the current state (last-writer-wins, the dedup age index and
its bound), checksums checked on every read, sequence numbers for
durability, fail-stop on operating errors, recovery (`load`) and the range
digests of verify. It runs on an `Engine`: `RocksEngine` (rocks.py) for the
real store, `MemoryEngine` (memory.py) for the deterministic simulator. Both
stores therefore share every rule, and the contract tests run on both.

Sequence numbers: `write` returns the number of the write (1, 2, ... per open
store); `sync` makes every write made before it durable and advances
`durable_sequence`. A write with nothing to change (every `apply` lost to a
newer ts) returns the current number without writing.

Thread safety: writes are serialised by a lock; `sync` may run in another
thread (the group committer's syncing thread) beside writes and reads.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from replicator.core.records import RecordId, Versioned
from replicator.storage import _format as fmt
from replicator.storage.batch import APPLY, DELETE_DEDUP, MUTATION, PUT_DEDUP, Batch, Operation
from replicator.storage.errors import CorruptValue, StorageFailed, WriteStalled
from replicator.storage.faults import FaultInjector

Mutation = tuple[int, bytes, bytes | None]  # (column family, key, stored bytes or None to delete)

DIGEST_SIZE_BYTES = 16
_DIGEST_MODULUS = 1 << (8 * DIGEST_SIZE_BYTES)
PRUNE_CHUNK_ENTRIES = 10_000
SCAN_LIMIT_MAX = 1_000_000
SPLIT_SAMPLE_KEYS_MAX = 4096


class Engine(Protocol):
    """An ordered key-value store with column families (indexes into fmt.COLUMN_FAMILIES)."""

    def get(self, column_family: int, key: bytes) -> bytes | None: ...

    def get_many(self, column_family: int, keys: list[bytes]) -> list[bytes | None]: ...

    last_sequence: int  # the sequence number of the last write recovered at open

    def write(self, mutations: list[Mutation], sequence: int, blocking: bool = True) -> None:
        """Apply all mutations atomically as write number `sequence`, visible at once, not yet durable.
        With blocking False, may raise WriteStalled (nothing written) instead of waiting."""

    def sync(self) -> None:
        """Make every completed write durable."""

    def items(self, column_family: int, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """Entries with start <= key < end in key order, as of the call (later writes unseen)."""

    def keys(self, column_family: int, start: bytes, end: bytes | None) -> Iterator[bytes]: ...

    def close(self, clean: bool = True) -> None: ...


@dataclass(frozen=True, slots=True)
class DedupEntry:
    outcome: bytes
    time_ms: int


@dataclass(slots=True)
class Recovered:
    """Everything a site needs after a restart."""

    meta: dict[str, bytes] = field(default_factory=dict)
    log: dict[RecordId, bytes] = field(default_factory=dict)  # in RecordId order
    dirty: set[bytes] = field(default_factory=set)
    dedup: dict[bytes, DedupEntry] = field(default_factory=dict)
    resync_position: bytes | None = None


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Options of a store; validated when built (a bad value raises ValueError naming the key)."""

    create_if_missing: bool = True
    dedup_entries_max: int = 1_000_000
    write_buffer_size_bytes: int = 64 << 20
    write_buffers_max: int = 6
    background_jobs_max: int = 4
    block_cache_size_bytes: int = 128 << 20
    journal_size_bytes_max: int = 128 << 20
    # None: use FaultInjector.from_environment() (REPLICATOR_STORAGE_FAULTS), usually no injector.
    fault_injector: FaultInjector | None = None

    def __post_init__(self) -> None:
        limits = {
            "dedup_entries_max": (1, 1 << 40),
            "write_buffer_size_bytes": (1 << 16, 1 << 34),
            "write_buffers_max": (2, 64),
            "background_jobs_max": (1, 256),
            "block_cache_size_bytes": (0, 1 << 40),
            "journal_size_bytes_max": (1 << 16, 1 << 40),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"storage option {name}={value!r}: must be an integer in [{low}, {high}]")
        if self.fault_injector is not None and not isinstance(self.fault_injector, FaultInjector):
            raise ValueError(f"storage option fault_injector={self.fault_injector!r}: must be a FaultInjector")


def _entry_hash(key: bytes, stored: bytes) -> int:
    """The digest contribution of one stored entry: its key, ts, flags and CRC (not the value bytes,
    which the CRC stands for). An entry whose bytes fail their check hashes to a value no healthy
    entry has, so verify narrows down to it and the read that follows reports the corruption."""
    if fmt.decode_value(key, stored) is None:
        material = b"corrupt\x00" + key
    else:
        material = len(key).to_bytes(4, "big") + key + stored[: fmt.VALUE_HEADER_SIZE]
    return int.from_bytes(hashlib.blake2b(material, digest_size=DIGEST_SIZE_BYTES).digest(), "big")


class BaseStore:
    """See the module docstring. Use `Store.open` or `MemoryStore()`."""

    def __init__(self, engine: Engine, options: StoreOptions, fault_injector: FaultInjector | None) -> None:
        self._engine = engine
        self._options = options
        self._faults = fault_injector
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        # Sequence numbers go on from the last write recovered, so they never repeat for a store.
        self._written_sequence = engine.last_sequence
        self._durable_sequence = engine.last_sequence
        self._failure: StorageFailed | None = None
        self._closed = False
        self._dedup_count = sum(1 for _ in engine.keys(fmt.DEDUP, b"", None))
        # Lower bound for the eviction scan of the age index, so that evicting one entry per write
        # does not walk over the deletions left at the head of the index by earlier evictions.
        self._dedup_age_floor = b""

    # Life cycle and state.

    @property
    def options(self) -> StoreOptions:
        return self._options

    @property
    def fault_injector(self) -> FaultInjector | None:
        return self._faults

    @property
    def written_sequence(self) -> int:
        """The number of the last write (visible, maybe not durable)."""
        return self._written_sequence

    @property
    def durable_sequence(self) -> int:
        """Every write numbered up to this is durable."""
        return self._durable_sequence

    @property
    def failure(self) -> StorageFailed | None:
        """The fail-stop error, once the store has failed."""
        return self._failure

    @property
    def dedup_entry_count(self) -> int:
        return self._dedup_count

    def batch(self) -> Batch:
        return Batch()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.close(clean=self._failure is None)

    def __enter__(self) -> BaseStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise StorageFailed(str(self._failure), self._failure.cause) from self._failure.cause
        if self._closed:
            raise StorageFailed("the store is closed")

    def _fail(self, stage: str, error: BaseException) -> StorageFailed:
        """Enter the fail-stop state (once) and return the error to raise."""
        if self._failure is None:
            self._failure = StorageFailed(
                f"storage failed during {stage}: {error}; the store is fail-stopped and refuses all further "
                "operations (restart the process)",
                error,
            )
        return StorageFailed(str(self._failure), self._failure.cause)

    # Writing.

    def write(self, batch: Batch, *, blocking: bool = True) -> int:
        """Write `batch` atomically and unsynced (visible to reads at once); return its sequence number.

        With blocking False, raises WriteStalled instead of waiting when RocksDB stalls writes (the
        batch is then not written and may be passed to write again)."""
        assert not batch.written, "a batch is written at most once"
        with self._write_lock:
            self._check_usable()
            if self._faults is not None:
                try:
                    self._faults.check_write()
                except OSError as error:
                    raise self._fail("write", error) from error
            mutations, dedup_delta = self._resolve(batch.operations)
            sequence = self._write_mutations(mutations, dedup_delta, blocking)
            batch.written = True
            return sequence

    def _write_mutations(self, mutations: list[Mutation], dedup_delta: int, blocking: bool = True) -> int:
        """Under the write lock: hand the mutations to the engine, count the write."""
        if not mutations:
            return self._written_sequence
        try:
            self._engine.write(mutations, self._written_sequence + 1, blocking)
        except WriteStalled:
            raise
        except Exception as error:  # any other engine error leaves the disk state unknown: fail-stop
            raise self._fail("write", error) from error
        self._dedup_count += dedup_delta
        self._written_sequence += 1
        return self._written_sequence

    def sync(self) -> int:
        """Make every write so far durable (blocking); return the durable sequence number."""
        self._check_usable()
        with self._sync_lock:
            self._check_usable()
            target = self._written_sequence
            if target <= self._durable_sequence:
                return self._durable_sequence
            try:
                if self._faults is not None:
                    self._faults.check_sync()
                self._engine.sync()
            except Exception as error:  # fsync failure is not retryable
                raise self._fail("sync", error) from error
            self._durable_sequence = target
            return target

    def _resolve(self, operations: list[Operation]) -> tuple[list[Mutation], int]:
        """Turn a batch's operations into engine mutations (under the write lock)."""
        engine = self._engine
        mutations: list[Mutation] = []
        apply_keys = [operation[1] for operation in operations if operation[0] == APPLY]
        # The ts an apply must beat: -1 when absent, or when the stored bytes are corrupt (so that a
        # correct copy from the peer, read-repair, replaces them). The ts is read from the header
        # unchecked; the value's CRC is checked only for an apply that would lose to it: one that
        # beats it wins whether the old bytes are whole or not (the same decisions as checking every
        # value first, without a CRC pass over each overwritten value: 256 of 4 KiB per 1 MiB block write).
        current_ts: dict[bytes, int] = {}
        unchecked: dict[bytes, bytes] = {}  # key -> stored bytes whose ts is in current_ts unchecked
        if apply_keys:
            unique_keys = list(dict.fromkeys(apply_keys))
            for key, stored in zip(unique_keys, engine.get_many(fmt.DATA, unique_keys), strict=True):
                ts = None if stored is None else fmt.value_ts_unchecked(stored)
                if stored is None or ts is None:
                    current_ts[key] = -1  # absent, or not even a header
                else:
                    current_ts[key] = ts
                    unchecked[key] = stored
        dedup_times: dict[bytes, int | None] = {}  # request id -> time_ms of its entry after this batch
        # The entries' times before this batch, read in one call (a turn's commits put many).
        dedup_ids = [operation[1] for operation in operations if operation[0] in (PUT_DEDUP, DELETE_DEDUP)]
        if dedup_ids:
            unique_ids = list(dict.fromkeys(dedup_ids))
            for request_id, stored in zip(unique_ids, engine.get_many(fmt.DEDUP, unique_ids), strict=True):
                # A corrupt entry's time may be wrong: its age entry then dangles, and pruning removes it.
                dedup_times[request_id] = None if stored is None else fmt.dedup_time_unchecked(stored)
        dedup_delta = 0
        for operation in operations:
            kind = operation[0]
            if kind == MUTATION:
                mutations.append((operation[1], operation[2], operation[3]))
            elif kind == APPLY:
                _, key, ts, stored = operation
                if ts <= current_ts[key] and key in unchecked and fmt.decode_value(key, unchecked.pop(key)) is None:
                    current_ts[key] = -1  # corrupt: any copy replaces it
                if ts > current_ts[key]:
                    mutations.append((fmt.DATA, key, stored))
                    current_ts[key] = ts
                    unchecked.pop(key, None)
            elif kind == PUT_DEDUP:
                _, request_id, time_ms, stored = operation
                previous = dedup_times[request_id]
                if previous is None:
                    dedup_delta += 1
                else:
                    mutations.append((fmt.DEDUP_AGE, fmt.dedup_age_key(previous, request_id), None))
                age_key = fmt.dedup_age_key(time_ms, request_id)
                mutations.append((fmt.DEDUP, request_id, stored))
                mutations.append((fmt.DEDUP_AGE, age_key, b""))
                dedup_times[request_id] = time_ms
                if age_key < self._dedup_age_floor:
                    self._dedup_age_floor = b""
            else:
                assert kind == DELETE_DEDUP, f"unknown batch operation {kind!r}"
                request_id = operation[1]
                previous = dedup_times[request_id]
                if previous is not None:
                    dedup_delta -= 1
                    mutations.append((fmt.DEDUP, request_id, None))
                    mutations.append((fmt.DEDUP_AGE, fmt.dedup_age_key(previous, request_id), None))
                dedup_times[request_id] = None
        excess = self._dedup_count + dedup_delta - self._options.dedup_entries_max
        if excess > 0:
            dedup_delta -= self._evict_oldest_dedup(excess, dedup_times, mutations)
        return mutations, dedup_delta

    def _evict_oldest_dedup(self, excess: int, touched: dict[bytes, int | None], mutations: list[Mutation]) -> int:
        """Add deletions of the `excess` oldest dedup entries not touched by this batch; return how many."""
        evicted = 0
        for floor in (self._dedup_age_floor, b""):
            for age_key in self._engine.keys(fmt.DEDUP_AGE, floor, None):
                time_ms, request_id = fmt.decode_dedup_age_key(age_key)
                if request_id in touched:
                    continue
                mutations.append((fmt.DEDUP_AGE, age_key, None))
                self._dedup_age_floor = age_key
                stored = self._engine.get(fmt.DEDUP, request_id)
                if stored is None or fmt.dedup_time_unchecked(stored) != time_ms:
                    continue  # a dangling age entry: drop it, it is not an entry
                mutations.append((fmt.DEDUP, request_id, None))
                touched[request_id] = None
                evicted += 1
                if evicted == excess:
                    return evicted
            if floor == b"":
                break
        return evicted

    def prune_dedup(self, older_than_ms: int) -> int:
        """Delete the dedup entries with time_ms < older_than_ms (unsynced, like any write); return how many."""
        pruned = 0
        while True:
            self._check_usable()
            end = fmt.dedup_age_key(older_than_ms, b"")
            batch = self.batch()
            dangling: list[bytes] = []
            for age_key in self._engine.keys(fmt.DEDUP_AGE, b"", end):
                time_ms, request_id = fmt.decode_dedup_age_key(age_key)
                stored = self._engine.get(fmt.DEDUP, request_id)
                if stored is None or fmt.dedup_time_unchecked(stored) != time_ms:
                    dangling.append(age_key)
                else:
                    batch.delete_dedup(request_id)
                if len(batch) + len(dangling) >= PRUNE_CHUNK_ENTRIES:
                    break
            if not len(batch) and not dangling:
                return pruned
            pruned += len(batch)
            batch.written = True
            with self._write_lock:
                self._check_usable()
                mutations, delta = self._resolve(batch.operations)
                mutations.extend((fmt.DEDUP_AGE, age_key, None) for age_key in dangling)
                self._write_mutations(mutations, delta)

    # Reading.

    def _engine_get(self, column_family: int, key: bytes) -> bytes | None:
        self._check_usable()
        try:
            return self._engine.get(column_family, key)
        except Exception as error:
            raise self._read_error(column_family, key, error) from error

    def _read_error(self, column_family: int, key: bytes, error: Exception) -> Exception:
        if "corrupt" in str(error).lower():
            return CorruptValue(key, fmt.COLUMN_FAMILIES[column_family], f"engine reported: {error}")
        return self._fail("read", error)

    def get(self, key: bytes) -> Versioned | None:
        """The stored version of `key` (a tombstone has value None), None if never written.
        Raises CorruptValue when the stored bytes fail their CRC32C."""
        stored = self._engine_get(fmt.DATA, key)
        if stored is None:
            return None
        decoded = fmt.decode_value(key, stored)
        if decoded is None:
            raise CorruptValue(key)
        return Versioned(key, decoded[0], decoded[1])

    def scan(self, start: bytes, end: bytes | None, limit: int, *, include_tombstones: bool = True) -> list[Versioned]:
        """Up to `limit` versions with start <= key < end (end None: to the last key), in key order.
        Raises CorruptValue at the first entry that fails its CRC32C."""
        assert 0 < limit <= SCAN_LIMIT_MAX, f"scan limit out of range: {limit}"
        self._check_usable()
        versions: list[Versioned] = []
        for key, stored in self._items(fmt.DATA, start, end):
            decoded = fmt.decode_value(key, stored)
            if decoded is None:
                raise CorruptValue(key)
            if decoded[1] is None and not include_tombstones:
                continue
            versions.append(Versioned(key, decoded[0], decoded[1]))
            if len(versions) >= limit:
                break
        return versions

    def _items(self, column_family: int, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        try:
            yield from self._engine.items(column_family, start, end)
        except Exception as error:
            raise self._read_error(column_family, start, error) from error

    def get_record(self, record_id: RecordId) -> bytes | None:
        key = fmt.record_key(record_id)
        stored = self._engine_get(fmt.LOG, key)
        return None if stored is None else self._checked_log_value(key, stored)

    def _checked_log_value(self, key: bytes, stored: bytes) -> bytes:
        record = fmt.log_value(key, stored)
        if record is None:
            raise CorruptValue(key, fmt.COLUMN_FAMILIES[fmt.LOG])
        return record

    def get_meta(self, name: str) -> bytes | None:
        key = fmt.meta_key(name)
        stored = self._engine_get(fmt.META, key)
        return None if stored is None else self._unframe(fmt.META, key, stored)

    def is_dirty(self, key: bytes) -> bool:
        return self._engine_get(fmt.DIRTY, key) is not None

    def dirty_keys(self, start: bytes, limit: int) -> list[bytes]:
        """Up to `limit` dirty keys >= start, in key order (for resync without loading the whole set)."""
        assert 0 < limit <= SCAN_LIMIT_MAX, f"limit out of range: {limit}"
        self._check_usable()
        keys = []
        for key, _ in self._items(fmt.DIRTY, start, None):
            keys.append(key)
            if len(keys) >= limit:
                break
        return keys

    def get_dedup(self, request_id: bytes) -> DedupEntry | None:
        stored = self._engine_get(fmt.DEDUP, request_id)
        if stored is None:
            return None
        decoded = fmt.decode_dedup(request_id, stored)
        if decoded is None:
            raise CorruptValue(request_id, "dedup")
        return DedupEntry(decoded[1], decoded[0])

    def _unframe(self, column_family: int, key: bytes, stored: bytes) -> bytes:
        payload = fmt.unframe(key, stored)
        if payload is None:
            raise CorruptValue(key, fmt.COLUMN_FAMILIES[column_family])
        return payload

    def load(self) -> Recovered:
        """Everything needed after a restart. Raises CorruptValue if a log, meta or dedup entry is corrupt."""
        self._check_usable()
        recovered = Recovered()
        for key, stored in self._items(fmt.META, b"", None):
            payload = self._unframe(fmt.META, key, stored)
            if key == fmt.RESYNC_POSITION_KEY:
                recovered.resync_position = payload
            else:
                assert key.startswith(fmt.META_PREFIX), f"unknown meta key {key!r}"
                recovered.meta[key[len(fmt.META_PREFIX) :].decode("utf-8")] = payload
        for key, stored in self._items(fmt.LOG, b"", None):
            recovered.log[fmt.decode_record_key(key)] = self._checked_log_value(key, stored)
        recovered.dirty = {key for key, _ in self._items(fmt.DIRTY, b"", None)}
        for key, stored in self._items(fmt.DEDUP, b"", None):
            decoded = fmt.decode_dedup(key, stored)
            if decoded is None:
                raise CorruptValue(key, "dedup")
            recovered.dedup[key] = DedupEntry(decoded[1], decoded[0])
        return recovered

    # Verify.

    def range_digest(self, start: bytes, end: bytes | None) -> tuple[int, bytes]:
        """(count, digest) of the entries (tombstones included) with start <= key < end.

        The digest is the sum modulo 2**128 of a 128-bit BLAKE2b hash per entry over (key, ts,
        tombstone flag, CRC32C), so it does not depend on order and the digests of adjacent ranges add
        up to the digest of their union. It is computed from one iterator, a consistent view as of the
        call, so writes may go on meanwhile. A corrupt entry gets a hash no healthy entry has."""
        self._check_usable()
        count = 0
        total = 0
        for key, stored in self._items(fmt.DATA, start, end):
            total += _entry_hash(key, stored)
            count += 1
        return count, (total % _DIGEST_MODULUS).to_bytes(DIGEST_SIZE_BYTES, "big")

    def split_range(self, start: bytes, end: bytes | None, parts: int) -> list[tuple[bytes, bytes | None]]:
        """Split [start, end) into at most `parts` adjacent subranges holding about as many keys each,
        from an evenly spaced sample of the keys (one pass over the keys, not the values). The first
        subrange starts at `start`, the last ends at `end`; together they cover [start, end) exactly."""
        assert 1 <= parts <= SPLIT_SAMPLE_KEYS_MAX, f"parts out of range: {parts}"
        self._check_usable()
        sample: list[bytes] = []
        stride = 1
        index = 0
        try:
            for key in self._engine.keys(fmt.DATA, start, end):
                if index % stride == 0:
                    sample.append(key)
                    if len(sample) >= SPLIT_SAMPLE_KEYS_MAX:
                        sample = sample[::2]
                        stride *= 2
                index += 1
        except Exception as error:
            raise self._read_error(fmt.DATA, start, error) from error
        boundaries: list[bytes] = []
        for part in range(1, parts):
            position = part * len(sample) // parts
            if 0 < position < len(sample):
                boundary = sample[position]
                if boundary > start and (not boundaries or boundary > boundaries[-1]):
                    boundaries.append(boundary)
        edges: list[bytes | None] = [start, *boundaries, end]
        ranges = []
        for low, high in zip(edges, edges[1:], strict=False):
            assert low is not None
            ranges.append((low, high))
        return ranges

    # Test hooks: these bypass every check, to plant corrupt bytes and look at raw storage.

    def raw_get(self, column_family: str, key: bytes) -> bytes | None:
        return self._engine.get(fmt.COLUMN_FAMILIES.index(column_family), key)

    def raw_put(self, column_family: str, key: bytes, stored: bytes | None) -> int:
        with self._write_lock:
            self._check_usable()
            return self._write_mutations([(fmt.COLUMN_FAMILIES.index(column_family), key, stored)], 0)
