"""Online verify: the range-narrowing comparison on in-memory stores, then for real on a local deployment
(corrupt one site's copy of a key behind its back, find exactly that key, repair it, verify clean)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import wait_for

from replicator.api.backend import RangeEntry
from replicator.api.keys import object_key
from replicator.cli import EXIT_DIFFERENCES, EXIT_OK, main
from replicator.client import Client, ClientError
from replicator.daemon.verify import LocalSide, Verifier
from replicator.local import LocalCluster
from replicator.storage import MemoryStore, Store

BUCKET = "verify"

# ------------------------------------------------------------ the algorithm, on two memory stores


def fill(store: MemoryStore, count: int, ts: int = 100, prefix: bytes = b"k") -> None:
    batch = store.batch()
    for i in range(count):
        batch.apply(prefix + b"%06d" % i, ts, b"value-%d" % i)
    store.write(batch)


def put(store: MemoryStore, key: bytes, ts: int, value: bytes | None) -> None:
    batch = store.batch()
    batch.apply(key, ts, value)
    store.write(batch)


class Peer(LocalSide):
    """The peer's store seen through the same interface PeerSide offers (no gRPC)."""

    def __init__(self, store: MemoryStore, before_key_entries: Callable[[], None] | None = None) -> None:
        super().__init__(store)
        self.calls = 0
        self.before_key_entries = before_key_entries

    async def digests(self, ranges):  # type: ignore[no-untyped-def]
        self.calls += 1
        return await super().digests(ranges)

    async def entries(self, start, end, limit):  # type: ignore[no-untyped-def]
        self.calls += 1
        return await super().entries(start, end, limit)

    async def key_entries(self, keys) -> list[RangeEntry]:  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.before_key_entries is not None:
            self.before_key_entries()
        return await super().key_entries(keys)


def run_verify(local: MemoryStore, peer: Peer, **options: object) -> tuple[object, list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    options.setdefault("recheck_interval_s", 0.01)
    verifier = Verifier(LocalSide(local), peer, lambda d, t: seen.append((d, t)), **options)  # type: ignore[arg-type]
    return asyncio.run(verifier.run()), seen


def test_identical_replicas_match_by_digest_alone() -> None:
    a, b = MemoryStore(), MemoryStore()
    fill(a, 3000)
    fill(b, 3000)
    outcome, seen = run_verify(a, Peer(b))
    assert outcome.keys_compared == 3000 and outcome.differing_keys == []  # type: ignore[attr-defined]
    assert outcome.entries_compared == 0 and outcome.ranges_narrowed == 0  # type: ignore[attr-defined]
    assert seen[0] == (0, 3000) and seen[-1] == (3000, 3000)
    assert all(d <= t for d, t in seen)


def test_every_kind_of_difference_is_found_by_narrowing() -> None:
    a, b = MemoryStore(), MemoryStore()
    fill(a, 20000)
    fill(b, 20000)
    put(b, b"k000017", 200, b"changed at b")  # newer at b
    put(a, b"k004000", 200, b"changed at a")  # newer at a
    put(b, b"k010000", 200, None)  # deleted at b only
    put(b, b"k012345x", 150, b"only at b")  # extra key at b
    put(a, b"zz-only-at-a", 150, b"only at a")  # extra key at a, past the last key of b
    put(b, b"k019999", 100, b"same ts, other value")  # equal ts: LWW keeps b's value, so write it raw
    stored = b.raw_get("data", b"k019999")
    assert stored is not None
    b.raw_put("data", b"k019999", stored[:-1] + bytes([stored[-1] ^ 1]))  # corrupt bytes at rest
    expected = [b"k000017", b"k004000", b"k010000", b"k012345x", b"k019999", b"zz-only-at-a"]
    outcome, seen = run_verify(a, Peer(b))
    assert outcome.differing_keys == expected  # type: ignore[attr-defined]
    assert outcome.keys_compared >= 20000  # type: ignore[attr-defined]
    # Narrowing: only a small part of the key space was compared entry by entry.
    assert outcome.entries_compared < 20000 // 4, outcome  # type: ignore[attr-defined]
    assert seen[-1][0] == seen[-1][1]


def test_keys_only_at_the_peer_are_found_when_this_site_is_empty() -> None:
    a, b = MemoryStore(), MemoryStore()
    fill(b, 2500)
    outcome, _ = run_verify(a, Peer(b), page=100)
    assert len(outcome.differing_keys) == 2500 and outcome.keys_compared == 2500  # type: ignore[attr-defined]


def test_a_difference_that_goes_away_before_the_rechecks_is_not_reported() -> None:
    a, b = MemoryStore(), MemoryStore()
    fill(a, 1000)
    fill(b, 1000)
    put(a, b"k000500", 300, b"in flight")  # committed at a, not yet applied at b
    put(a, b"k000600", 300, b"lost")  # never reaches b

    def applied_at_b() -> None:
        put(b, b"k000500", 300, b"in flight")

    peer = Peer(b, before_key_entries=applied_at_b)
    outcome, _ = run_verify(a, peer)
    assert outcome.candidates == 2 and outcome.differing_keys == [b"k000600"]  # type: ignore[attr-defined]


# ------------------------------------------------------------ for real: processes, RocksDB, gRPC




def both_sync(endpoints: list[str]) -> bool:
    return all(Client([e]).status().state == "SYNC" for e in endpoints)


def verify(endpoint: str, repair: bool = False) -> tuple[object, list[tuple[int, int]]]:
    progress: list[tuple[int, int]] = []
    with Client([endpoint]) as client:
        report = client.verify(repair=repair, progress=lambda d, t: progress.append((d, t)))
    return report, progress


def test_verify_finds_and_repairs_a_key_changed_behind_the_sites_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with LocalCluster(tmp_path / "deploy") as cluster:
        cluster.start(sites=True)
        sites = cluster.cluster["sites"]
        endpoints = [sites["a"]["grpc"], sites["b"]["grpc"]]
        wait_for(lambda: both_sync(endpoints), 30, "both sites in SYNC")
        with Client(endpoints) as client:
            client.put_many(BUCKET, [(f"key-{i:05d}", b"value %d" % i) for i in range(2000)])
            client.create_volume("disk", 1 << 20)
            client.write_blocks("disk", 3, b"\x05" * 8192)
            client.delete(BUCKET, "key-00007")

        report, progress = verify(endpoints[0])
        assert report.differing_count == 0 and report.keys_compared >= 2003  # type: ignore[attr-defined]
        assert progress and progress[-1][0] == progress[-1][1] >= 2003
        assert main(["--endpoint", endpoints[0], "verify"]) == EXIT_OK
        capsys.readouterr()

        # Writes going on during verify: what is in flight is re-checked away, nothing reported.
        halt = threading.Event()
        done: list[int] = []

        def writer() -> None:
            with Client(endpoints) as client:
                i = 0
                while not halt.is_set():
                    client.put(BUCKET, f"key-{(i * 7) % 2000:05d}", b"rewritten %d" % i)
                    i += 1
                    done.append(i)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(done) > 10, 10, "writes to start")
            before = len(done)
            for endpoint in (endpoints[1], endpoints[0], endpoints[1]):
                report, _ = verify(endpoint)
                assert report.differing_count == 0  # type: ignore[attr-defined]
            assert len(done) > before  # writes went on meanwhile
        finally:
            halt.set()
            thread.join(10)

        # The operator commands this daemon refuses, with the reason.
        with Client([endpoints[0]]) as client:
            for action, phrase in (
                (lambda: client.failover(force=True), "FENCED, SUSPENDED or STARTING"),
                (lambda: client.resync(full=True), "not supported"),
                (lambda: client.resync(full=False), "in sync"),
            ):
                with pytest.raises(ClientError) as refused:
                    action()
                assert phrase in str(refused.value), str(refused.value)

        # Change one stored value at b behind the pair's back: newer ts, other bytes.
        victim = object_key(BUCKET.encode(), b"key-01234")
        cluster.stop_process("b")
        with pytest.raises(ClientError) as unreachable:
            verify(endpoints[0])
        assert "peer site b" in str(unreachable.value), str(unreachable.value)
        with Store.open(cluster.directory / "data" / "b" / "store") as store:
            current = store.get(victim)
            assert current is not None and current.value == b"value 1234"
            batch = store.batch()
            batch.apply(victim, current.ts + 2, b"tampered")
            store.write(batch)
            store.sync()
        cluster.start_process("b")
        wait_for(lambda: both_sync(endpoints), 40, "the pair back in SYNC")

        started = time.monotonic()
        report, _ = verify(endpoints[0])
        took = time.monotonic() - started
        assert list(report.differing_keys) == [victim] and report.repaired == 0  # type: ignore[attr-defined]
        assert took < 10
        assert main(["--endpoint", endpoints[0], "verify"]) == EXIT_DIFFERENCES
        assert "differs: object verify/key-01234" in capsys.readouterr().out

        report, _ = verify(endpoints[0], repair=True)
        assert list(report.differing_keys) == [victim] and report.repaired == 1  # type: ignore[attr-defined]
        report, _ = verify(endpoints[1])  # from the other side this time
        assert report.differing_count == 0  # type: ignore[attr-defined]
        assert main(["--endpoint", endpoints[0], "verify"]) == EXIT_OK
        with Client([endpoints[1]]) as client:
            assert client.get(BUCKET, "key-01234") == b"value 1234"  # a's version won


def test_verify_over_mutual_tls(tmp_path: Path) -> None:
    """The site calls its peer's RangeDigest/RangeEntries with its own certificate."""
    with LocalCluster(tmp_path / "deploy", tls=True) as cluster:
        cluster.start(sites=True)
        sites = cluster.cluster["sites"]
        endpoints = [sites["a"]["grpc"], sites["b"]["grpc"]]
        tls = cluster.client_tls
        wait_for(lambda: all(Client([e], tls=tls).status().state == "SYNC" for e in endpoints), 30, "SYNC")
        with Client(endpoints, tls=tls) as client:
            client.put_many(BUCKET, [(f"t-{i}", b"tls %d" % i) for i in range(200)])
        with Client([endpoints[1]], tls=tls) as client:
            report = client.verify()
        assert report.differing_count == 0 and report.keys_compared >= 200


def test_a_never_written_tombstone_left_by_a_resync_is_no_difference() -> None:
    """Operator trial finding 7: after a forced failover and a full resync the target held a ts-0
    tombstone (a dirty key the source never had) and verify reported it forever. It reads as absent
    and loses to every write: verify treats it as no entry. A real tombstone still differs."""
    a, b = MemoryStore(), MemoryStore()
    fill(a, 1000)
    fill(b, 1000)
    put(b, b"solo-b", 0, None)
    outcome, _ = run_verify(a, Peer(b))
    assert outcome.differing_keys == []  # type: ignore[attr-defined]
    put(b, b"solo-b2", 5, None)  # a tombstone of a real delete, at b only
    outcome, _ = run_verify(a, Peer(b))
    assert outcome.differing_keys == [b"solo-b2"]  # type: ignore[attr-defined]
