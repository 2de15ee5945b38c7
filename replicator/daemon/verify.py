"""Online verify (DESIGN.md section 5): compare the two replicas by key range while the pair serves.

The initiating site (`SiteDaemon.verify`) drives a `Verifier` over two sides
with the same shape: `LocalSide` (its own store, read in worker threads) and
`PeerSide` (the peer's store through the internal admin RPCs RangeDigest and
RangeEntries at `site.peer_grpc_address`).

1. Split the whole key space into `top_parts` ranges holding about as many
   keys each (`Store.split_range`, local keys), and get both sides' digests
   of every range (one RangeDigest call; the digests are order-independent
   sums over (key, ts, tombstone, CRC32C), see docs/storage.md).
2. A range whose (count, digest) differ is narrowed: split again into
   `fanout` parts, digests of the parts compared, recursively, until a range
   holds at most `leaf_keys` keys (or `depth_max` levels, or it cannot be
   split any more: the keys are on the peer only).
3. A narrowed range is compared entry by entry (key, ts, tombstone, stored
   CRC; no values travel), paged on both sides and merged in key order.
4. Writes in flight make the replicas differ for a moment (the origin commits
   and applies before the peer applies), and the two sides read at slightly
   different times. So every key found differing is checked again
   `rechecks` times, `recheck_interval_s` apart; it is reported only if it
   differed every time.

`keys_compared` counts the keys covered (a range whose digests match counts
its keys). Progress is reported in keys: `total` is the larger of the two
sides' counts over the top ranges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from replicator.api import errors
from replicator.api.admin import ENTRIES_LIMIT_MAX, entry_from_message, key_range_message
from replicator.api.backend import RangeEntry
from replicator.client._common import CHANNEL_OPTIONS, channel_credentials
from replicator.config import TlsFiles
from replicator.storage import _format as fmt
from replicator.storage.base import BaseStore
from replicator.v1 import admin_pb2, admin_pb2_grpc

KeyRange = tuple[bytes, bytes | None]

# ------------------------------------------------------------ reading a store (worker threads)


def entry_of(key: bytes, stored: bytes) -> RangeEntry:
    """What verify compares of one stored data entry (no value: the stored CRC stands for it)."""
    if fmt.decode_value(key, stored) is None:
        return RangeEntry(key, 0, False, 0, corrupt=True)
    flags, ts, crc = fmt.VALUE_HEADER.unpack_from(stored)
    return RangeEntry(key, ts, bool(flags & fmt.TOMBSTONE_BIT), crc)


def store_digests(store: BaseStore, ranges: Sequence[KeyRange]) -> list[tuple[int, bytes]]:
    return [store.range_digest(start, end) for start, end in ranges]


def store_entries(store: BaseStore, start: bytes, end: bytes | None, limit: int) -> list[RangeEntry]:
    """Up to `limit` entries with start <= key < end, in key order; corrupt ones flagged, not raised."""
    found: list[RangeEntry] = []
    if limit <= 0:
        return found
    for key, stored in store._items(fmt.DATA, start, end):
        found.append(entry_of(key, stored))
        if len(found) >= limit:
            break
    return found


def store_key_entries(store: BaseStore, keys: Iterable[bytes]) -> list[RangeEntry]:
    found = []
    for key in keys:
        stored = store._engine_get(fmt.DATA, key)
        if stored is not None:
            found.append(entry_of(key, stored))
    return found


# ------------------------------------------------------------ the two sides


class LocalSide:
    """This site's store; every loop over it runs in a worker thread."""

    def __init__(self, store: BaseStore) -> None:
        self.store = store

    async def split(self, start: bytes, end: bytes | None, parts: int) -> list[KeyRange]:
        return await asyncio.to_thread(self.store.split_range, start, end, parts)

    async def digests(self, ranges: Sequence[KeyRange]) -> list[tuple[int, bytes]]:
        return await asyncio.to_thread(store_digests, self.store, ranges)

    async def entries(self, start: bytes, end: bytes | None, limit: int) -> list[RangeEntry]:
        return await asyncio.to_thread(store_entries, self.store, start, end, limit)

    async def key_entries(self, keys: Sequence[bytes]) -> list[RangeEntry]:
        return await asyncio.to_thread(store_key_entries, self.store, keys)


class PeerSide:
    """The peer's store through its admin service (RangeDigest, RangeEntries)."""

    def __init__(self, peer: str, address: str, tls: TlsFiles | None, call_timeout_s: float = 120.0) -> None:
        self.peer = peer
        self.address = address
        self.call_timeout_s = call_timeout_s
        # A channel of its own (not gRPC's global subchannel pool): a connection that failed while
        # the peer was down would otherwise fail this verify fast until its reconnect backoff ends.
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        if tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(address, channel_credentials(tls), options=options)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    def _failed(self, what: str, error: grpc.RpcError) -> errors.Unavailable:
        code = error.code().name if hasattr(error, "code") and error.code() is not None else "?"
        details = error.details() if hasattr(error, "details") else str(error)
        return errors.Unavailable(
            f"verify needs the peer site {self.peer} at {self.address}: {what} failed: {code}: {details}", ""
        )

    async def digests(self, ranges: Sequence[KeyRange]) -> list[tuple[int, bytes]]:
        request = admin_pb2.RangeDigestRequest(ranges=[key_range_message(s, e) for s, e in ranges])
        try:
            answer = await self.stub.RangeDigest(request, timeout=self.call_timeout_s)
        except grpc.RpcError as error:
            raise self._failed("RangeDigest", error) from None
        if len(answer.digests) != len(ranges):
            raise errors.Unavailable(f"verify: peer {self.peer} answered {len(answer.digests)} digests", "")
        return [(d.count, d.digest) for d in answer.digests]

    async def entries(self, start: bytes, end: bytes | None, limit: int) -> list[RangeEntry]:
        request = admin_pb2.RangeEntriesRequest(range=key_range_message(start, end), limit=limit)
        try:
            answer = await self.stub.RangeEntries(request, timeout=self.call_timeout_s)
        except grpc.RpcError as error:
            raise self._failed("RangeEntries", error) from None
        return [entry_from_message(e) for e in answer.entries]

    async def key_entries(self, keys: Sequence[bytes]) -> list[RangeEntry]:
        request = admin_pb2.RangeEntriesRequest(keys=list(keys))
        try:
            answer = await self.stub.RangeEntries(request, timeout=self.call_timeout_s)
        except grpc.RpcError as error:
            raise self._failed("RangeEntries", error) from None
        return [entry_from_message(e) for e in answer.entries]


# ------------------------------------------------------------ the comparison


@dataclass
class VerifyOutcome:
    keys_compared: int = 0
    differing_keys: list[bytes] = field(default_factory=list)
    ranges_narrowed: int = 0
    entries_compared: int = 0  # keys compared entry by entry (the rest matched by digest)
    candidates: int = 0  # keys found differing once, before the re-checks


class Verifier:
    def __init__(
        self,
        local: LocalSide,
        peer: PeerSide,
        progress: Callable[[int, int], None],
        *,
        top_parts: int = 64,
        fanout: int = 16,
        leaf_keys: int = 512,
        depth_max: int = 8,
        page: int = 1000,
        rechecks: int = 3,
        recheck_interval_s: float = 0.2,
        concurrency: int = 4,
    ) -> None:
        assert page <= ENTRIES_LIMIT_MAX
        self.local = local
        self.peer = peer
        self.progress = progress
        self.top_parts = top_parts
        self.fanout = fanout
        self.leaf_keys = leaf_keys
        self.depth_max = depth_max
        self.page = page
        self.rechecks = rechecks
        self.recheck_interval_s = recheck_interval_s
        self.semaphore = asyncio.Semaphore(concurrency)
        self.outcome = VerifyOutcome()
        self.candidates: set[bytes] = set()
        self.done = 0
        self.total = 0

    def _advance(self, keys: int) -> None:
        self.done += keys
        self.total = max(self.total, self.done)
        self.progress(self.done, self.total)

    async def run(self) -> VerifyOutcome:
        top = await self.local.split(b"", None, self.top_parts)
        local, remote = await asyncio.gather(self.local.digests(top), self.peer.digests(top))
        self.total = sum(max(mine[0], theirs[0]) for mine, theirs in zip(local, remote, strict=True))
        self.progress(0, self.total)
        work = []
        matched = 0
        for key_range, mine, theirs in zip(top, local, remote, strict=True):
            if mine == theirs:
                matched += mine[0]
            else:
                work.append(self._narrow(key_range, max(mine[0], theirs[0]), 0))
        self.outcome.keys_compared += matched
        self._advance(matched)
        await asyncio.gather(*work)
        self.outcome.candidates = len(self.candidates)
        self.outcome.differing_keys = await self._recheck(sorted(self.candidates))
        self.progress(self.total, self.total)
        return self.outcome

    async def _narrow(self, key_range: KeyRange, keys: int, depth: int) -> None:
        start, end = key_range
        self.outcome.ranges_narrowed += 1
        if keys > self.leaf_keys and depth < self.depth_max:
            async with self.semaphore:
                parts = await self.local.split(start, end, self.fanout)
                if len(parts) >= 2:
                    local, remote = await asyncio.gather(self.local.digests(parts), self.peer.digests(parts))
            if len(parts) >= 2:
                work = []
                matched = 0
                for part, mine, theirs in zip(parts, local, remote, strict=True):
                    if mine == theirs:
                        matched += mine[0]
                    else:
                        work.append(self._narrow(part, max(mine[0], theirs[0]), depth + 1))
                self.outcome.keys_compared += matched
                self._advance(matched)
                await asyncio.gather(*work)
                return
        async with self.semaphore:
            compared = await self._compare_entries(start, end)
        self._advance(compared)

    async def _compare_entries(self, start: bytes, end: bytes | None) -> int:
        """Merge both sides' entries of [start, end) page by page; returns the keys compared."""
        compared = 0
        cursor = start
        while True:
            local, remote = await asyncio.gather(
                self.local.entries(cursor, end, self.page), self.peer.entries(cursor, end, self.page)
            )
            # Compare only up to the smaller of the two pages' last keys when a page is full.
            upto: bytes | None = None
            if len(local) >= self.page:
                upto = local[-1].key
            if len(remote) >= self.page and (upto is None or remote[-1].key < upto):
                upto = remote[-1].key
            mine = {e.key: e.identity for e in local if (upto is None or e.key <= upto) and not _never_written(e)}
            theirs = {e.key: e.identity for e in remote if (upto is None or e.key <= upto) and not _never_written(e)}
            for key in mine.keys() | theirs.keys():
                if mine.get(key) != theirs.get(key):
                    self.candidates.add(key)
            keys = len(mine.keys() | theirs.keys())
            compared += keys
            self.outcome.keys_compared += keys
            self.outcome.entries_compared += keys
            if upto is None:
                return compared
            cursor = upto + b"\x00"

    async def _recheck(self, keys: list[bytes]) -> list[bytes]:
        """The keys that still differ after every re-check."""
        for _ in range(self.rechecks):
            if not keys:
                break
            await asyncio.sleep(self.recheck_interval_s)
            still: list[bytes] = []
            for index in range(0, len(keys), ENTRIES_LIMIT_MAX):
                chunk = keys[index : index + ENTRIES_LIMIT_MAX]
                local, remote = await asyncio.gather(self.local.key_entries(chunk), self.peer.key_entries(chunk))
                mine = {e.key: e.identity for e in local if not _never_written(e)}
                theirs = {e.key: e.identity for e in remote if not _never_written(e)}
                still.extend(key for key in chunk if mine.get(key) != theirs.get(key))
            keys = still
        return keys


def _never_written(entry: RangeEntry) -> bool:
    """A tombstone at ts 0: what a resync ships for a dirty key the source never held. It loses to
    every write (last writer wins on ts) and reads as absent, so it is the same as no entry at all."""
    return entry.tombstone and entry.ts == 0 and not entry.corrupt


__all__ = [
    "LocalSide",
    "PeerSide",
    "Verifier",
    "VerifyOutcome",
    "entry_of",
    "store_digests",
    "store_entries",
    "store_key_entries",
]
