"""Objects of any size through the gRPC API and both clients, in the layout S3 uses (replicator/api/pieces.py).

In process (fake sites behind real grpc.aio servers): the refusals (a declared size
over the limit before any data is read, a body longer or shorter than declared,
bad names, a second message naming the object) change nothing; a retried PutLarge
(same request id) is applied once and its second body's pieces are freed; a read
cut by a site's death resumes at the other site where it stopped, pinned to the
object's etag.

Against a real pair (one deployment for the module, S3 on, s3.object_bytes_max
cut to 8 MiB): written by the sync client at site a, read over S3 (boto3) and by
the client at site b, and the other way round (an S3 multipart object read by the
asyncio client); ranges across piece boundaries; a PutLarge held in the middle is
visible at neither site, one cut short leaves the old object whole; the limit is
refused with its name before the body is read.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from s3_support import Endpoint

from replicator.api import pieces
from replicator.api.fake import FakeBackend, ServerThread
from replicator.client import AsyncClient, Client, InvalidArgument, NotFound, RetryPolicy
from replicator.config import S3Config
from replicator.core.records import Operation
from replicator.local import LocalCluster
from replicator.v1 import objects_pb2, objects_pb2_grpc

MIB = 1024 * 1024
LIMIT = 8 * MIB
PIECE = 64 * 1024  # in process: small pieces, many of them
PATIENT = RetryPolicy(attempts_max=6, backoff_initial_ms=50, backoff_ms_max=1000, call_timeout_ms=20_000)


class Lazy(io.RawIOBase):
    """A seekable binary file of `size` pseudo-random bytes made as they are read; counts what was read.

    `hold_at` (a byte offset) blocks a read there until `release` is set; `fail_at` raises there.
    """

    def __init__(self, size: int, seed: int = 1, hold_at: int = -1, fail_at: int = -1) -> None:
        self.size = size
        self.seed = seed
        self.position = 0
        self.read_bytes = 0
        self.hold_at = hold_at
        self.fail_at = fail_at
        self.held = threading.Event()
        self.release = threading.Event()

    def content(self, start: int = 0, end: int | None = None) -> bytes:
        end = self.size if end is None else end
        return b"".join(self._block(i) for i in range(start // 4096, -(-end // 4096)))[start % 4096 :][: end - start]

    def _block(self, index: int) -> bytes:
        return hashlib.shake_128(f"{self.seed}:{index}".encode()).digest(4096)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: offset, io.SEEK_CUR: self.position + offset, io.SEEK_END: self.size + offset}[
            whence
        ]
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = self.size if size < 0 else min(self.size, self.position + size)
        if self.position <= self.hold_at < end and not self.release.is_set():
            self.held.set()
            assert self.release.wait(60), "the test never released the held read"
        if self.position <= self.fail_at < end:
            raise OSError("the source failed mid-way (planted)")
        chunk = self.content(self.position, end)
        self.position = end
        self.read_bytes += len(chunk)
        return chunk


# ---------------------------------------------------------------- in process


@pytest.fixture
def fake_site() -> Iterator[tuple[ServerThread, FakeBackend, str]]:
    with ServerThread() as servers:
        backend = FakeBackend("a")
        s3 = S3Config(piece_bytes=PIECE, object_bytes_max=LIMIT, garbage_age_ms=1)
        yield servers, backend, servers.start_site(backend, None, None, s3)


def stored(backend: FakeBackend, prefix: bytes) -> list[bytes]:
    return [k for k, v in backend.store.versions.items() if v.value is not None and k.startswith(prefix)]


def test_refusals_change_nothing(fake_site: tuple[ServerThread, FakeBackend, str]) -> None:
    servers, backend, address = fake_site
    with grpc.insecure_channel(address) as channel:
        stub = objects_pb2_grpc.ObjectServiceStub(channel)

        def put(*messages: objects_pb2.PutLargeRequest) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as caught:
                stub.PutLarge(iter(messages), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            return caught.value

        def first(size: int, data: bytes = b"", bucket: str = "bkt", key: str = "k") -> objects_pb2.PutLargeRequest:
            return objects_pb2.PutLargeRequest(
                bucket=bucket, key=key, size_bytes=size, request_id=os.urandom(8), data=data
            )

        chunk = objects_pb2.PutLargeRequest(data=b"x" * PIECE)
        error = put(first(LIMIT + 1), *[chunk] * 3)
        assert "s3.object_bytes_max" in error.details() and str(LIMIT) in error.details(), error.details()
        assert "sent more than" in put(first(3 * PIECE), *[chunk] * 5).details()
        assert "declared" in put(first(3 * PIECE + 1), *[chunk] * 3).details()
        assert (
            "only the first"
            in put(first(2 * PIECE), chunk, objects_pb2.PutLargeRequest(key="other", data=b"x" * PIECE)).details()
        )
        assert "invalid" in put(first(1, b"x", bucket="Bad_Bucket")).details()
        assert "empty" in put(first(1, b"x", key="")).details()
        # Nothing visible, and the pieces the refused bodies wrote are freed at once (or by the sweep).
        assert stored(backend, pieces.OBJECT) == []
        store = pieces.PieceStore(backend, pieces.StoreLimits(PIECE, LIMIT, 5 * MIB, 10_000, 4, 0, 5.0))
        servers.call(asyncio.sleep(0.2))  # the frees spawned by the refusals
        servers.call(store.collect_garbage())
        assert stored(backend, pieces.PIECE) == [] and stored(backend, pieces.OWNER) == []


def test_a_retried_put_is_applied_once_and_its_second_body_freed(
    fake_site: tuple[ServerThread, FakeBackend, str],
) -> None:
    _, backend, address = fake_site
    data = os.urandom(5 * PIECE + 3)
    request_id = os.urandom(16)
    with grpc.insecure_channel(address) as channel:
        stub = objects_pb2_grpc.ObjectServiceStub(channel)

        def messages() -> Iterator[objects_pb2.PutLargeRequest]:
            yield objects_pb2.PutLargeRequest(bucket="bkt", key="k", size_bytes=len(data), request_id=request_id)
            for start in range(0, len(data), 100_000):
                yield objects_pb2.PutLargeRequest(data=data[start : start + 100_000])

        first = stub.PutLarge(messages(), timeout=10).ack
        again = stub.PutLarge(messages(), timeout=10).ack
        assert (again.ts, again.duplicate, first.duplicate) == (first.ts, True, False)
        chunks = list(stub.GetLarge(objects_pb2.GetLargeRequest(bucket="bkt", key="k"), timeout=10))
        assert chunks[0].info.size_bytes == len(data) and chunks[0].info.etag == hashlib.md5(data).hexdigest()
        assert b"".join(c.data for c in chunks[1:]) == data
    # Only the applied body's pieces stay: the duplicate's were freed (in the background, at once).
    for _ in range(100):
        if len(stored(backend, pieces.PIECE)) == 6:
            break
        threading.Event().wait(0.05)
    assert len(stored(backend, pieces.PIECE)) == 6 and len(stored(backend, pieces.OWNER)) == 1


@pytest.mark.parametrize("pinned", [False, True])
def test_get_large_of_an_object_replaced_before_its_piece_is_read(
    fake_site: tuple[ServerThread, FakeBackend, str], pinned: bool
) -> None:
    """An object over inline_bytes_max is a manifest read, then piece reads. Replaced between the two (its
    piece freed), GetLarge reads it again from its new manifest; a read pinned to the old etag (a resumed
    read) is told ABORTED instead."""
    _, backend, address = fake_site
    old, new = os.urandom(40_000), os.urandom(40_000)  # one piece each (16 KiB < 40 KB < PIECE)
    with grpc.insecure_channel(address) as channel:
        stub = objects_pb2_grpc.ObjectServiceStub(channel)
        for key, data in (("k", old), ("k2", new)):
            first = objects_pb2.PutLargeRequest(bucket="bkt", key=key, size_bytes=len(data), request_id=os.urandom(16))
            messages = [first, objects_pb2.PutLargeRequest(data=data)]
            stub.PutLarge(iter(messages), timeout=10)
        old_piece = [k for k in stored(backend, pieces.PIECE)]
        real_read = backend.read
        replaced: list[bytes] = []

        async def replacing_read(key: bytes, timeout_s: float) -> Any:
            # The first piece read of k: an overwrite commits just before (k's manifest now names k2's piece,
            # k's own piece is freed in that record).
            if key.startswith(pieces.PIECE) and not replaced:
                k_manifest = pieces.Manifest.decode(backend.store.versions[pieces.object_key("bkt", "k")].value)
                [segment] = k_manifest.segments
                if key == pieces.piece_key(segment.data_id, 0):
                    replaced.append(key)
                    manifest = backend.store.versions[pieces.object_key("bkt", "k2")].value
                    backend.store.apply(
                        [Operation(pieces.object_key("bkt", "k"), manifest), Operation(key, None)], os.urandom(16)
                    )
            return await real_read(key, timeout_s)

        backend.read = replacing_read  # type: ignore[method-assign]
        request = objects_pb2.GetLargeRequest(
            bucket="bkt", key="k", etag=hashlib.md5(old).hexdigest() if pinned else ""
        )
        if pinned:
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.GetLarge(request, timeout=10))
            assert raised.value.code() == grpc.StatusCode.ABORTED
        else:
            chunks = list(stub.GetLarge(request, timeout=10))
            assert chunks[0].info.etag == hashlib.md5(new).hexdigest()
            assert b"".join(c.data for c in chunks[1:]) == new
        assert len(replaced) == 1 and len(old_piece) == 2


# ---------------------------------------------------------------- a real pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("s3-large") / "deploy", stop_timeout_s=5) as cluster:
        cluster.set_site_values("s3", {"object_bytes_max": LIMIT})
        cluster.start()
        yield cluster


def grpc_address(cluster: LocalCluster, site: str) -> str:
    return str(cluster.cluster["sites"][site]["grpc"])


def test_client_and_s3_read_each_others_large_objects(pair: LocalCluster, tmp_path: Path) -> None:
    source = Lazy(5 * MIB + 12345, seed=7)
    data = source.content()
    s3_b = Endpoint(pair, "b", tmp_path / "b").boto3()
    with (
        Client([grpc_address(pair, "a")], retry=PATIENT) as at_a,
        Client([grpc_address(pair, "b")], retry=PATIENT) as at_b,
    ):
        assert at_a.put_large("large", "dir/five mib+", source, content_type="application/x-test") > 0
        # Read over S3 at the other site: the same bytes, the S3 ETag of one PUT, the content type.
        got = s3_b.get_object(Bucket="large", Key="dir/five mib+")
        assert got["Body"].read() == data
        assert got["ETag"].strip('"') == hashlib.md5(data).hexdigest()
        assert got["ContentType"] == "application/x-test"
        info = at_b.head_large("large", "dir/five mib+")
        assert (info.size_bytes, info.etag, info.content_type) == (
            len(data),
            hashlib.md5(data).hexdigest(),
            "application/x-test",
        )
        assert at_b.get_large("large", "dir/five mib+") == data
        start = 2 * MIB - 5  # across a piece boundary
        assert b"".join(at_b.iter_large("large", "dir/five mib+", start, MIB + 10)) == data[start : start + MIB + 10]
        assert b"".join(at_b.iter_large("large", "dir/five mib+", len(data) - 3)) == data[-3:]
        # The object over S3, made by multipart (6 MiB + 1 MiB), read by the asyncio client at a.
        s3_a = Endpoint(pair, "a", tmp_path / "a").boto3()
        parts = [os.urandom(6 * MIB), os.urandom(MIB)]
        upload = s3_a.create_multipart_upload(Bucket="large", Key="multi")
        etags = [
            s3_a.upload_part(Bucket="large", Key="multi", UploadId=upload["UploadId"], PartNumber=n + 1, Body=part)[
                "ETag"
            ]
            for n, part in enumerate(parts)
        ]
        s3_a.complete_multipart_upload(
            Bucket="large",
            Key="multi",
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n + 1} for n, e in enumerate(etags)]},
        )

        async def read_async() -> tuple[bytes, bytes, str]:
            async with AsyncClient([grpc_address(pair, "b"), grpc_address(pair, "a")], retry=PATIENT) as client:
                whole = await client.get_large("large", "multi")
                with (tmp_path / "multi.bin").open("wb") as out:
                    info = await client.get_large_to("large", "multi", out)
                small = b"payload" * 1000
                await client.put_large("large", "from-async", small)
                from_file = Lazy(3 * MIB + 1, seed=9)  # read in worker threads, 1 MiB at a time
                await client.put_large("large", "from-async-file", from_file)
                assert await client.get_large("large", "from-async-file") == from_file.content()
                return whole, await client.get_large("large", "from-async"), info.etag

        whole, small, etag = asyncio.run(read_async())
        assert whole == b"".join(parts) and (tmp_path / "multi.bin").read_bytes() == whole
        assert etag.endswith("-2"), etag
        assert small == b"payload" * 1000
        assert s3_b.get_object(Bucket="large", Key="from-async")["Body"].read() == small
        # Deleted through the client: gone over S3 too; deleting again succeeds.
        at_a.delete_large("large", "dir/five mib+")
        at_a.delete_large("large", "dir/five mib+")
        with pytest.raises(NotFound):
            at_b.head_large("large", "dir/five mib+")
        assert "dir/five mib+" not in {o["Key"] for o in s3_b.list_objects_v2(Bucket="large").get("Contents", [])}


def test_over_the_limit_is_refused_by_name_before_the_body_is_read(pair: LocalCluster) -> None:
    source = Lazy(64 * MIB)
    with Client([grpc_address(pair, "a")], retry=PATIENT) as client:
        with pytest.raises(InvalidArgument) as caught:
            client.put_large("large", "too-big", source)
        assert "s3.object_bytes_max" in str(caught.value) and str(LIMIT) in str(caught.value), caught.value
        # The client reads a chunk or two ahead before the refusal arrives (1 MiB here); a server that
        # read up to its limit before refusing would have taken 8 MiB.
        assert source.read_bytes < LIMIT // 2, source.read_bytes
        with pytest.raises(NotFound):
            client.head_large("large", "too-big")


def test_no_reader_sees_half_an_object(pair: LocalCluster) -> None:
    addresses = [grpc_address(pair, "a"), grpc_address(pair, "b")]
    with Client(addresses[:1], retry=PATIENT) as writer, Client(addresses[1:], retry=PATIENT) as reader:
        old = b"the old object"
        writer.put_large("large", "atomic", old)
        held = Lazy(7 * MIB, seed=3, hold_at=4 * MIB)
        outcome: list[object] = []
        thread = threading.Thread(target=lambda: outcome.append(writer.put_large("large", "atomic", held)))
        thread.start()
        try:
            assert held.held.wait(60), "the upload never reached its middle"
            # Four MiB are stored as pieces at both sites; the object is still the old one everywhere.
            for client in (writer, reader):
                assert client.get_large("large", "atomic") == old
                assert client.head_large("large", "atomic").size_bytes == len(old)
        finally:
            held.release.set()
            thread.join(120)
        assert outcome and isinstance(outcome[0], int), outcome
        assert reader.get_large("large", "atomic") == held.content()
        # A body cut short (the source fails after 3 MiB): the object stays whole, the one before.
        with pytest.raises(OSError, match="planted"):
            writer.put_large("large", "atomic", Lazy(6 * MIB, seed=4, fail_at=3 * MIB))
        assert reader.get_large("large", "atomic") == held.content()


def test_a_read_cut_by_a_site_failure_resumes_at_the_other_site_pinned_to_the_etag() -> None:
    from replicator.api.fake import FakeStore

    with ServerThread() as servers:
        store = FakeStore()
        a, b = FakeBackend("a", store, peer="b"), FakeBackend("b", store, peer="a")
        s3 = S3Config(piece_bytes=PIECE, object_bytes_max=LIMIT)
        address_a, address_b = servers.start_site(a, None, None, s3), servers.start_site(b, None, None, s3)
        data = os.urandom(40 * PIECE + 11)
        retry = RetryPolicy(attempts_max=4, backoff_initial_ms=1, backoff_ms_max=5, call_timeout_ms=5000)
        pieces_read = {"a": 0, "b": 0}

        def counted(site: FakeBackend, delay_s: float) -> None:
            inner = site.read

            async def read(key: bytes, timeout_s: float) -> object:
                if key.startswith(pieces.PIECE):
                    pieces_read[site.site_name] += 1
                    await asyncio.sleep(delay_s)  # site a serves slowly: the read is still going when it dies
                return await inner(key, timeout_s)

            site.read = read  # type: ignore[method-assign]

        counted(a, 0.02)
        counted(b, 0.0)
        with Client([address_a, address_b], retry=retry) as client:
            client.put_large("bkt", "k", data)
            chunks = client.iter_large("bkt", "k")
            got = [next(chunks)]
            servers.stop_site(address_a)  # site a dies with the read in the middle
            got += list(chunks)
            assert b"".join(got) == data
            # b served the rest only: the read resumed where it stopped, not from the start.
            assert 0 < pieces_read["b"] < 40 and pieces_read["a"] + pieces_read["b"] >= 41, pieces_read
            # A resumed read names the etag it began with: an object replaced meanwhile is refused (ABORTED).
            with grpc.insecure_channel(address_b) as channel:
                stub = objects_pb2_grpc.ObjectServiceStub(channel)
                with pytest.raises(grpc.RpcError) as caught:
                    list(
                        stub.GetLarge(
                            objects_pb2.GetLargeRequest(bucket="bkt", key="k", offset=5, etag="0" * 32), timeout=10
                        )
                    )
                assert caught.value.code() == grpc.StatusCode.ABORTED, caught.value
