"""GroupCommitter: commits share syncs, return only once durable, fail-stop on a sync failure."""

from __future__ import annotations

import asyncio

import pytest

from replicator.core.records import RecordId
from replicator.storage import (
    BaseStore,
    FaultInjector,
    GroupCommitter,
    MemoryStore,
    StorageFailed,
    Store,
    StoreOptions,
    WriteStalled,
)
from replicator.storage._format import log_value_of


@pytest.fixture(params=["rocks", "memory"])
def make_store(request, tmp_path):
    stores: list[BaseStore] = []

    def make(options: StoreOptions | None = None) -> BaseStore:
        store: BaseStore = Store.open(tmp_path / "store", options) if request.param == "rocks" else MemoryStore(options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def record_batch(store: BaseStore, writer: int, seq: int):  # type: ignore[no-untyped-def]
    batch = store.batch()
    batch.put_record(RecordId("w", writer, seq), log_value_of(b"x" * 100))
    batch.apply(b"key-%d" % writer, seq + 1, b"%d" % seq)
    return batch


def test_concurrent_commits_are_durable_when_they_return_and_share_syncs(make_store) -> None:
    store = make_store()

    async def main() -> GroupCommitter:
        async with GroupCommitter(store) as committer:

            async def writer(number: int) -> None:
                for seq in range(50):
                    sequence_before = store.written_sequence
                    await committer.commit(record_batch(store, number, seq))
                    assert store.durable_sequence > sequence_before

            await asyncio.gather(*(writer(number) for number in range(32)))
        return committer

    committer = asyncio.run(main())
    assert committer.commit_count == 32 * 50
    assert committer.sync_count < committer.commit_count
    assert len(store.load().log) == 32 * 50
    assert store.durable_sequence == store.written_sequence


def test_a_sync_failure_fails_every_pending_and_later_commit(make_store) -> None:
    faults = FaultInjector()
    store = make_store(StoreOptions(fault_injector=faults))

    async def main() -> list[object]:
        async with GroupCommitter(store) as committer:
            await committer.commit(record_batch(store, 0, 0))
            faults.fail_next_sync()
            results = await asyncio.gather(
                *(committer.commit(record_batch(store, 1, seq)) for seq in range(10)), return_exceptions=True
            )
            with pytest.raises(StorageFailed):
                await committer.commit(record_batch(store, 2, 0))
            return results

    results = asyncio.run(main())
    assert results and all(isinstance(result, StorageFailed) for result in results)
    assert store.durable_sequence == 1


def test_a_full_disk_refuses_the_commit(make_store) -> None:
    faults = FaultInjector()
    store = make_store(StoreOptions(fault_injector=faults))

    async def main() -> None:
        async with GroupCommitter(store) as committer:
            faults.disk_full(True)
            with pytest.raises(StorageFailed, match="space"):
                await committer.commit(record_batch(store, 0, 0))

    asyncio.run(main())
    assert store.written_sequence == 0


def test_close_drains_and_then_refuses_commits(make_store) -> None:
    store = make_store()

    async def main() -> None:
        committer = GroupCommitter(store, commits_in_flight_max=4)
        committer.start()
        tasks = [asyncio.create_task(committer.commit(record_batch(store, 0, seq))) for seq in range(20)]
        await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        await committer.close()
        with pytest.raises(StorageFailed, match="closed"):
            await committer.commit(record_batch(store, 1, 0))

    asyncio.run(main())
    assert store.durable_sequence == store.written_sequence == 20


def test_stalled_writes_wait_off_the_loop_and_keep_their_order() -> None:
    store = MemoryStore()
    real_write = store._memory.write
    refusals = {"left": 5}

    def stalling_write(mutations, sequence, blocking=True):  # type: ignore[no-untyped-def]
        if not blocking and refusals["left"] > 0:
            refusals["left"] -= 1
            raise WriteStalled("test stall")
        real_write(mutations, sequence, blocking)

    store._memory.write = stalling_write  # type: ignore[method-assign]
    order: list[int] = []

    async def main() -> GroupCommitter:
        async with GroupCommitter(store) as committer:

            async def commit(seq: int) -> None:
                batch = store.batch()
                batch.put_meta("last", b"%d" % seq)
                await committer.commit(batch)
                order.append(seq)

            await asyncio.gather(*(commit(seq) for seq in range(10)))
        return committer

    committer = asyncio.run(main())
    assert committer.write_stall_count >= 5
    assert store.get_meta("last") == b"9"  # written in commit order
    assert sorted(order) == list(range(10))


def test_a_write_stall_longer_than_the_timeout_raises() -> None:
    store = MemoryStore()

    def always_stalled(mutations, sequence, blocking=True):  # type: ignore[no-untyped-def]
        raise WriteStalled("test stall")

    store._memory.write = always_stalled  # type: ignore[method-assign]

    async def main() -> None:
        async with GroupCommitter(store, write_stall_timeout_s=0.05) as committer:
            with pytest.raises(WriteStalled):
                await committer.commit(record_batch(store, 0, 0))

    asyncio.run(main())


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="commits_in_flight_max"):
        GroupCommitter(MemoryStore(), commits_in_flight_max=0)


def test_close_makes_commits_written_just_before_it_durable(make_store) -> None:
    store = make_store()

    async def main() -> list[object]:
        committer = GroupCommitter(store, close_timeout_s=5)
        committer.start()
        await committer.commit(record_batch(store, 0, 0))
        tasks = [asyncio.create_task(committer.commit(record_batch(store, 1, seq))) for seq in range(5)]
        await asyncio.sleep(0)  # the commits are written, their sync has not run yet
        started = asyncio.get_running_loop().time()
        await committer.close()
        assert asyncio.get_running_loop().time() - started < 2
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert results == [None] * 5
    assert store.durable_sequence == store.written_sequence


def test_a_lazy_wait_starts_no_sync_and_rides_on_the_next_one_or_the_delay(make_store) -> None:
    """What no acknowledgement waits for (a commit's apply, a log delete) does not cost a sync of its own."""
    store = make_store()

    async def main() -> None:
        async with GroupCommitter(store, lazy_delay_s=0.5) as committer:
            loop = asyncio.get_running_loop()
            syncs = committer.sync_count
            lazy = asyncio.ensure_future(committer.wait_durable(committer.write_now(record_batch(store, 1, 0)), lazy=True))
            await asyncio.sleep(0.05)
            assert not lazy.done() and committer.sync_count == syncs  # no sync for it yet
            # An urgent one comes along: one sync makes both durable, long before the lazy delay.
            began = loop.time()
            await committer.wait_durable(committer.write_now(record_batch(store, 2, 0)))
            await asyncio.wait_for(lazy, 0.2)
            assert loop.time() - began < 0.4 and committer.sync_count == syncs + 1
            # Alone, a lazy wait is still bounded: a sync starts after lazy_delay_s.
            began = loop.time()
            await asyncio.wait_for(committer.wait_durable(committer.write_now(record_batch(store, 3, 0)), lazy=True), 5)
            assert 0.45 <= loop.time() - began and committer.sync_count == syncs + 2
            assert store.durable_sequence >= store.written_sequence

    asyncio.run(main())
