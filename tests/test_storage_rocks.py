"""The RocksDB store's own machinery: the journal, recovery, rotation and checkpoints.

A "crash image" is a copy of the store directory taken while the store is open
and idle: what a power cut would leave, minus the memtable (RocksDB's WAL is
off) and the journal entries queued but not yet synced.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from replicator.core.records import RecordId, Versioned
from replicator.storage import StorageFailed, Store, StoreOptions, journal
from replicator.storage._format import log_value_of


def crash_image(store: Store, target) -> str:  # type: ignore[no-untyped-def]
    """Copy the live directory. RocksDB may retire files while we copy (background compaction
    or a checkpoint): then copy again, as a crash at a calmer instant would have seen."""
    for _attempt in range(20):
        try:
            shutil.copytree(store.path, target)
            return str(target)
        except shutil.Error:
            shutil.rmtree(target, ignore_errors=True)
            time.sleep(0.1)
    raise AssertionError("the store directory kept changing while it was copied")


def put(store: Store, key: bytes, ts: int, value: bytes | None) -> int:
    batch = store.batch()
    batch.apply(key, ts, value)
    batch.put_record(RecordId("o", 1, ts), log_value_of(b"record " + key))
    return store.write(batch)


def test_synced_writes_survive_a_crash_and_unsynced_ones_vanish_whole(tmp_path) -> None:
    store = Store.open(tmp_path / "store")
    try:
        for ts in range(1, 51):
            put(store, b"k%d" % ts, ts, b"v%d" % ts)
        store.sync()
        put(store, b"late", 100, b"not synced")
        image = crash_image(store, tmp_path / "image")
    finally:
        store.close()
    recovered = Store.open(image)
    try:
        assert [v.key for v in recovered.scan(b"k", b"l", 100)] == sorted(b"k%d" % ts for ts in range(1, 51))
        assert recovered.get(b"late") is None and recovered.get_record(RecordId("o", 1, 100)) is None
        assert recovered.written_sequence == 50 == recovered.durable_sequence
        # Sequence numbers go on from the recovered ones and never repeat.
        assert put(recovered, b"next", 200, b"x") == 51
    finally:
        recovered.close()


def test_a_torn_journal_tail_is_dropped(tmp_path) -> None:
    store = Store.open(tmp_path / "store")
    try:
        for ts in range(1, 11):
            put(store, b"k%02d" % ts, ts, b"v")
        store.sync()
        image = crash_image(store, tmp_path / "image")
    finally:
        store.close()
    ((number, path),) = journal.list_files(image)
    torn = journal.encode_entry(11, [(0, b"torn", b"x" * 100)])
    with open(path, "ab") as file:
        file.write(torn[: len(torn) // 2])
    recovered = Store.open(image)
    try:
        assert len(recovered.scan(b"", None, 100)) == 10 and recovered.get(b"torn") is None
        assert journal.list_files(image)[0][0] > number  # the old journal was replayed and retired
    finally:
        recovered.close()


def test_corruption_before_the_last_journal_file_refuses_to_open(tmp_path) -> None:
    directory = tmp_path / "store"
    Store.open(directory).close()
    first = journal.encode_entry(1, [(0, b"a", b"x")]) + journal.encode_entry(2, [(0, b"b", b"y")])
    corrupt = bytearray(first)
    corrupt[-1] ^= 1
    (directory / journal.file_name(7)).write_bytes(bytes(corrupt))
    (directory / journal.file_name(8)).write_bytes(journal.encode_entry(3, [(0, b"c", b"z")]))
    with pytest.raises(StorageFailed, match="corrupt"):
        Store.open(directory)


def test_a_gap_in_the_journal_refuses_to_open(tmp_path) -> None:
    directory = tmp_path / "store"
    Store.open(directory).close()
    entries = journal.encode_entry(1, [(0, b"a", b"x")]) + journal.encode_entry(3, [(0, b"b", b"y")])
    (directory / journal.file_name(9)).write_bytes(entries)
    with pytest.raises(StorageFailed, match="sequence"):
        Store.open(directory)


def test_a_flush_ahead_of_the_journal_keeps_whole_batches_and_skips_old_entries(tmp_path) -> None:
    store = Store.open(tmp_path / "store")
    try:
        put(store, b"a", 1, b"synced")
        store.sync()
        put(store, b"a", 2, b"flushed, never synced")
        put(store, b"b", 3, b"flushed, never synced")
        store.db.flush(True)  # RocksDB persists the memtable on its own schedule; force it here
        image = crash_image(store, tmp_path / "image")
    finally:
        store.close()
    recovered = Store.open(image)
    try:
        assert recovered.get(b"a") == Versioned(b"a", 2, b"flushed, never synced")
        assert recovered.get_record(RecordId("o", 1, 3)) == log_value_of(b"record b")
        assert recovered.written_sequence == 3
    finally:
        recovered.close()


def test_the_journal_rotates_and_checkpoints_retire_old_files(tmp_path) -> None:
    options = StoreOptions(journal_size_bytes_max=64 << 10, write_buffer_size_bytes=256 << 10)
    store = Store.open(tmp_path / "store", options)
    try:
        value = os.urandom(4096)
        for ts in range(1, 301):
            put(store, b"k%04d" % ts, ts, value)
            if ts % 10 == 0:
                store.sync()
        deadline = time.monotonic() + 30  # checkpoints run in the background: slow on a loaded machine
        while len(journal.list_files(store.path)) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(journal.list_files(store.path)) <= 2
        image = crash_image(store, tmp_path / "image")
    finally:
        store.close()
    assert journal.list_files(str(tmp_path / "store")) == []  # a clean close retires the journal
    recovered = Store.open(image, options)
    try:
        assert len(recovered.scan(b"k", b"l", 1000)) == 300
        assert len(recovered.load().log) == 300
    finally:
        recovered.close()


def test_reopen_after_a_clean_close(tmp_path) -> None:
    store = Store.open(tmp_path / "store")
    put(store, b"k", 1, b"v")
    store.close()
    with pytest.raises(StorageFailed):
        store.get(b"k")
    store = Store.open(tmp_path / "store")
    try:
        assert store.get(b"k") == Versioned(b"k", 1, b"v")
    finally:
        store.close()


def test_create_if_missing_off_refuses_a_missing_store(tmp_path) -> None:
    with pytest.raises(StorageFailed, match="no store"):
        Store.open(tmp_path / "absent", StoreOptions(create_if_missing=False))
