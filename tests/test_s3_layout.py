"""The stored layout of objects (replicator/api/pieces.py), in process over the in-memory backend.

A body up to `inline_bytes_max` is inline in its manifest; one up to
`piece_bytes` is one piece written in the manifest's own record (the manifest
stays small); a larger one is pieces written first. Checked here: which layout
each size gets and that each is one record where it should be; that manifests
in the old layout (every body up to piece_bytes inline, or any size written
directly) are still read, listed, overwritten, deleted and swept; that every
overwrite between layouts and every delete leaves no piece or owner record
behind once the sweep ran; that a one-piece body refused or retried writes
nothing; that HEAD and listings never read a piece; and that an S3 GET of an
object replaced between its manifest and its piece answers the new object.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from replicator.api import errors, pieces
from replicator.api.fake import FakeBackend
from replicator.core.records import Operation, Versioned
from replicator.s3.errors import S3Error
from replicator.s3.store import ObjectStore

PIECE = 64 * 1024
INLINE = 16 * 1024
LIMITS = pieces.StoreLimits(
    piece_bytes=PIECE,
    object_bytes_max=8 * PIECE,
    part_bytes_min=PIECE,
    parts_max=10_000,
    pieces_inflight_max=4,
    garbage_age_ms=0,
    timeout_s=5.0,
    inline_bytes_max=INLINE,
)


class CountingBackend(FakeBackend):
    """A FakeBackend that records every key it reads and every range it scans."""

    def __init__(self) -> None:
        super().__init__("a")
        self.reads: list[bytes] = []
        self.scans: list[tuple[bytes, bytes | None]] = []

    async def read(self, key: bytes, timeout_s: float) -> Versioned | None:
        self.reads.append(key)
        return await super().read(key, timeout_s)

    async def scan(self, start: bytes, end: bytes | None, limit: int, timeout_s: float) -> list[Versioned]:
        self.scans.append((start, end))
        return await super().scan(start, end, limit, timeout_s)

    def piece_reads(self) -> list[bytes]:
        return [k for k in self.reads if k.startswith(pieces.PIECE)] + [
            s
            for s, e in self.scans
            if s.startswith(pieces.PIECE) or (s < pieces.PIECE and (e is None or e > pieces.PIECE))
        ]


def live(backend: FakeBackend, prefix: bytes) -> list[bytes]:
    return sorted(k for k, v in backend.store.versions.items() if v.value is not None and k.startswith(prefix))


def body(size: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"{seed}:{size}".encode()).digest(size) if size else b""


async def settle(store: pieces.PieceStore) -> None:
    """Let the spawned frees finish."""
    while store.background:
        await asyncio.gather(*list(store.background), return_exceptions=True)


async def read_all(store: pieces.PieceStore, bucket: str, key: str) -> bytes:
    manifest = await store.manifest(bucket, key)
    assert manifest is not None, key
    return b"".join([chunk async for chunk in store.read_range(manifest, 0, manifest.size)])


async def write_old_inline(backend: FakeBackend, bucket: str, key: str, data: bytes) -> None:
    """A manifest as the earlier code wrote every body up to piece_bytes: M1, the body inline."""
    manifest = pieces.Manifest(len(data), hashlib.md5(data).hexdigest(), pieces.now_ms(), {}, {}, [], data)
    await backend.write([Operation(pieces.object_key(bucket, key), manifest.encode())], os.urandom(16), 5.0)


def new_store() -> tuple[CountingBackend, ObjectStore]:
    backend = CountingBackend()
    return backend, ObjectStore(backend, LIMITS)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@pytest.mark.parametrize(
    ("size", "layout"),
    [
        (0, "inline"),
        (100, "inline"),
        (INLINE, "inline"),
        (INLINE + 1, "one piece"),
        (PIECE, "one piece"),
        (PIECE + 1, "pieces"),
        (3 * PIECE + 5, "pieces"),
    ],
)
def test_each_size_gets_its_layout_and_reads_back(size: int, layout: str) -> None:
    async def scenario() -> None:
        backend, store = new_store()
        await store.create_bucket("bkt")
        data = body(size)
        records_before = backend.store.records_applied
        manifest = await store.put("bkt", "k", pieces.BytesBody(data), {}, {})
        records = backend.store.records_applied - records_before
        raw = backend.store.versions[pieces.object_key("bkt", "k")].value
        assert raw is not None
        if layout == "inline":
            assert (manifest.segments, manifest.inline, records) == ([], data, 1)
            assert live(backend, pieces.PIECE) == [] and live(backend, pieces.OWNER) == []
            assert raw.endswith(data)
        else:
            # The manifest names the data id and holds no body: a few hundred bytes, whatever the size.
            assert manifest.inline == b"" and len(manifest.segments) == 1 and len(raw) < 512, len(raw)
            data_id = manifest.segments[0].data_id
            assert live(backend, pieces.OWNER) == [pieces.owner_key(data_id)]
            assert live(backend, pieces.PIECE) == [pieces.piece_key(data_id, i) for i in range(-(-size // PIECE))]
            if layout == "one piece":
                assert records == 1  # owner, piece and manifest: one record, as an inline put was
        assert await read_all(store, "bkt", "k") == data
        assert (await store.head("bkt", "k")).etag == hashlib.md5(data).hexdigest()

    run(scenario())


def test_inline_bytes_max_is_capped_at_piece_bytes_and_refused_below_zero() -> None:
    async def scenario() -> None:
        backend = FakeBackend()
        limits = pieces.StoreLimits(1024, 8192, 1024, 100, 4, 0, 5.0, inline_bytes_max=1 << 20)
        store = ObjectStore(backend, limits)
        await store.create_bucket("bkt")
        await store.put("bkt", "k", pieces.BytesBody(body(1024)), {}, {})
        assert (await store.head("bkt", "k")).inline == body(1024)
        await store.put("bkt", "k", pieces.BytesBody(body(1025)), {}, {})
        assert len((await store.head("bkt", "k")).segments) == 1

    run(scenario())
    with pytest.raises(ValueError, match="inline_bytes_max: must be at least 0, got -1"):
        pieces.StoreLimits(PIECE, PIECE, PIECE, 1, 1, 0, 1.0, inline_bytes_max=-1)


@pytest.mark.parametrize("size", [INLINE + 1, PIECE, 3 * PIECE])
def test_old_inline_manifests_of_any_size_are_read_listed_overwritten_deleted_and_swept(size: int) -> None:
    async def scenario() -> None:
        backend, store = new_store()
        await store.create_bucket("bkt")
        old = {name: body(size, seed) for seed, name in enumerate(("a", "b", "c"))}
        for name, data in old.items():
            await write_old_inline(backend, "bkt", name, data)
        for name, data in old.items():
            manifest = await store.head("bkt", name)
            assert (manifest.size, manifest.segments, manifest.etag) == (size, [], hashlib.md5(data).hexdigest())
            assert await read_all(store, "bkt", name) == data
            middle = b"".join([c async for c in store.read_range(manifest, size // 3, size // 2)])
            assert middle == data[size // 3 : size // 2]
        listed = await store.list_range("bkt", "", b"", 10)
        assert [(item.key, item.manifest.size) for item in listed] == [("a", size), ("b", size), ("c", size)]
        # An overwrite into the new layout, a delete, and an untouched one: nothing is left but what is live.
        await store.put("bkt", "a", pieces.BytesBody(body(PIECE, 9)), {}, {})
        await store.delete("bkt", "b")
        await settle(store)
        assert await store.collect_garbage() == 0
        assert await read_all(store, "bkt", "a") == body(PIECE, 9)
        assert await read_all(store, "bkt", "c") == old["c"]
        assert await store.manifest("bkt", "b") is None
        data_id = (await store.head("bkt", "a")).segments[0].data_id
        assert live(backend, pieces.OWNER) == [pieces.owner_key(data_id)]
        assert live(backend, pieces.PIECE) == [pieces.piece_key(data_id, 0)]

    run(scenario())


SIZES = {"inline": 100, "one piece": PIECE, "pieces": 3 * PIECE + 1, "old inline": PIECE}


@pytest.mark.parametrize("before", list(SIZES))
@pytest.mark.parametrize("after", ["inline", "one piece", "pieces", "delete"])
def test_an_overwrite_or_delete_between_layouts_leaves_only_what_is_live(before: str, after: str) -> None:
    async def scenario() -> None:
        backend, store = new_store()
        await store.create_bucket("bkt")
        if before == "old inline":
            await write_old_inline(backend, "bkt", "k", body(SIZES[before]))
        else:
            await store.put("bkt", "k", pieces.BytesBody(body(SIZES[before])), {}, {})
        old = await store.head("bkt", "k")
        if after == "delete":
            await store.delete("bkt", "k")
        else:
            await store.put("bkt", "k", pieces.BytesBody(body(SIZES[after], 1)), {}, {})
        if old.segments and old.segments[0].pieces == 1:
            # A one-piece segment goes in the record that replaced it, not after it.
            assert not live(backend, pieces.PIECE + old.segments[0].data_id)
            assert pieces.owner_key(old.segments[0].data_id) not in live(backend, pieces.OWNER)
        await settle(store)
        assert await store.collect_garbage() == 0  # the frees left nothing for the sweep
        current = await store.manifest("bkt", "k")
        expected_pieces: list[bytes] = []
        expected_owners: list[bytes] = []
        if after == "delete":
            assert current is None
        else:
            assert current is not None and await read_all(store, "bkt", "k") == body(SIZES[after], 1)
            for segment in current.segments:
                expected_owners.append(pieces.owner_key(segment.data_id))
                expected_pieces += [pieces.piece_key(segment.data_id, i) for i in range(segment.pieces)]
        assert live(backend, pieces.PIECE) == sorted(expected_pieces)
        assert live(backend, pieces.OWNER) == sorted(expected_owners)

    run(scenario())


def test_head_and_listings_read_no_piece() -> None:
    async def scenario() -> None:
        backend, store = new_store()
        await store.create_bucket("bkt")
        for index, size in enumerate((100, INLINE + 1, PIECE, 3 * PIECE)):
            await store.put("bkt", f"k{index}", pieces.BytesBody(body(size)), {}, {})
        backend.reads.clear()
        backend.scans.clear()
        for index in range(4):
            await store.head("bkt", f"k{index}")
        assert [m.manifest.size for m in await store.list_range("bkt", "k", b"", 1000)] == [
            100,
            INLINE + 1,
            PIECE,
            3 * PIECE,
        ]
        assert len(backend.reads) == 4 and backend.piece_reads() == []
        # The counter does count pieces: a GET of the one-piece object reads its manifest and its piece.
        assert await read_all(store, "bkt", "k2") == body(PIECE)
        assert len(backend.piece_reads()) == 1

    run(scenario())


def test_a_refused_or_retried_one_piece_put_writes_nothing() -> None:
    async def scenario() -> None:
        backend, store = new_store()
        await store.create_bucket("bkt")
        data = body(PIECE)
        before = dict(backend.store.versions)

        def refuse(old: pieces.Manifest | None) -> None:
            raise S3Error("PreconditionFailed", "planted", 412)

        with pytest.raises(S3Error, match="planted"):
            await store.put("bkt", "k", pieces.BytesBody(data), {}, {}, check=refuse)
        with pytest.raises(S3Error, match="BadDigest"):
            await store.put("bkt", "k", pieces.BytesBody(data), {}, {}, content_md5="0" * 32)
        assert backend.store.versions == before and not store.background  # nothing written, nothing to free
        request_id = os.urandom(16)
        _, first = await store.put_object("bkt", "k", pieces.BytesBody(data), PIECE, request_id=request_id)
        writes = backend.store.records_applied
        _, again = await store.put_object("bkt", "k", pieces.BytesBody(data), PIECE, request_id=request_id)
        assert (again.duplicate, again.ts, backend.store.records_applied) == (True, first.ts, writes)
        assert not store.background  # the duplicate's piece was never written: no free to spawn
        assert len(live(backend, pieces.PIECE)) == 1 and len(live(backend, pieces.OWNER)) == 1
        assert await read_all(store, "bkt", "k") == data

    run(scenario())


def test_small_parts_are_one_record_each_and_their_object_reads_back() -> None:
    async def scenario() -> None:
        backend, store = new_store()
        await store.create_bucket("bkt")
        upload = await store.get_upload("bkt", "mp", await store.create_upload("bkt", "mp", {}, {}))
        records_before = backend.store.records_applied
        first = await store.upload_part(upload, 1, pieces.BytesBody(body(PIECE, 1)), None)
        assert backend.store.records_applied - records_before == 1
        last = await store.upload_part(upload, 2, pieces.BytesBody(body(10, 2)), None)
        replaced = await store.upload_part(upload, 2, pieces.BytesBody(body(20, 3)), None)  # the old part 2 is freed
        empty_upload = await store.get_upload("bkt", "empty", await store.create_upload("bkt", "empty", {}, {}))
        empty = await store.upload_part(empty_upload, 1, pieces.BytesBody(b""), None)
        manifest = await store.complete_upload(upload, [(1, first.md5), (2, replaced.md5)])
        assert manifest.parts == 2 and manifest.data_ids() == {first.data_id, replaced.data_id}
        assert last.data_id != replaced.data_id
        assert await read_all(store, "bkt", "mp") == body(PIECE, 1) + body(20, 3)
        assert (await store.complete_upload(empty_upload, [(1, empty.md5)])).size == 0
        assert await read_all(store, "bkt", "empty") == b""
        await settle(store)
        assert await store.collect_garbage() == 0
        assert live(backend, pieces.OWNER) == sorted(pieces.owner_key(d) for d in (first.data_id, replaced.data_id))
        await store.delete("bkt", "mp")
        await settle(store)
        assert live(backend, pieces.PIECE) == [] and live(backend, pieces.OWNER) == []

    run(scenario())


def test_a_copy_of_a_one_piece_object_is_its_own_piece() -> None:
    async def scenario() -> None:
        backend, store = new_store()
        await store.create_bucket("bkt")
        source = await store.put("bkt", "src", pieces.BytesBody(body(PIECE)), {}, {})
        copied = await store.put("bkt", "dst", pieces.IteratorBody(store.read_range(source, 0, source.size)), {}, {})
        assert copied.data_ids().isdisjoint(source.data_ids()) and copied.etag == source.etag
        await store.delete("bkt", "src")
        await settle(store)
        assert await read_all(store, "bkt", "dst") == body(PIECE)

    run(scenario())


def test_collect_garbage_frees_the_loser_of_two_concurrent_one_piece_overwrites() -> None:
    """Two sites overwrite one key at once: both read the same old manifest; the last writer's stays and
    the other's piece, written in its manifest's record, is left for the sweep."""

    async def scenario() -> None:
        backend, store = new_store()
        other = ObjectStore(FakeBackend("b", backend.store, peer="a"), LIMITS)  # the other site, its own locks
        await store.create_bucket("bkt")
        await store.put("bkt", "k", pieces.BytesBody(body(PIECE, 0)), {}, {})
        old = await store.head("bkt", "k")
        # Both overwrites read the old manifest before either writes (held at the write).
        gate = asyncio.Event()
        arrived = 0
        real_write = FakeBackend.write

        async def held_write(
            self: FakeBackend, operations: Sequence[Operation], request_id: bytes, timeout_s: float
        ) -> Any:
            nonlocal arrived
            if any(o.key == pieces.object_key("bkt", "k") for o in operations):
                arrived += 1
                if arrived == 2:
                    gate.set()
                await gate.wait()
            return await real_write(self, operations, request_id, timeout_s)

        FakeBackend.write = held_write  # type: ignore[method-assign]
        try:
            await asyncio.gather(
                store.put("bkt", "k", pieces.BytesBody(body(PIECE, 1)), {}, {}),
                other.put("bkt", "k", pieces.BytesBody(body(PIECE, 2)), {}, {}),
            )
        finally:
            FakeBackend.write = real_write  # type: ignore[method-assign]
        await settle(store)
        await settle(other)
        assert not live(backend, pieces.PIECE + old.segments[0].data_id)
        assert len(live(backend, pieces.PIECE)) == 2  # the winner's and the loser's
        assert await store.collect_garbage() == 1
        winner = await store.head("bkt", "k")
        assert live(backend, pieces.PIECE) == [pieces.piece_key(winner.segments[0].data_id, 0)]
        assert live(backend, pieces.OWNER) == [pieces.owner_key(winner.segments[0].data_id)]
        assert await read_all(store, "bkt", "k") in (body(PIECE, 1), body(PIECE, 2))

    run(scenario())


@pytest.mark.parametrize("call", ["GetObject", "CopyObject", "UploadPartCopy"])
def test_an_s3_read_of_an_object_replaced_before_its_piece_is_read_answers_the_new_one(
    tmp_path: Path, call: str
) -> None:
    """GET, and the copies that read a source, start again from the new manifest (no 500 for the client)."""
    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config

    from replicator.config import S3Config
    from replicator.s3.server import S3Server

    credentials = tmp_path / "credentials.toml"
    credentials.write_text('[[credentials]]\naccess_key = "ACCESS"\nsecret_key = "SECRET"\n')
    config = S3Config(
        enabled=True,
        listen="127.0.0.1:0",
        credentials_file=str(credentials),
        piece_bytes=PIECE,
        part_bytes_min=PIECE,
        garbage_sweep_interval_ms=3_600_000,
        garbage_age_ms=1,  # collect_garbage below judges every owner record (the periodic sweep never runs)
    )
    backend = CountingBackend()
    replaced: list[bytes] = []

    async def scenario() -> None:
        server = S3Server(backend, config, timeout_s=5.0)
        await server.start()
        try:
            client = boto3.client(
                "s3",
                endpoint_url=f"http://{server.address}",
                aws_access_key_id="ACCESS",
                aws_secret_access_key="SECRET",
                region_name="us-east-1",
                # One attempt: the retry checked is the server's, not boto3's (which retries a 500).
                config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
            )
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: client.create_bucket(Bucket="bkt"))
            await server.store.put("bkt", "k", pieces.BytesBody(body(PIECE, 0)), {}, {})
            real_read = backend.read

            async def replacing_read(key: bytes, timeout_s: float) -> Versioned | None:
                # The first piece read: the object is overwritten (its piece freed in that record) just before.
                if key.startswith(pieces.PIECE) and not replaced:
                    replaced.append(key)
                    await server.store.put("bkt", "k", pieces.BytesBody(body(PIECE, 1)), {}, {})
                return await real_read(key, timeout_s)

            backend.read = replacing_read  # type: ignore[method-assign]
            source = {"Bucket": "bkt", "Key": "k"}

            def read() -> dict[str, Any]:
                if call == "GetObject":
                    return client.get_object(Bucket="bkt", Key="k")
                if call == "CopyObject":
                    client.copy_object(Bucket="bkt", Key="copy", CopySource=source)
                else:
                    upload_id = client.create_multipart_upload(Bucket="bkt", Key="copy")["UploadId"]
                    etag = client.upload_part_copy(
                        Bucket="bkt", Key="copy", UploadId=upload_id, PartNumber=1, CopySource=source
                    )["CopyPartResult"]["ETag"]
                    parts = {"Parts": [{"PartNumber": 1, "ETag": etag}]}
                    client.complete_multipart_upload(
                        Bucket="bkt", Key="copy", UploadId=upload_id, MultipartUpload=parts
                    )
                return client.get_object(Bucket="bkt", Key="copy")

            answer = await loop.run_in_executor(None, read)
            data = await loop.run_in_executor(None, answer["Body"].read)
            assert data == body(PIECE, 1) and len(replaced) == 1
            if call != "UploadPartCopy":  # a multipart object's etag is the digest of its parts' digests
                assert answer["ETag"] == f'"{hashlib.md5(body(PIECE, 1)).hexdigest()}"'
            await settle(server.store)
            await asyncio.sleep(0.01)
            assert await server.store.collect_garbage() == 0  # the attempt cut short wrote nothing
        finally:
            await server.stop()

    run(scenario())


def test_the_manifest_header_is_json_with_the_segment_named() -> None:
    """The one-piece layout is the M1 format the earlier code reads: an upgrade may go a site at a time."""

    async def scenario() -> None:
        backend, store = new_store()
        await store.create_bucket("bkt")
        manifest = await store.put("bkt", "k", pieces.BytesBody(body(PIECE)), {}, {})
        raw = backend.store.versions[pieces.object_key("bkt", "k")].value
        assert raw is not None and raw[:2] == b"M1"
        (length,) = pieces._U32.unpack_from(raw, 2)
        header = json.loads(raw[6 : 6 + length])
        assert len(raw) == 6 + length  # no inline body
        assert header["segments"] == [[manifest.segments[0].data_id.hex(), PIECE, PIECE]]

    run(scenario())


class ReferencingWriteFails(CountingBackend):
    """The first write naming `key` (a manifest or a part record) fails as `how` says: "unknown" applies it and
    answers OutcomeUnknown (the peer's ack came too late), "lost" answers OutcomeUnknown without applying,
    "refused" answers Unavailable without applying, "hang" applies it and never answers (cancelled)."""

    def __init__(self, prefix: bytes, how: str) -> None:
        super().__init__()
        self.prefix, self.how, self.fired = prefix, how, False

    async def write(self, operations: Sequence[Operation], request_id: bytes, timeout_s: float) -> Any:
        if self.fired or not any(o.key.startswith(self.prefix) for o in operations):
            return await super().write(operations, request_id, timeout_s)
        self.fired = True
        if self.how == "refused":
            raise errors.Unavailable("fenced")
        if self.how == "lost":
            raise errors.OutcomeUnknown("lost on the way")
        await super().write(operations, request_id, timeout_s)
        if self.how == "hang":
            await asyncio.Event().wait()
        raise errors.OutcomeUnknown("the peer's ack came too late")


@pytest.mark.parametrize("how", ["unknown", "hang", "lost", "refused"])
@pytest.mark.parametrize("what", ["object", "part"])
def test_pieces_of_a_record_that_may_still_commit_are_left_to_the_sweep(what: str, how: str) -> None:
    """A large body's pieces are written before the record naming them. When that record fails in a way that
    leaves it free to commit (an unknown outcome, a cancellation mid-write), freeing the pieces would leave a
    committed manifest or part naming deleted pieces (a retry with the same request id acknowledged on them):
    they stay, and the sweep keeps them while referenced. When the backend promises nothing was applied,
    they are freed at once."""

    async def scenario() -> None:
        prefix = pieces.OBJECT if what == "object" else pieces.PART
        backend = ReferencingWriteFails(prefix, how)
        store = ObjectStore(backend, LIMITS)
        await store.create_bucket("bkt")
        data = body(3 * PIECE + 5)
        request_id = os.urandom(16)
        if what == "object":
            attempt = store.put_object(
                "bkt", "k", pieces.BytesBody(data), LIMITS.object_bytes_max, request_id=request_id
            )
        else:
            upload = await store.get_upload("bkt", "k", await store.create_upload("bkt", "k", {}, {}))
            attempt = store.upload_part(upload, 1, pieces.BytesBody(data), None)
        task = asyncio.ensure_future(attempt)
        if how == "hang":
            while not backend.fired:
                await asyncio.sleep(0)
            await asyncio.sleep(0.01)
            task.cancel()
        with pytest.raises((errors.OutcomeUnknown, errors.Unavailable, asyncio.CancelledError)):
            await task
        await settle(store)
        applied = how in ("unknown", "hang")
        if applied:  # the record committed after all: every piece it names must be there, now and after a sweep
            assert await store.collect_garbage() == 0
            if what == "object":
                assert await read_all(store, "bkt", "k") == data
                _, again = await store.put_object(
                    "bkt", "k", pieces.BytesBody(data), LIMITS.object_bytes_max, request_id=request_id
                )
                assert again.duplicate
                await settle(store)  # the retry's own pieces are the unreferenced ones: freed
            else:
                [part] = await store.list_parts(upload.upload_id, 0, 10)
                await store.complete_upload(upload, [(1, part.md5)])
            assert await read_all(store, "bkt", "k") == data
            assert len(live(backend, pieces.OWNER)) == 1 and len(live(backend, pieces.PIECE)) == 4
        elif how == "lost":  # not written and not known to be: the pieces wait for the sweep
            assert len(live(backend, pieces.PIECE)) == 4
            assert await store.collect_garbage() == 1
        assert live(backend, pieces.PIECE) == [] or applied
        assert live(backend, pieces.OWNER) == [] or applied

    run(scenario())


def test_deleted_objects_and_finished_uploads_leave_tombstones_that_hide_nothing() -> None:
    """A deleted object's or a finished upload's key keeps a tombstone, so a range's first page may hold
    none that is live: DeleteBucket must still see a live object after them (else the bucket goes and its
    object is orphaned, back when the bucket is made again) and ListMultipartUploads an upload after them."""

    async def scenario() -> None:
        backend, store = new_store()
        await store.create_bucket("bkt")
        for i in range(300):
            await store.put("bkt", f"k{i:03d}", pieces.BytesBody(b"x"), {}, {})
        for i in range(299):
            await store.delete("bkt", f"k{i:03d}")
        with pytest.raises(S3Error, match="BucketNotEmpty"):
            await store.delete_bucket("bkt")
        for i in range(30):
            upload = await store.get_upload("bkt", f"u{i:02d}", await store.create_upload("bkt", f"u{i:02d}", {}, {}))
            await store.abort_upload(upload)
        live_id = await store.create_upload("bkt", "u99", {}, {})
        listed = await store.list_uploads("bkt", "", "", 10)
        assert [(u.key, u.upload_id) for u in listed] == [("u99", live_id)]
        assert [u.key for u in await store.list_uploads("bkt", "", "", 1)] == ["u99"]
        await store.delete("bkt", "k299")
        await store.delete_bucket("bkt")  # empty now: goes, and its upload in progress with it
        assert await store.list_buckets() == []
        assert live(backend, pieces.OBJECT) == [] and live(backend, pieces.UPLOAD) == []

    run(scenario())


def test_the_s3_endpoints_store_takes_inline_bytes_max_from_its_config(tmp_path: Path) -> None:
    from replicator.config import S3Config
    from replicator.s3.server import S3Server

    credentials = tmp_path / "credentials.toml"
    credentials.write_text('[[credentials]]\naccess_key = "ACCESS"\nsecret_key = "SECRET"\n')

    async def scenario() -> None:
        backend = CountingBackend()
        config = S3Config(enabled=True, credentials_file=str(credentials), inline_bytes_max=0)
        store = S3Server(backend, config, timeout_s=5.0).store
        await store.create_bucket("bkt")
        manifest = await store.put("bkt", "small", pieces.BytesBody(b"tiny"), {}, {})
        assert manifest.inline == b"" and len(manifest.segments) == 1  # 0: never inline
        assert await read_all(store, "bkt", "small") == b"tiny"

    run(scenario())
