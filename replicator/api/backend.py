"""The interface between the gRPC servicers and a site: `SiteBackend`.

The servicers (objects.py, blocks.py, admin.py) translate requests into
operations on opaque byte keys (layout in keys.py) and call a SiteBackend;
they know nothing of the protocol or the storage. The daemon implements
SiteBackend over the real core and storage; `replicator.api.fake.FakeBackend`
implements it in memory for tests.

Contract (what every implementation must guarantee):

* `write(operations, request_id, timeout_s)` applies all `operations`
  atomically as ONE record (all or nothing, one ts for all), and returns only
  when the record is committed (durable at both sites, or at the survivor
  holding the witness's grant). Keys within one call are distinct.
  Exactly once: if `request_id` was already applied (at this site or the
  peer: request ids travel inside records) the write is not applied again and
  the ORIGINAL ts comes back with `duplicate=True`; if that record is still
  prepared, wait for its outcome. Dedup entries live at least
  `site.dedup_age_ms`.
  Errors: `Unavailable` (this site cannot commit now; nothing applied),
  `OutcomeUnknown` (timeout_s ran out, the record may commit later),
  `InvalidRequest` (e.g. the record would exceed the frame size).
* `read(key, timeout_s)` returns the visible version of `key`, or None if the
  key has never been written. A tombstone may come back as a Versioned with
  value None; the servicers treat it as absent. Linearizable (DESIGN.md 4,
  read path): waits for a prepared record on that key, bounded by timeout_s,
  then raises `OutcomeUnknown`. `Unavailable` when the site may not serve
  reads (no lease, fenced); `Corrupt` when the stored value fails its CRC
  and read-repair was impossible.
* `scan(start, end, limit, timeout_s)` returns, in ascending key order, at
  most `limit` visible versions with start <= key < end (end None: no upper
  bound). Tombstones MAY be included (value None) and count towards limit;
  the servicers skip them and paginate on the last key returned, so a page
  full of tombstones still makes progress. Each key's version is
  linearizable on its own; the scan as a whole need not be a snapshot.
  Same errors as read.
* `status()` is synchronous, cheap and never raises: it is polled for
  health checks.
* `verify(repair, progress)` compares the two replicas, calling
  `progress(done, total)` as it goes (from the event loop thread, cheap),
  and returns a VerifyReport. `Unavailable` if the peer is not reachable.
* `resync(full)`, `switchover()`, `failover(force)` start the corresponding
  admin action and return when it is accepted (not necessarily finished;
  progress shows in status()). They raise `Unavailable` / `InvalidRequest`
  with a message the operator will read when refused in the current state.
  `failover(force=True)` is called only after the operator confirmed; the
  servicer refuses force=False itself.
* `range_digests(ranges)` and `range_entries(start, end, limit)` /
  `key_entries(keys)` serve the PEER's online verify (the internal admin
  RPCs RangeDigest and RangeEntries): this site's stored state, read-only,
  never blocking the event loop for long. `range_digests` returns one
  `(count, 16-byte digest)` per `(start, end)` range (end None: unbounded),
  as `Store.range_digest` defines them; `range_entries` at most `limit`
  `RangeEntry`s with start <= key < end in key order; `key_entries` the
  entries of those of `keys` that are stored (tombstones included).

Timestamps: the servicers put `ts` in uint64 fields; a backend's ts must be
below 2**64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from replicator.core.records import Operation, Versioned

__all__ = [
    "DEGRADED",
    "HEALTHY",
    "NOT_SERVING",
    "RangeEntry",
    "SiteBackend",
    "SiteStatus",
    "VerifyReport",
    "WriteResult",
    "health_of",
]


@dataclass(frozen=True, slots=True)
class WriteResult:
    ts: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class SiteStatus:
    """A snapshot of one site, as the admin API and health checks show it."""

    site: str
    peer: str
    state: str  # STARTING, SYNC, SUSPENDED, SOLO, FENCED, RESYNC_SOURCE, RESYNC_TARGET
    epoch: int
    pair: str = ""
    role: str = ""
    peer_reachable: bool = False
    witness_reachable: bool = False
    lag_records: int = 0
    lag_bytes: int = 0
    dirty_keys: int = 0
    resync_progress: tuple[int, int] = (0, 0)  # (done, total) keys
    preferred: str = ""  # name of the preferred site, "" if none
    peer_address: str = ""  # the peer's gRPC address, when known
    details: dict[str, str] = field(default_factory=dict)
    # Why the site is in `state` (the reason of its last role change) and since when (Unix ms).
    state_reason: str = ""
    state_since_ms: int = 0
    started_ms: int = 0  # when the process started (Unix ms)
    version: str = ""  # the daemon's software version
    # The resync this site takes part in: "incremental" or "full" ("" none), its rate and estimated end.
    resync_kind: str = ""
    resync_rate_keys_per_s: float = 0.0
    resync_eta_s: float = 0.0
    # The preferred site as the witness holds it (a switchover changes it), "" if not heard or none.
    witness_preferred: str = ""
    draining: bool = False  # `replicatorctl drain`: the site refuses new client requests

    @property
    def serving(self) -> bool:
        """Whether the data API should report SERVING in health checks (RESYNC_SOURCE serves too)."""
        return self.state in ("SYNC", "SOLO", "RESYNC_SOURCE") and not self.draining


HEALTHY, DEGRADED, NOT_SERVING = "healthy", "degraded", "not_serving"


def health_of(status: SiteStatus) -> tuple[str, list[str]]:
    """Classify a site for health checks: (HEALTHY | DEGRADED | NOT_SERVING, the reasons).

    HEALTHY: serving in SYNC with the peer and the witness reachable. DEGRADED: serving, but
    without redundancy or without the witness (SOLO, a resync running, the witness unreachable),
    so one more fault stops service. NOT_SERVING: clients get UNAVAILABLE from this site."""
    reasons: list[str] = []
    if not status.serving:
        why = f"site {status.site} is {status.state}" + (f" ({status.state_reason})" if status.state_reason else "")
        if status.draining:
            why = f"site {status.site} is draining (planned maintenance)"
        return NOT_SERVING, [why]
    if status.state != "SYNC":
        reasons.append(f"site {status.site} is {status.state}: the pair has one up-to-date copy")
    if not status.peer_reachable:
        reasons.append(f"peer {status.peer} unreachable")
    if not status.witness_reachable:
        reasons.append("witness unreachable: no failover is possible")
    return (DEGRADED if reasons else HEALTHY), reasons


@dataclass(frozen=True, slots=True)
class VerifyReport:
    keys_compared: int
    differing_keys: tuple[bytes, ...] = ()  # raw storage keys (keys.py layout)
    repaired: int = 0


@dataclass(frozen=True, slots=True)
class RangeEntry:
    """One stored entry as verify compares it: no value, only what identifies it."""

    key: bytes
    ts: int
    tombstone: bool = False
    crc: int = 0  # the stored CRC32C: covers key, ts, flags and value
    corrupt: bool = False  # the stored bytes fail their check

    @property
    def identity(self) -> tuple[int, bool, int, bool]:
        return (self.ts, self.tombstone, self.crc, self.corrupt)


@runtime_checkable
class SiteBackend(Protocol):
    site_name: str

    async def write(self, operations: Sequence[Operation], request_id: bytes, timeout_s: float) -> WriteResult: ...

    async def read(self, key: bytes, timeout_s: float) -> Versioned | None: ...

    async def scan(self, start: bytes, end: bytes | None, limit: int, timeout_s: float) -> list[Versioned]: ...

    def status(self) -> SiteStatus: ...

    async def verify(self, repair: bool, progress: Callable[[int, int], None]) -> VerifyReport: ...

    async def resync(self, full: bool) -> None: ...

    async def switchover(self) -> None: ...

    async def failover(self, force: bool) -> None: ...

    async def range_digests(self, ranges: Sequence[tuple[bytes, bytes | None]]) -> list[tuple[int, bytes]]: ...

    async def range_entries(self, start: bytes, end: bytes | None, limit: int) -> list[RangeEntry]: ...

    async def key_entries(self, keys: Sequence[bytes]) -> list[RangeEntry]: ...
