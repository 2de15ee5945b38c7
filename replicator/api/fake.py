"""In-memory test doubles of SiteBackend and WitnessBackend (tests only).

`FakeStore` plays the replicated state both sites share (a write at one site
is visible at the other at once, as after commit); each `FakeBackend` is one
site's view of it, which a test can make unavailable, slow, or lose the
answer of a write it applied (OutcomeUnknown after applying). Dedup by
request id spans both sites, as request ids travel inside records.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from replicator.api import errors
from replicator.api.backend import RangeEntry, SiteStatus, VerifyReport, WriteResult
from replicator.api.witness import ArbitrationOutcome, PairMode, PairState
from replicator.core.records import Operation, Versioned


@dataclass
class FakeStore:
    versions: dict[bytes, Versioned] = field(default_factory=dict)
    sorted_keys: list[bytes] = field(default_factory=list)
    outcomes: dict[bytes, WriteResult] = field(default_factory=dict)  # request id -> first outcome
    clock: int = 0
    records_applied: int = 0
    differing_keys: tuple[bytes, ...] = ()  # what verify reports

    def apply(self, operations: Sequence[Operation], request_id: bytes) -> WriteResult:
        previous = self.outcomes.get(request_id)
        if previous is not None:
            return WriteResult(previous.ts, duplicate=True)
        self.clock += 1
        for operation in operations:
            if operation.key not in self.versions:
                bisect.insort(self.sorted_keys, operation.key)
            self.versions[operation.key] = Versioned(operation.key, self.clock, operation.value)
        self.records_applied += 1
        result = WriteResult(self.clock, duplicate=False)
        self.outcomes[request_id] = result
        return result

    def scan(self, start: bytes, end: bytes | None, limit: int) -> list[Versioned]:
        index = bisect.bisect_left(self.sorted_keys, start)
        found: list[Versioned] = []
        while index < len(self.sorted_keys) and len(found) < limit:
            key = self.sorted_keys[index]
            if end is not None and key >= end:
                break
            found.append(self.versions[key])
            index += 1
        return found


class FakeBackend:
    def __init__(
        self,
        site_name: str = "a",
        store: FakeStore | None = None,
        peer: str = "b",
        peer_address: str = "",
        state: str = "SYNC",
    ) -> None:
        self.site_name = site_name
        self.store = store if store is not None else FakeStore()
        self.peer = peer
        self.peer_address = peer_address
        self.state = state
        self.available = True
        self.unknown_after_apply = 0  # this many next writes apply, then answer OutcomeUnknown
        self.write_delay_s = 0.0
        self.writes_seen = 0
        self.actions: list[tuple[str, bool]] = []
        self.status_details: dict[str, str] = {}

    def _serve(self) -> None:
        if not self.available:
            raise errors.Unavailable("fenced", self.peer_address)

    async def write(self, operations: Sequence[Operation], request_id: bytes, timeout_s: float) -> WriteResult:
        assert operations and request_id and timeout_s > 0
        assert len({operation.key for operation in operations}) == len(operations)
        self.writes_seen += 1
        self._serve()
        if self.write_delay_s:
            await asyncio.sleep(self.write_delay_s)
        result = self.store.apply(operations, request_id)
        if self.unknown_after_apply:
            self.unknown_after_apply -= 1
            raise errors.OutcomeUnknown("peer did not answer in time")
        return result

    async def read(self, key: bytes, timeout_s: float) -> Versioned | None:
        self._serve()
        return self.store.versions.get(key)

    async def scan(self, start: bytes, end: bytes | None, limit: int, timeout_s: float) -> list[Versioned]:
        assert limit > 0
        self._serve()
        return self.store.scan(start, end, limit)

    def status(self) -> SiteStatus:
        return SiteStatus(
            site=self.site_name,
            peer=self.peer,
            pair="pair-1",
            state=self.state if self.available else "FENCED",
            epoch=3,
            role="preferred" if self.site_name == "a" else "secondary",
            peer_reachable=True,
            witness_reachable=True,
            lag_records=2,
            lag_bytes=512,
            dirty_keys=0,
            resync_progress=(0, 0),
            preferred="a",
            peer_address=self.peer_address,
            details=dict(self.status_details),
        )

    async def verify(self, repair: bool, progress: Callable[[int, int], None]) -> VerifyReport:
        self._serve()
        total = len(self.store.sorted_keys)
        for done in range(0, total + 1, max(1, total // 4)):
            progress(done, total)
            await asyncio.sleep(0)
        progress(total, total)
        differing = self.store.differing_keys
        self.actions.append(("verify", repair))
        return VerifyReport(keys_compared=total, differing_keys=differing, repaired=len(differing) if repair else 0)

    async def resync(self, full: bool) -> None:
        self._serve()
        self.actions.append(("resync", full))

    async def switchover(self) -> None:
        if self.state != "SYNC":
            raise errors.Refused("switchover needs both sites in SYNC")
        self.actions.append(("switchover", True))

    async def failover(self, force: bool) -> None:
        self.actions.append(("failover", force))

    # The peer side of verify (not the storage's digest: a stand-in with the same shape).
    @staticmethod
    def _entry(version: Versioned) -> RangeEntry:
        value = b"" if version.value is None else version.value
        crc = int.from_bytes(hashlib.blake2b(version.key + b"\x00" + value, digest_size=4).digest(), "big")
        return RangeEntry(version.key, version.ts, version.value is None, crc)

    async def range_digests(self, ranges: Sequence[tuple[bytes, bytes | None]]) -> list[tuple[int, bytes]]:
        self._serve()
        results = []
        for start, end in ranges:
            versions = self.store.scan(start, end, 1 << 62)
            total = 0
            for version in versions:
                entry = self._entry(version)
                material = entry.key + entry.ts.to_bytes(8, "big") + entry.crc.to_bytes(4, "big")
                total += int.from_bytes(hashlib.blake2b(material, digest_size=16).digest(), "big")
            results.append((len(versions), (total % (1 << 128)).to_bytes(16, "big")))
        return results

    async def range_entries(self, start: bytes, end: bytes | None, limit: int) -> list[RangeEntry]:
        self._serve()
        return [self._entry(version) for version in self.store.scan(start, end, limit)]

    async def key_entries(self, keys: Sequence[bytes]) -> list[RangeEntry]:
        self._serve()
        return [self._entry(self.store.versions[key]) for key in keys if key in self.store.versions]


class FakeWitnessBackend:
    """A bare one-grant-per-epoch arbiter (no grace, no durability): enough to exercise the servicer."""

    def __init__(self) -> None:
        self.pairs: dict[str, PairState] = {}

    def _pair(self, pair: str) -> PairState:
        return self.pairs.setdefault(pair, PairState(pair, 1, PairMode.SYNC, ""))

    async def set_preferred(self, pair: str, site: str, preferred: str) -> ArbitrationOutcome:
        state = self._pair(pair)
        self.preferred = preferred
        return ArbitrationOutcome(True, state.epoch, state.mode, state.holder)

    async def arbitrate(self, pair: str, site: str, epoch: int, force: bool = False) -> ArbitrationOutcome:
        state = self._pair(pair)
        if force and not (state.mode is PairMode.SOLO and state.holder == site):
            self.pairs[pair] = PairState(pair, state.epoch + 1, PairMode.SOLO, site)
            return ArbitrationOutcome(True, state.epoch + 1, PairMode.SOLO, site)
        if state.mode is PairMode.SOLO and state.holder == site:
            return ArbitrationOutcome(True, state.epoch, state.mode, state.holder)
        if state.mode is PairMode.SYNC and epoch == state.epoch:
            self.pairs[pair] = PairState(pair, epoch + 1, PairMode.SOLO, site)
            return ArbitrationOutcome(True, epoch + 1, PairMode.SOLO, site)
        return ArbitrationOutcome(False, state.epoch, state.mode, state.holder)

    async def mark_synced(self, pair: str, site: str, epoch: int) -> ArbitrationOutcome:
        state = self._pair(pair)
        if state.mode is PairMode.SOLO and state.holder == site and state.epoch == epoch:
            self.pairs[pair] = PairState(pair, epoch + 1, PairMode.SYNC, "")
            return ArbitrationOutcome(True, epoch + 1, PairMode.SYNC, "")
        return ArbitrationOutcome(False, state.epoch, state.mode, state.holder)

    async def report(self, pair: str, site: str, epoch: int, holds_grant: bool, in_sync: bool) -> None:
        self.reports = getattr(self, "reports", [])
        self.reports.append((pair, site, epoch, holds_grant, in_sync))

    def status(self, pair: str | None) -> list[PairState]:
        if pair is not None:
            return [self.pairs[pair]] if pair in self.pairs else []
        return [self.pairs[name] for name in sorted(self.pairs)]


class ServerThread:
    """Real grpc.aio servers on 127.0.0.1 ephemeral ports, in an event loop on a background thread.

    For tests of blocking code (the sync Client, the CLI) against fake
    backends. Use as a context manager; every server started through it is
    stopped, and the thread joined, on exit.
    """

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-grpc-servers", daemon=True)
        self._servers: list[object] = []

    def __enter__(self) -> ServerThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.call(self._stop_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def call(self, coroutine: object) -> object:
        """Run a coroutine on the servers' loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)  # type: ignore[arg-type]

    def start_site(self, backend: FakeBackend, config: object = None, tls: object = None, s3: object = None) -> str:
        from replicator.api.server import start_site_server

        server = self.call(start_site_server(backend, "127.0.0.1:0", config, tls, s3))  # type: ignore[arg-type]
        self._servers.append(server)
        return server.address  # type: ignore[attr-defined,no-any-return]

    def start_witness(self, backend: FakeWitnessBackend, tls: object = None) -> str:
        from replicator.api.server import start_witness_server

        server = self.call(start_witness_server(backend, "127.0.0.1:0", tls))  # type: ignore[arg-type]
        self._servers.append(server)
        return server.address  # type: ignore[attr-defined,no-any-return]

    def stop_site(self, address: str) -> None:
        """Stop one server (the site 'crashes'): its port refuses connections."""
        for server in list(self._servers):
            if server.address == address:  # type: ignore[attr-defined]
                self.call(server.stop(0))  # type: ignore[attr-defined]
                self._servers.remove(server)

    async def _stop_all(self) -> None:
        for server in self._servers:
            await server.stop(0)  # type: ignore[attr-defined]
        self._servers.clear()


def fake_pair(thread: ServerThread) -> tuple[FakeBackend, FakeBackend, str, str]:
    """Two fake sites over one shared store, served on ephemeral ports: (a, b, address_a, address_b)."""
    store = FakeStore()
    a = FakeBackend("a", store, peer="b")
    b = FakeBackend("b", store, peer="a")
    address_a = thread.start_site(a)
    address_b = thread.start_site(b)
    a.peer_address, b.peer_address = address_b, address_a
    return a, b, address_a, address_b
