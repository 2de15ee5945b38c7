"""The writer process of the storage crash test (tests/test_storage_crash.py).

    python tests/storage_crash_writer.py <store path>

Opens the store (recovering it), continues the batch numbering from the
store's meta `last_batch`, and commits batches forever through a
GroupCommitter from several concurrent tasks, printing `durable <n>` on stdout
once batch n is durable. The parent kills it with SIGKILL at random moments.

Batch n holds: log record ("crash", 1, n), a value at `key-<n>` (ts n+1), a
last-writer-wins value at `shared-<n % 8>`, meta `last_batch` = n, the dirty
key `key-<n>`, the dedup entry `request-<n>`, every one of them checkable by
the parent. Batches are numbered in the order they are written, so the batches
present after a crash must be exactly 0..last_batch.
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from replicator.core.records import RecordId  # noqa: E402
from replicator.storage import GroupCommitter, Store, StoreOptions  # noqa: E402
from replicator.storage._format import log_value_of  # noqa: E402

WRITERS = 8
SHARED_KEYS = 8
JOURNAL_SIZE_BYTES_MAX = 256 << 10  # small, so that rotations and checkpoints happen during the test


def record_payload(number: int) -> bytes:
    return log_value_of((b"record %d;" % number) * (1 + number % 50))


def value_of(number: int) -> bytes:
    return (b"value %d;" % number) * (1 + number % 300)


def fill(batch, number: int) -> None:  # type: ignore[no-untyped-def]
    batch.put_record(RecordId("crash", 1, number), record_payload(number))
    batch.apply(b"key-%08d" % number, number + 1, value_of(number))
    batch.apply(b"shared-%d" % (number % SHARED_KEYS), number + 1, b"%d" % number)
    batch.put_meta("last_batch", b"%d" % number)
    batch.add_dirty(b"key-%08d" % number)
    batch.put_dedup(b"request-%08d" % number, b"outcome %d" % number, number)


def store_options() -> StoreOptions:
    return StoreOptions(journal_size_bytes_max=JOURNAL_SIZE_BYTES_MAX, write_buffer_size_bytes=1 << 20)


async def run(path: str) -> None:
    store = Store.open(path, store_options())
    last = store.get_meta("last_batch")
    next_number = 0 if last is None else int(last) + 1
    out = sys.stdout

    async def writer() -> None:
        nonlocal next_number
        while True:
            number = next_number
            next_number += 1
            batch = store.batch()
            fill(batch, number)
            await committer.commit(batch)
            out.write(f"durable {number}\n")
            out.flush()

    async with GroupCommitter(store) as committer:
        out.write("ready\n")
        out.flush()
        await asyncio.gather(*(writer() for _ in range(WRITERS)))


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1]))
