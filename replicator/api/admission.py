"""Admission control: bounded work in flight per site, back-pressure instead of a failover.

A site under more load than it can carry must not queue without bound: an
unbounded queue turns into event-loop lag, the lag into missed heartbeats and
the missed heartbeats into a failover, the worst answer to overload there is.
So every data request that reaches the backend (objects and blocks over gRPC,
S3) first takes a permit from the site's `Admission`: at most `ops_max`
requests and `bytes_max` bytes of payload in flight at once. A request that
does not fit waits, in arrival order, for at most `wait_ms`; then it gets
`Overloaded` (gRPC RESOURCE_EXHAUSTED, S3 503 SlowDown) with a retry hint,
and nothing was applied. The clients retry it after the hint, at the same
site (the site is busy, not broken).

Fairness: waiters are served first come, first served; a request that does
not fit blocks the ones behind it (no small request overtakes a large one
forever). A request larger than `bytes_max` on its own is admitted when
nothing else is in flight, so that any request the API limits allow can run.

NBD connections have their own bounds (nbd.inflight_requests_max and
nbd.site_inflight_requests_max) and wait rather than fail: block clients do
not retry.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from replicator.api import errors
from replicator.api.backend import SiteBackend, WriteResult
from replicator.core.records import Operation, Versioned

__all__ = ["Admission", "AdmittedBackend", "AdmissionStats"]

@dataclass(frozen=True, slots=True)
class AdmissionStats:
    ops_in_flight: int
    bytes_in_flight: int
    waiting: int
    admitted: int
    rejected: int

class Admission:
    """The permits of one site (see the module docstring). Event-loop only, not thread-safe."""

    def __init__(self, ops_max: int, bytes_max: int, wait_ms: int) -> None:
        for name, value in (("ops_max", ops_max), ("bytes_max", bytes_max)):
            if value <= 0:
                raise ValueError(f"admission {name} must be positive, got {value}")
        if wait_ms < 0:
            raise ValueError(f"admission wait_ms must be >= 0, got {wait_ms}")
        self.ops_max, self.bytes_max, self.wait_ms = ops_max, bytes_max, wait_ms
        self.ops = 0
        self.bytes = 0
        self.admitted = 0
        self.rejected = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self.ops, self.bytes, len(self._waiters), self.admitted, self.rejected)

    def _fits(self, nbytes: int) -> bool:
        if self.ops >= self.ops_max:
            return False
        return self.bytes + nbytes <= self.bytes_max or self.ops == 0

    def _take(self, nbytes: int) -> None:
        self.ops += 1
        self.bytes += nbytes
        self.admitted += 1

    def _release(self, nbytes: int) -> None:
        self.ops -= 1
        self.bytes -= nbytes
        self._wake()

    def _wake(self) -> None:
        """Admit the waiters at the head of the line that fit now."""
        while self._waiters:
            size, future = self._waiters[0]
            if not self._fits(size):
                break
            self._waiters.popleft()
            self._take(size)
            future.set_result(None)

    def _leave(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        """A waiter gives up (timed out, cancelled): out of the line, and the ones behind it may fit now."""
        entry[1].cancel()
        self._waiters.remove(entry)
        self._wake()

    @contextlib.asynccontextmanager
    async def admit(self, nbytes: int) -> AsyncIterator[None]:
        """Hold a permit for one request of `nbytes` payload bytes while the body runs."""
        if not self._waiters and self._fits(nbytes):
            self._take(nbytes)
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (nbytes, future)
            self._waiters.append(entry)
            try:
                await asyncio.wait_for(asyncio.shield(future), self.wait_ms / 1000)
            except TimeoutError:
                if not future.done():
                    self._leave(entry)
                    self.rejected += 1
                    raise errors.Overloaded(
                        f"the site is busy: {self.ops} requests and {self.bytes} bytes in flight "
                        f"(limits {self.ops_max} and {self.bytes_max}), {len(self._waiters)} waiting; nothing applied",
                        retry_after_ms=max(10, self.wait_ms // 2),
                    ) from None
                # Admitted just as the wait ran out: the permit is ours.
            except BaseException:
                if future.done():
                    self._release(nbytes)  # admitted, then cancelled before using it
                else:
                    self._leave(entry)
                raise
        try:
            yield
        finally:
            self._release(nbytes)

def _write_bytes(operations: Sequence[Operation]) -> int:
    return sum(len(op.key) + (len(op.value) if op.value is not None else 0) for op in operations)

class AdmittedBackend:
    """A SiteBackend whose data calls (write, read, scan) take a permit first; the rest passes through."""

    def __init__(self, backend: SiteBackend, admission: Admission) -> None:
        self._backend = backend
        self.admission = admission

    async def write(self, operations: Sequence[Operation], request_id: bytes, timeout_s: float) -> WriteResult:
        async with self.admission.admit(_write_bytes(operations)):
            return await self._backend.write(operations, request_id, timeout_s)

    async def read(self, key: bytes, timeout_s: float) -> Versioned | None:
        async with self.admission.admit(0):
            return await self._backend.read(key, timeout_s)

    async def scan(self, start: bytes, end: bytes | None, limit: int, timeout_s: float) -> list[Versioned]:
        async with self.admission.admit(0):
            return await self._backend.scan(start, end, limit, timeout_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

def admitted(backend: SiteBackend, ops_max: int, bytes_max: int, wait_ms: int) -> SiteBackend:
    """`backend` behind a fresh Admission of these limits."""
    wrapped: Any = AdmittedBackend(backend, Admission(ops_max, bytes_max, wait_ms))
    return wrapped  # type: ignore[no-any-return]

Releaser = Callable[[], None]
