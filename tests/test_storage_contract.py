"""The storage contract, run against the RocksDB store and its in-memory double alike."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.core.records import RecordId, Versioned
from replicator.storage import (
    BaseStore,
    CorruptValue,
    DedupEntry,
    FaultInjector,
    MemoryStore,
    StorageFailed,
    Store,
    StoreOptions,
)
from replicator.storage._format import log_value_of


@pytest.fixture(params=["rocks", "memory"])
def make_store(request, tmp_path):
    """A factory: make_store(options=None) -> a fresh store of the parametrised kind, closed at the end."""
    stores: list[BaseStore] = []
    counter = iter(range(1_000_000))

    def make(options: StoreOptions | None = None) -> BaseStore:
        if request.param == "rocks":
            store: BaseStore = Store.open(tmp_path / f"store-{next(counter)}", options)
        else:
            store = MemoryStore(options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store) -> BaseStore:
    return make_store()


def write(store: BaseStore, fill) -> int:  # type: ignore[no-untyped-def]
    batch = store.batch()
    fill(batch)
    return store.write(batch)


# Last-writer-wins and the visible state.


def test_apply_takes_effect_only_with_a_higher_ts(store) -> None:
    write(store, lambda b: b.apply(b"k", 10, b"ten"))
    write(store, lambda b: b.apply(b"k", 5, b"five"))
    assert store.get(b"k") == Versioned(b"k", 10, b"ten")
    write(store, lambda b: b.apply(b"k", 10, b"other ten"))  # equal ts: no effect (idempotent re-apply)
    assert store.get(b"k") == Versioned(b"k", 10, b"ten")
    write(store, lambda b: b.apply(b"k", 11, b"eleven"))
    assert store.get(b"k") == Versioned(b"k", 11, b"eleven")


def test_a_tombstone_keeps_its_ts_and_beats_older_writes(store) -> None:
    write(store, lambda b: b.apply(b"k", 10, b"v"))
    write(store, lambda b: b.apply(b"k", 12, None))
    assert store.get(b"k") == Versioned(b"k", 12, None)
    write(store, lambda b: b.apply(b"k", 11, b"late"))
    assert store.get(b"k") == Versioned(b"k", 12, None)
    write(store, lambda b: b.apply(b"never-written", 3, None))
    assert store.get(b"never-written") == Versioned(b"never-written", 3, None)
    assert store.get(b"absent") is None


def test_apply_sees_earlier_applies_in_the_same_batch_and_unsynced_batches(store) -> None:
    def fill(batch) -> None:  # type: ignore[no-untyped-def]
        batch.apply(b"k", 7, b"seven")
        batch.apply(b"k", 3, b"three")
        batch.apply(b"k", 9, b"nine")
        batch.apply(b"k", 8, b"eight")

    write(store, fill)
    assert store.get(b"k") == Versioned(b"k", 9, b"nine")
    assert store.durable_sequence < store.written_sequence  # nothing synced yet
    write(store, lambda b: b.apply(b"k", 8, b"eight again"))
    assert store.get(b"k") == Versioned(b"k", 9, b"nine")


def test_empty_and_binary_values_and_keys(store) -> None:
    write(store, lambda b: (b.apply(b"", 1, b""), b.apply(b"\x00\xff", 2, bytes(range(256)))))
    assert store.get(b"") == Versioned(b"", 1, b"")
    assert store.get(b"\x00\xff") == Versioned(b"\x00\xff", 2, bytes(range(256)))


def test_scan_is_ordered_bounded_limited_and_can_skip_tombstones(store) -> None:
    def fill(batch) -> None:  # type: ignore[no-untyped-def]
        for lba in range(20):
            batch.apply(b"vol/" + lba.to_bytes(8, "big"), 100 + lba, None if lba % 5 == 0 else b"block %d" % lba)
        batch.apply(b"vom", 1, b"after the volume")
        batch.apply(b"vo", 1, b"before the volume")

    write(store, fill)
    start, end = b"vol/" + (3).to_bytes(8, "big"), b"vol/" + (12).to_bytes(8, "big")
    versions = store.scan(start, end, 100)
    assert [int.from_bytes(v.key[4:], "big") for v in versions] == list(range(3, 12))
    assert versions[2] == Versioned(b"vol/" + (5).to_bytes(8, "big"), 105, None)
    live = store.scan(start, end, 100, include_tombstones=False)
    assert [int.from_bytes(v.key[4:], "big") for v in live] == [3, 4, 6, 7, 8, 9, 11]
    assert len(store.scan(b"vol/", b"vol0", 4)) == 4
    assert [v.key for v in store.scan(b"vol/", None, 100)][-1] == b"vom"
    assert store.scan(b"x", None, 10) == []


# Log, meta, dirty set, dedup, resync position; recovery.


def test_load_returns_everything_needed_after_a_restart(store) -> None:
    ids = [RecordId("b", 2, 1), RecordId("a", 1, 300), RecordId("a", 2, 1), RecordId("a", 1, 2), RecordId("ab", 0, 0)]

    def fill(batch) -> None:  # type: ignore[no-untyped-def]
        for index, record_id in enumerate(ids):
            batch.put_record(record_id, log_value_of(b"record %d" % index))
        batch.put_meta("epoch", b"\x07")
        batch.put_meta("state", b"SYNC")
        batch.add_dirty(b"d1")
        batch.add_dirty(b"d2")
        batch.put_dedup(b"request-1", b"ok", 1000)
        batch.set_resync_position(b"resume-here")

    write(store, fill)
    write(store, lambda b: (b.delete_record(ids[0]), b.discard_dirty(b"d1"), b.put_meta("epoch", b"\x08")))
    recovered = store.load()
    assert list(recovered.log) == sorted(ids[1:])  # in RecordId order
    assert recovered.log[RecordId("a", 1, 2)] == log_value_of(b"record 3")
    assert recovered.meta == {"epoch": b"\x08", "state": b"SYNC"}
    assert recovered.dirty == {b"d2"}
    assert recovered.dedup == {b"request-1": DedupEntry(b"ok", 1000)}
    assert recovered.resync_position == b"resume-here"
    assert store.get_record(RecordId("a", 2, 1)) == log_value_of(b"record 2")
    assert store.get_record(ids[0]) is None
    assert store.get_meta("state") == b"SYNC" and store.get_meta("nothing") is None
    assert store.is_dirty(b"d2") and not store.is_dirty(b"d1")
    assert store.dirty_keys(b"", 10) == [b"d2"]
    write(store, lambda b: b.set_resync_position(None))
    assert store.load().resync_position is None


def test_dedup_is_pruned_by_age_and_bounded(make_store) -> None:
    store = make_store(StoreOptions(dedup_entries_max=5))
    for number in range(8):
        write(store, lambda b, n=number: b.put_dedup(b"r%d" % n, b"outcome %d" % n, 100 + n))
    # The bound evicts the oldest entries.
    assert store.dedup_entry_count == 5
    assert set(store.load().dedup) == {b"r3", b"r4", b"r5", b"r6", b"r7"}
    # Replacing an entry moves it in the age order; deleting one frees room.
    write(store, lambda b: b.put_dedup(b"r3", b"newer", 200))
    write(store, lambda b: b.delete_dedup(b"r4"))
    assert store.dedup_entry_count == 4
    assert store.prune_dedup(107) == 2  # r5, r6
    assert store.load().dedup == {b"r7": DedupEntry(b"outcome 7", 107), b"r3": DedupEntry(b"newer", 200)}
    assert store.get_dedup(b"r3") == DedupEntry(b"newer", 200)
    assert store.get_dedup(b"r5") is None
    assert store.prune_dedup(1000) == 2
    assert store.dedup_entry_count == 0 and store.load().dedup == {}


# Sequence numbers and durability.


def test_sequence_numbers_and_sync(store) -> None:
    first = write(store, lambda b: b.apply(b"a", 1, b"1"))
    second = write(store, lambda b: b.apply(b"b", 1, b"1"))
    assert second == first + 1 and store.written_sequence == second
    assert store.durable_sequence < first
    assert store.sync() == second and store.durable_sequence == second
    # A batch that changes nothing is not a write.
    assert write(store, lambda b: b.apply(b"a", 1, b"lost")) == second
    with pytest.raises(AssertionError):
        batch = store.batch()
        store.write(batch)
        store.write(batch)


def test_memory_store_crash_drops_exactly_the_unsynced_writes() -> None:
    store = MemoryStore()
    write(store, lambda b: (b.apply(b"k", 1, b"durable"), b.put_meta("m", b"1")))
    store.sync()
    write(store, lambda b: (b.apply(b"k", 2, b"lost"), b.put_meta("m", b"2"), b.put_record(RecordId("o", 1, 1), log_value_of(b"r"))))
    assert store.get(b"k").value == b"lost"
    store.crash()
    assert store.get(b"k") == Versioned(b"k", 1, b"durable")
    assert store.load().meta == {"m": b"1"} and store.load().log == {}


# Integrity.


def test_a_flipped_byte_at_rest_is_reported_as_corruption(store) -> None:
    write(store, lambda b: (b.apply(b"k", 5, b"precious bytes"), b.apply(b"j", 5, b"fine")))
    stored = store.raw_get("data", b"k")
    for position in (0, 3, 12, len(stored) - 1):  # flags, ts, crc, value
        flipped = bytearray(stored)
        flipped[position] ^= 0x20
        store.raw_put("data", b"k", bytes(flipped))
        with pytest.raises(CorruptValue) as caught:
            store.get(b"k")
        assert caught.value.key == b"k"
        with pytest.raises(CorruptValue):
            store.scan(b"", None, 10)
    assert store.get(b"j").value == b"fine"
    # A correct copy (read-repair) replaces a corrupt value whatever its claimed ts.
    write(store, lambda b: b.apply(b"k", 5, b"precious bytes"))
    assert store.get(b"k") == Versioned(b"k", 5, b"precious bytes")


@pytest.mark.parametrize("position", [0, 1, 8, 12, 13, -1])  # flags, the ts's top and low byte, crc, value
def test_read_repair_replaces_a_corrupt_value_whatever_byte_was_hit(store, position: int) -> None:
    # The store reads an overwritten value's ts without its CRC; it must still check the CRC before
    # letting that ts win (a flipped high ts byte claims a ts no copy can beat).
    write(store, lambda b: b.apply(b"k", 5, b"precious bytes"))
    flipped = bytearray(store.raw_get("data", b"k"))
    flipped[position] ^= 0x40
    store.raw_put("data", b"k", bytes(flipped))
    write(store, lambda b: (b.apply(b"k", 5, b"precious bytes"), b.apply(b"k", 4, b"older")))
    assert store.get(b"k") == Versioned(b"k", 5, b"precious bytes")
    write(store, lambda b: b.apply(b"k", 5, b"a copy at the same ts"))  # whole now: it does not win
    assert store.get(b"k") == Versioned(b"k", 5, b"precious bytes")


def test_a_value_moved_to_another_key_is_reported(store) -> None:
    write(store, lambda b: (b.apply(b"a", 5, b"x"), b.apply(b"b", 5, b"x")))
    store.raw_put("data", b"b", store.raw_get("data", b"a"))
    with pytest.raises(CorruptValue):
        store.get(b"b")


def test_a_log_value_not_in_the_log_form_is_refused(store) -> None:
    batch = store.batch()
    with pytest.raises(ValueError, match="log's form"):
        batch.put_record(RecordId("o", 1, 1), b"RPLF a whole frame, not a record")
    assert len(batch) == 0


def test_corrupt_log_and_meta_entries_are_reported_by_load(store) -> None:
    write(store, lambda b: b.put_record(RecordId("o", 1, 1), log_value_of(b"record")))
    key = next(iter(store.load().log))
    assert key == RecordId("o", 1, 1)
    from replicator.storage import _format as fmt

    raw_key = fmt.record_key(key)
    stored = bytearray(store.raw_get("log", raw_key))
    stored[-1] ^= 1
    store.raw_put("log", raw_key, bytes(stored))
    with pytest.raises(CorruptValue) as caught:
        store.load()
    assert caught.value.column_family == "log"


# Range digests.


def fill_range(batch, keys: range, ts: int = 1) -> None:  # type: ignore[no-untyped-def]
    for number in keys:
        batch.apply(b"key-%06d" % number, ts, None if number % 7 == 0 else b"value %d" % number)


def test_equal_ranges_have_equal_digests_and_a_difference_shows(make_store) -> None:
    one, two = make_store(), make_store()
    write(one, lambda b: fill_range(b, range(300)))
    # The same content written in another order and in several batches.
    write(two, lambda b: fill_range(b, range(299, 149, -1)))
    write(two, lambda b: fill_range(b, range(150)))
    assert one.range_digest(b"", None) == two.range_digest(b"", None)
    assert one.range_digest(b"", None)[0] == 300
    write(two, lambda b: b.apply(b"key-000123", 2, b"value 123"))  # same value, newer ts
    assert one.range_digest(b"", None) != two.range_digest(b"", None)
    assert one.range_digest(b"key-000124", None) == two.range_digest(b"key-000124", None)


def test_split_range_covers_the_range_and_digests_add_up(store) -> None:
    write(store, lambda b: fill_range(b, range(1000)))
    count, digest = store.range_digest(b"key-000100", b"key-000900")
    parts = store.split_range(b"key-000100", b"key-000900", 8)
    assert len(parts) == 8
    assert parts[0][0] == b"key-000100" and parts[-1][1] == b"key-000900"
    assert all(parts[i][1] == parts[i + 1][0] for i in range(len(parts) - 1))
    counts = [store.range_digest(low, high)[0] for low, high in parts]
    assert sum(counts) == count == 800 and max(counts) - min(counts) <= 2
    total = sum(int.from_bytes(store.range_digest(low, high)[1], "big") for low, high in parts)
    assert (total % (1 << 128)).to_bytes(16, "big") == digest
    assert store.split_range(b"zzz", None, 4) == [(b"zzz", None)]


def test_narrowing_finds_the_keys_that_differ(make_store) -> None:
    one, two = make_store(), make_store()
    write(one, lambda b: fill_range(b, range(2000)))
    write(two, lambda b: fill_range(b, range(2000)))
    write(two, lambda b: (b.apply(b"key-000777", 5, b"changed"), b.apply(b"key-001500x", 1, b"extra")))
    corrupt = bytearray(two.raw_get("data", b"key-000042"))
    corrupt[-1] ^= 1
    two.raw_put("data", b"key-000042", bytes(corrupt))  # corruption at rest also shows as a difference

    def differing(low: bytes, high: bytes | None) -> list[bytes]:
        if one.range_digest(low, high) == two.range_digest(low, high):
            return []
        if one.range_digest(low, high)[0] <= 4:
            keys = {v.key for v in one.scan(low, high, 10)} | set(two._engine.keys(0, low, high))
            return sorted(k for k in keys if one.raw_get("data", k) != two.raw_get("data", k))
        return [key for part in one.split_range(low, high, 4) for key in differing(*part)]

    assert differing(b"", None) == [b"key-000042", b"key-000777", b"key-001500x"]


def test_digest_sees_the_range_as_of_its_start_while_writes_go_on(store) -> None:
    write(store, lambda b: fill_range(b, range(100)))
    expected = store.range_digest(b"", None)
    items = store._engine.items(0, b"", None)  # the iterator range_digest uses, taken before the write
    write(store, lambda b: fill_range(b, range(100, 200)))
    assert len(list(items)) == 100
    assert store.range_digest(b"", None)[0] == 200 and expected[0] == 100


# Faults.


def test_an_fsync_failure_fail_stops_the_store(make_store) -> None:
    faults = FaultInjector()
    store = make_store(StoreOptions(fault_injector=faults))
    write(store, lambda b: b.apply(b"k", 1, b"durable"))
    store.sync()
    sequence = write(store, lambda b: b.apply(b"k", 2, b"never acknowledged"))
    faults.fail_next_sync()
    with pytest.raises(StorageFailed, match="sync"):
        store.sync()
    assert store.durable_sequence < sequence
    assert store.failure is not None
    # Not retryable: every later operation is refused, even once the fault is gone.
    with pytest.raises(StorageFailed):
        store.sync()
    with pytest.raises(StorageFailed):
        write(store, lambda b: b.apply(b"k", 3, b"x"))
    with pytest.raises(StorageFailed):
        store.get(b"k")


def test_a_full_disk_fail_stops_before_anything_is_written(make_store) -> None:
    faults = FaultInjector()
    store = make_store(StoreOptions(fault_injector=faults))
    write(store, lambda b: b.apply(b"k", 1, b"before"))
    store.sync()
    faults.disk_full(True)
    with pytest.raises(StorageFailed, match="space"):
        write(store, lambda b: (b.apply(b"k", 2, b"half?"), b.put_meta("m", b"x")))
    faults.disk_full(False)
    with pytest.raises(StorageFailed):
        store.get(b"k")
    assert store.raw_get("data", b"k") is not None
    assert store.raw_get("meta", b"mm") is None  # nothing of the refused batch was written


def test_memory_store_after_a_sync_failure_and_crash_has_only_durable_writes() -> None:
    faults = FaultInjector()
    store = MemoryStore(StoreOptions(fault_injector=faults))
    write(store, lambda b: b.apply(b"k", 1, b"durable"))
    store.sync()
    write(store, lambda b: b.apply(b"k", 2, b"lost"))
    faults.fail_next_sync()
    with pytest.raises(StorageFailed):
        store.sync()
    store.crash()
    assert store.get(b"k") == Versioned(b"k", 1, b"durable")
    write(store, lambda b: b.apply(b"k", 3, b"after restart"))
    assert store.sync() == store.written_sequence


def test_the_fault_control_file_drives_a_running_store(make_store, tmp_path, monkeypatch) -> None:
    control = tmp_path / "faults"
    monkeypatch.setenv("REPLICATOR_STORAGE_FAULTS", str(control))
    injector = FaultInjector.from_environment()
    assert injector is not None
    store = make_store(StoreOptions(fault_injector=injector))
    write(store, lambda b: b.apply(b"k", 1, b"v"))
    store.sync()
    control.write_text("fail_next_sync\n")
    write(store, lambda b: b.apply(b"k", 2, b"v"))
    with pytest.raises(StorageFailed, match="fsync"):
        store.sync()


def test_the_fault_control_file_can_fill_the_disk(tmp_path) -> None:
    control = tmp_path / "faults"
    injector = FaultInjector(control)
    store = MemoryStore(StoreOptions(fault_injector=injector))
    control.write_text("disk_full")
    write(store, lambda b: b.apply(b"k", 1, b"v"))
    with pytest.raises(StorageFailed, match="space"):
        store.sync()


def test_the_fault_control_file_can_slow_the_syncs(tmp_path) -> None:
    control = tmp_path / "faults"
    injector = FaultInjector(control)
    store = MemoryStore(StoreOptions(fault_injector=injector))
    control.write_text("slow_sync_ms=150")
    write(store, lambda b: b.apply(b"k", 1, b"v"))
    began = time.monotonic()
    store.sync()
    assert time.monotonic() - began >= 0.15
    assert injector.slow_sync_ms == 150
    for bad in ("slow_sync_ms=0", "slow_sync_ms=-5", "slow_sync_ms=99999999", "slow_sync_ms=x", ""):
        control.write_text(bad + " " * len(bad))  # a new size, so the poll re-reads it
        injector.poll()
        assert injector.slow_sync_ms == 0, bad


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="dedup_entries_max"):
        StoreOptions(dedup_entries_max=0)
    with pytest.raises(ValueError, match="write_buffers_max"):
        StoreOptions(write_buffers_max=1)


# Property: both stores agree with a model of last-writer-wins, before and after a restart.

operations = st.lists(
    st.tuples(
        st.sampled_from([b"a", b"b", b"c", b"d", b"e"]),
        st.integers(min_value=0, max_value=20),
        st.one_of(st.none(), st.binary(max_size=64)),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(operations, max_size=6))
def test_both_stores_follow_the_last_writer_wins_model(tmp_path_factory, batches) -> None:
    path = tmp_path_factory.mktemp("lww")
    rocks = Store.open(os.path.join(path, "store"))
    memory = MemoryStore()
    model: dict[bytes, tuple[int, bytes | None]] = {}
    try:
        for operations_of_batch in batches:
            for store in (rocks, memory):
                batch = store.batch()
                for key, ts, value in operations_of_batch:
                    batch.apply(key, ts, value)
                store.write(batch)
            for key, ts, value in operations_of_batch:
                if key not in model or ts > model[key][0]:
                    model[key] = (ts, value)
        expected = [Versioned(key, ts, value) for key, (ts, value) in sorted(model.items())]
        assert rocks.scan(b"", None, 100) == expected
        assert memory.scan(b"", None, 100) == expected
        assert rocks.range_digest(b"", None) == memory.range_digest(b"", None)
        rocks.close()
        rocks = Store.open(os.path.join(path, "store"))
        assert rocks.scan(b"", None, 100) == expected
    finally:
        rocks.close()
