"""Group commit for the asyncio daemon: many commits, one fsync, none on the event loop.

Theory of operation. `commit(batch)` writes the batch at once, on the event
loop, unsynced (a RocksDB write without sync costs microseconds and is
visible to reads immediately), queues a future with the write's sequence
number, and wakes the syncing thread if it sleeps. The syncing thread loops:
it takes the sequence number of the last write, makes everything up to it
durable with one `store.sync()` (RocksDB `flush_wal(sync=True)`, which
releases the GIL while the disk works), and hands the durable sequence number
back to the loop (`call_soon_threadsafe`), which resolves every future up to
it. While one sync runs, new commits pile up and the next sync covers them
all, so the number of commits per fsync grows with the load by itself, with
no timer and no added latency when idle.

Why not a synced write in an executor: rocksdict keeps the GIL through a
synced `write`, fsync included, which stalls the event loop for the whole
fsync (docs/storage.md has the numbers). Here the loop only ever does
unsynced writes; the one thread that waits on the disk does so without the GIL.

Failure: when a sync fails the store is fail-stopped; every pending and future
commit raises StorageFailed, and nothing that was not durable was reported.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

from replicator.storage.base import BaseStore
from replicator.storage.batch import Batch
from replicator.storage.errors import StorageFailed, WriteStalled

COMMITS_IN_FLIGHT_MAX = 65_536
CLOSE_TIMEOUT_S = 30.0
WRITE_STALL_TIMEOUT_S = 60.0
CATCH_UP_WAIT_S = 0.002
LAZY_DELAY_S = 0.010  # the longest a lazy wait_durable holds back its sync (see wait_durable)


class GroupCommitter:
    """`await commit(batch)` returns once the batch is durable. Call `start()` in the running loop,
    `await close()` to drain and stop (or use `async with`)."""

    def __init__(
        self,
        store: BaseStore,
        *,
        commits_in_flight_max: int = COMMITS_IN_FLIGHT_MAX,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        write_stall_timeout_s: float = WRITE_STALL_TIMEOUT_S,
        lazy_delay_s: float = LAZY_DELAY_S,
    ) -> None:
        if commits_in_flight_max < 1:
            raise ValueError(f"commits_in_flight_max={commits_in_flight_max!r}: must be at least 1")
        if close_timeout_s <= 0:
            raise ValueError(f"close_timeout_s={close_timeout_s!r}: must be positive")
        if write_stall_timeout_s <= 0:
            raise ValueError(f"write_stall_timeout_s={write_stall_timeout_s!r}: must be positive")
        if lazy_delay_s < 0:
            raise ValueError(f"lazy_delay_s={lazy_delay_s!r}: must be >= 0")
        self._lazy_delay_s = lazy_delay_s
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._store = store
        self._write_stall_timeout_s = write_stall_timeout_s
        self._commits_in_flight_max = commits_in_flight_max
        self._close_timeout_s = close_timeout_s
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._space_waiters: deque[asyncio.Future[None]] = deque()
        self._stalled: deque[tuple[Batch, asyncio.Future[int]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._wake = threading.Event()
        self._caught_up = threading.Event()
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: StorageFailed | None = None
        # Called in the syncing thread with each sync's seconds (a metric), when set.
        self.on_sync: Callable[[float], None] | None = None
        # Counters for metrics (read them from the loop).
        self.commit_count = 0
        self.write_stall_count = 0
        self.sync_count = 0
        self.sync_seconds_total = 0.0
        self.sync_seconds_max = 0.0

    @property
    def store(self) -> BaseStore:
        return self._store

    @property
    def in_flight(self) -> int:
        """Commits written and waiting for their sync."""
        return len(self._waiters)

    def start(self) -> None:
        """Start the syncing thread. Call from a coroutine running in the daemon's loop."""
        assert self._thread is None, "GroupCommitter started twice"
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="storage-sync", daemon=True)
        self._thread.start()

    async def __aenter__(self) -> GroupCommitter:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def commit(self, batch: Batch) -> None:
        """Write `batch` now (visible at once) and return once it is durable. Raises StorageFailed, or
        WriteStalled when RocksDB stalled writes for longer than write_stall_timeout_s."""
        if self._failure is not None:
            raise StorageFailed(str(self._failure), self._failure.cause)
        if self._closed:
            raise StorageFailed("the group committer is closed")
        loop = self._loop
        assert loop is not None, "GroupCommitter.start() was not called"
        while len(self._waiters) >= self._commits_in_flight_max:
            space = loop.create_future()
            self._space_waiters.append(space)
            await space
        sequence = await self._write(batch)
        self.commit_count += 1
        if sequence <= self._store.durable_sequence:
            return
        future = loop.create_future()
        self._waiters.append((sequence, future))
        self.request_sync()
        await future

    def write_now(self, batch: Batch) -> int:
        """Write `batch` at once, on the caller's stack (visible to reads before this returns), and
        return its sequence; pair with `wait_durable`. For a caller that must order a write with
        its own next steps (the site daemon's core driver). Blocks the loop through a RocksDB
        write stall, which `commit` would queue instead."""
        if self._failure is not None:
            raise StorageFailed(str(self._failure), self._failure.cause)
        if self._closed:
            raise StorageFailed("the group committer is closed")
        assert not self._stalled, "write_now cannot overtake commits queued behind a stall"
        sequence = self._store.write(batch, blocking=True)
        self.commit_count += 1
        return sequence

    async def wait_durable(self, sequence: int, *, lazy: bool = False) -> None:
        """Return once everything written up to `sequence` is durable (raises StorageFailed).

        `lazy`: nothing is in a hurry for this durability (a commit's apply, a log delete: no
        acknowledgement waits for them). No sync starts for it at once; it rides on the next sync
        anyone asks for (`request_sync`, a non-lazy wait, a commit), or on one started after at most
        `lazy_delay_s`. Crash safety is the same: a sync makes everything written before it durable."""
        if self._failure is not None:
            raise StorageFailed(str(self._failure), self._failure.cause)
        if sequence <= self._store.durable_sequence:
            return
        assert self._loop is not None, "GroupCommitter.start() was not called"
        future = self._loop.create_future()
        self._waiters.append((sequence, future))
        if not lazy:
            self.request_sync()
        elif self._lazy_timer is None and not self._wake.is_set():
            self._lazy_timer = self._loop.call_later(self._lazy_delay_s, self._lazy_due)
        await future

    def request_sync(self) -> None:
        """Start a sync now (if none is running; else the next one starts right after it)."""
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if not self._wake.is_set():
            self._wake.set()

    def _lazy_due(self) -> None:
        self._lazy_timer = None
        if self._waiters and not self._wake.is_set():
            self._wake.set()

    async def _write(self, batch: Batch) -> int:
        """Write on the loop, in commit order. While RocksDB stalls writes, the stalled commit and every
        later one wait in a queue (the loop stays free) and are written in order by `_drain_stalled`."""
        if not self._stalled:
            try:
                return self._store.write(batch, blocking=False)
            except WriteStalled:
                self.write_stall_count += 1
        assert self._loop is not None
        written: asyncio.Future[int] = self._loop.create_future()
        self._stalled.append((batch, written))
        if len(self._stalled) == 1:
            self._drainer = self._loop.create_task(self._drain_stalled())
        return await written

    async def _drain_stalled(self) -> None:
        assert self._loop is not None
        deadline = self._loop.time() + self._write_stall_timeout_s
        delay_s = 0.001
        while self._stalled:
            batch, written = self._stalled[0]
            if written.done():  # the commit was cancelled before it was written: skip it
                self._stalled.popleft()
                continue
            try:
                sequence = self._store.write(batch, blocking=False)
            except WriteStalled as stalled:
                if self._loop.time() >= deadline:
                    for _, waiting in self._stalled:
                        if not waiting.done():
                            waiting.set_exception(WriteStalled(str(stalled)))
                    self._stalled.clear()
                    return
                self.write_stall_count += 1
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.05)
                continue
            except BaseException as error:  # noqa: BLE001 - StorageFailed and the like go to every waiter
                for _, waiting in self._stalled:
                    if not waiting.done():
                        waiting.set_exception(error)
                self._stalled.clear()
                return
            self._stalled.popleft()
            written.set_result(sequence)
            deadline = self._loop.time() + self._write_stall_timeout_s
            delay_s = 0.001

    def _run(self) -> None:
        """The syncing thread."""
        store = self._store
        loop = self._loop
        assert loop is not None
        while True:
            if not self._stopping:  # once stopping, loop without waiting until everything is durable
                self._wake.wait()
            self._wake.clear()
            if self._stopping and store.written_sequence <= store.durable_sequence:
                return
            started = time.perf_counter()
            try:
                durable = store.sync()
            except BaseException as error:  # noqa: BLE001 - handed to the loop, which fails every commit
                failure = error if isinstance(error, StorageFailed) else StorageFailed(f"sync failed: {error}", error)
                self._call_in_loop(self._fail_all, failure)
                return
            elapsed = time.perf_counter() - started
            self.sync_count += 1
            self.sync_seconds_total += elapsed
            if elapsed > self.sync_seconds_max:
                self.sync_seconds_max = elapsed
            if self.on_sync is not None:
                self.on_sync(elapsed)  # in this thread: keep it cheap (a histogram observe)
            # Let the loop resolve the commits just made durable and run their writers, which usually
            # commit again at once, before the next sync starts: otherwise that sync would carry only the
            # few commits written meanwhile and the next one the rest (half-empty syncs). Bounded wait.
            self._caught_up.clear()
            if not self._call_in_loop(self._release, durable):
                return
            self._caught_up.wait(CATCH_UP_WAIT_S)

    def _call_in_loop(self, callback, argument) -> bool:  # type: ignore[no-untyped-def]
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, argument)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        return True

    def _release(self, durable: int) -> None:
        waiters = self._waiters
        while waiters and waiters[0][0] <= durable:
            future = waiters.popleft()[1]
            if not future.done():
                future.set_result(None)
        # Runs after the callbacks of the futures just resolved, that is after their writers' next step.
        assert self._loop is not None
        self._loop.call_soon(self._caught_up.set)
        while self._space_waiters and len(waiters) < self._commits_in_flight_max:
            space = self._space_waiters.popleft()
            if not space.done():
                space.set_result(None)

    def _fail_all(self, failure: StorageFailed) -> None:
        if self._failure is None:
            self._failure = failure
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(StorageFailed(str(failure), failure.cause))
        self._waiters.clear()
        for space in self._space_waiters:
            if not space.done():
                space.set_exception(StorageFailed(str(failure), failure.cause))
        self._space_waiters.clear()

    async def close(self) -> None:
        """Stop taking commits, wait (bounded) until every written commit is durable, stop the thread."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        if self._drainer is not None and not self._drainer.done():
            # Commits queued behind a write stall are written (or fail) before the thread stops.
            await asyncio.wait({self._drainer}, timeout=self._close_timeout_s)
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(thread.join, self._close_timeout_s)
        # Let the release callbacks the thread scheduled run before looking at what is left.
        await asyncio.sleep(0)
        if self._store.failure is None and self._waiters:
            self._release(self._store.durable_sequence)
        if self._waiters:
            reason = "syncing thread did not finish in time" if thread.is_alive() else "closed before durable"
            self._fail_all(StorageFailed(f"group committer closed: {reason}"))
