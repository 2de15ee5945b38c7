"""Servicers over the fake backend, through real grpc.aio servers on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from replicator.api import keys
from replicator.api.fake import FakeBackend, FakeStore, FakeWitnessBackend
from replicator.api.server import start_site_server, start_witness_server
from replicator.config import ApiConfig
from replicator.core.records import Operation
from replicator.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    blocks_pb2,
    blocks_pb2_grpc,
    objects_pb2,
    objects_pb2_grpc,
    witness_pb2,
    witness_pb2_grpc,
)


class Site:
    def __init__(self, backend: FakeBackend, channel: grpc.aio.Channel) -> None:
        self.backend = backend
        self.objects = objects_pb2_grpc.ObjectServiceStub(channel)
        self.blocks = blocks_pb2_grpc.BlockServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


def with_site(
    test: Callable[[Site], Awaitable[None]], config: ApiConfig | None = None, backend: FakeBackend | None = None
) -> None:
    async def main() -> None:
        site_backend = backend or FakeBackend("a", peer="b", peer_address="127.0.0.1:7999")
        server = await start_site_server(site_backend, "127.0.0.1:0", config or ApiConfig(health_refresh_ms=20))
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                await test(Site(site_backend, channel))
        finally:
            await server.stop(0)

    asyncio.run(main())


async def expect(code: grpc.StatusCode, call: Awaitable[Any], *fragments: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, (caught.value.code(), caught.value.details())
    for fragment in fragments:
        assert fragment in caught.value.details(), (fragment, caught.value.details())
    return caught.value


_ids = iter(range(1, 1 << 30))


def rid() -> bytes:
    return b"test-%d" % next(_ids)


# ---- objects


def test_put_get_head_delete_roundtrip() -> None:
    async def test(site: Site) -> None:
        ack = (await site.objects.Put(objects_pb2.PutRequest(bucket="b", key="k", data=b"v1", request_id=rid()))).ack
        assert ack.ts > 0 and not ack.duplicate
        got = await site.objects.Get(objects_pb2.GetRequest(bucket="b", key="k"))
        assert (got.data, got.ts) == (b"v1", ack.ts)
        head = await site.objects.Head(objects_pb2.HeadRequest(bucket="b", key="k"))
        assert head.size_bytes == 2
        await site.objects.Delete(objects_pb2.DeleteRequest(bucket="b", key="k", request_id=rid()))
        await expect(grpc.StatusCode.NOT_FOUND, site.objects.Get(objects_pb2.GetRequest(bucket="b", key="k")), "b/k")
        await expect(grpc.StatusCode.NOT_FOUND, site.objects.Head(objects_pb2.HeadRequest(bucket="b", key="k")))
        # Delete of a missing object is idempotent.
        await site.objects.Delete(objects_pb2.DeleteRequest(bucket="b", key="nope", request_id=rid()))
        # An empty object is an object.
        await site.objects.Put(objects_pb2.PutRequest(bucket="b", key="empty", data=b"", request_id=rid()))
        assert (await site.objects.Get(objects_pb2.GetRequest(bucket="b", key="empty"))).data == b""

    with_site(test)


def test_put_is_one_backend_write_and_stored_under_the_layout() -> None:
    async def test(site: Site) -> None:
        await site.objects.Put(objects_pb2.PutRequest(bucket="bk", key="x/y", data=b"d", request_id=rid()))
        assert site.backend.writes_seen == 1
        assert site.backend.store.versions[b"obk\x00x/y"].value == b"d"

    with_site(test)


def test_retry_with_same_request_id_is_not_applied_twice() -> None:
    async def test(site: Site) -> None:
        request = objects_pb2.PutRequest(bucket="b", key="k", data=b"v", request_id=b"same")
        first = (await site.objects.Put(request)).ack
        second = (await site.objects.Put(request)).ack
        assert second.duplicate and second.ts == first.ts
        assert site.backend.store.records_applied == 1

    with_site(test)


@pytest.mark.parametrize(
    ("bucket", "key", "data", "request_id", "fragment"),
    [
        ("b", "", b"x", b"r", "object key is empty"),
        ("b", "k" * 1025, b"x", b"r", "key_bytes_max"),
        ("", "k", b"x", b"r", "bucket name is empty"),
        ("bad/bucket", "k", b"x", b"r", "bucket name 'bad/bucket' is invalid"),
        ("b", "k", b"x" * (64 * 1024 + 1), b"r", "object_bytes_max"),
        ("b", "k", b"x", b"", "request_id is empty"),
        ("b", "k", b"x", b"r" * 65, "request_id_bytes_max"),
        ("b", "a\x00b", b"x", b"r", "NUL"),
    ],
)
def test_bad_put_is_invalid_argument_and_applies_nothing(
    bucket: str, key: str, data: bytes, request_id: bytes, fragment: str
) -> None:
    async def test(site: Site) -> None:
        request = objects_pb2.PutRequest(bucket=bucket, key=key, data=data, request_id=request_id)
        await expect(grpc.StatusCode.INVALID_ARGUMENT, site.objects.Put(request), fragment)
        assert site.backend.writes_seen == 0

    with_site(test, ApiConfig(object_bytes_max=64 * 1024))


def test_put_batch_is_one_atomic_write() -> None:
    async def test(site: Site) -> None:
        items = [objects_pb2.PutBatchItem(key=f"k{i}", data=b"%d" % i) for i in range(10)]
        ack = (await site.objects.PutBatch(objects_pb2.PutBatchRequest(bucket="b", items=items, request_id=rid()))).ack
        assert site.backend.writes_seen == 1
        assert {v.ts for v in site.backend.store.versions.values()} == {ack.ts}
        # One bad item refuses the whole batch: nothing half-applied.
        bad = items + [objects_pb2.PutBatchItem(key="", data=b"")]
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            site.objects.PutBatch(objects_pb2.PutBatchRequest(bucket="c", items=bad, request_id=rid())),
        )
        duplicate = [objects_pb2.PutBatchItem(key="k", data=b"1"), objects_pb2.PutBatchItem(key="k", data=b"2")]
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            site.objects.PutBatch(objects_pb2.PutBatchRequest(bucket="c", items=duplicate, request_id=rid())),
            "same key twice",
        )
        many = [objects_pb2.PutBatchItem(key=f"k{i}", data=b"") for i in range(11)]
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            site.objects.PutBatch(objects_pb2.PutBatchRequest(bucket="c", items=many, request_id=rid())),
            "batch_items_max",
        )
        assert site.backend.writes_seen == 1

    with_site(test, ApiConfig(batch_items_max=10, health_refresh_ms=20))


def test_put_stream_pipelines_and_reports_items_separately() -> None:
    async def test(site: Site) -> None:
        site.backend.write_delay_s = 0.001

        async def requests() -> AsyncIterator[objects_pb2.PutRequest]:
            for i in range(200):
                yield objects_pb2.PutRequest(bucket="s", key=f"k{i:03}", data=b"x", request_id=b"s%d" % i)
            yield objects_pb2.PutRequest(bucket="s", key="", data=b"x", request_id=b"bad")

        answers = [answer async for answer in site.objects.PutStream(requests())]
        assert len(answers) == 201
        by_id = {a.request_id: a for a in answers}
        assert by_id[b"bad"].WhichOneof("result") == "error"
        assert by_id[b"bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert all(by_id[b"s%d" % i].WhichOneof("result") == "ack" for i in range(200))
        assert len(site.backend.store.versions) == 200

    with_site(test)


class Session:
    """A raw Session stream of the test: send a request, read the answer to a tag."""

    def __init__(self, stub: objects_pb2_grpc.ObjectServiceStub) -> None:
        self.outgoing: asyncio.Queue[objects_pb2.SessionRequest | None] = asyncio.Queue()
        self.call = stub.Session(self._requests())
        self.answers: dict[int, objects_pb2.SessionResponse] = {}
        self._tags = iter(range(1, 1 << 30))

    async def _requests(self) -> AsyncIterator[objects_pb2.SessionRequest]:
        while (message := await self.outgoing.get()) is not None:
            yield message

    def send(self, timeout_ms: int = 0, **call: Any) -> int:
        tag = next(self._tags)
        self.outgoing.put_nowait(objects_pb2.SessionRequest(tag=tag, timeout_ms=timeout_ms, **call))
        return tag

    async def answer(self, tag: int) -> objects_pb2.SessionResponse:
        while tag not in self.answers:
            response = await self.call.read()
            assert response is not grpc.aio.EOF, f"the stream ended before answering tag {tag}"
            self.answers[response.tag] = response
        return self.answers.pop(tag)

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        assert await self.call.read() is grpc.aio.EOF
        assert await self.call.code() == grpc.StatusCode.OK


def item_code(response: objects_pb2.SessionResponse) -> grpc.StatusCode:
    assert response.WhichOneof("result") == "error", response
    return next(code for code in grpc.StatusCode if code.value[0] == response.error.code)


def test_session_serves_every_call_kind_with_the_unary_handlers_and_errors_per_call() -> None:
    async def test(site: Site) -> None:
        session = Session(site.objects)
        put = session.send(put=objects_pb2.PutRequest(bucket="s", key="k", data=b"v1", request_id=b"r1"))
        assert (await session.answer(put)).put.ack.ts > 0
        again = session.send(put=objects_pb2.PutRequest(bucket="s", key="k", data=b"v1", request_id=b"r1"))
        assert (await session.answer(again)).put.ack.duplicate  # dedup by request id, as unary
        batch = session.send(
            put_batch=objects_pb2.PutBatchRequest(
                bucket="s", items=[objects_pb2.PutBatchItem(key="b1", data=b"1")], request_id=b"r2"
            )
        )
        assert (await session.answer(batch)).put_batch.ack.ts > 0
        get = session.send(get=objects_pb2.GetRequest(bucket="s", key="k"))
        assert (await session.answer(get)).get.data == b"v1"
        head = session.send(head=objects_pb2.HeadRequest(bucket="s", key="k"))
        assert (await session.answer(head)).head.size_bytes == 2
        listed = session.send(list=objects_pb2.ListRequest(bucket="s"))
        assert [o.key for o in (await session.answer(listed)).list.objects] == ["b1", "k"]
        applied = site.backend.store.records_applied
        # Bad calls: each gets the unary call's error, nothing is applied, the stream goes on.
        empty_key = session.send(put=objects_pb2.PutRequest(bucket="s", key="", data=b"v", request_id=b"r3"))
        oversized = session.send(put=objects_pb2.PutRequest(bucket="s", key="big", data=bytes(101), request_id=b"r4"))
        no_id = session.send(put=objects_pb2.PutRequest(bucket="s", key="n", data=b"v"))
        no_call = session.send()
        missing = session.send(get=objects_pb2.GetRequest(bucket="s", key="missing"))
        answer = await session.answer(empty_key)
        assert item_code(answer) == grpc.StatusCode.INVALID_ARGUMENT and "key is empty" in answer.error.message
        answer = await session.answer(oversized)
        assert item_code(answer) == grpc.StatusCode.INVALID_ARGUMENT and "object_bytes_max" in answer.error.message
        assert item_code(await session.answer(no_id)) == grpc.StatusCode.INVALID_ARGUMENT
        answer = await session.answer(no_call)
        assert item_code(answer) == grpc.StatusCode.INVALID_ARGUMENT and "names no call" in answer.error.message
        assert item_code(await session.answer(missing)) == grpc.StatusCode.NOT_FOUND
        assert site.backend.store.records_applied == applied
        # A call whose timeout leaves no time is refused before it reaches the backend.
        writes = site.backend.writes_seen
        late = session.send(timeout_ms=1, put=objects_pb2.PutRequest(bucket="s", key="l", data=b"v", request_id=b"r5"))
        assert item_code(await session.answer(late)) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert site.backend.writes_seen == writes
        delete = session.send(delete=objects_pb2.DeleteRequest(bucket="s", key="k", request_id=b"r6"))
        assert (await session.answer(delete)).delete.ack.ts > 0
        # A site that cannot serve names the other one, per call.
        site.backend.available = False
        refused = session.send(get=objects_pb2.GetRequest(bucket="s", key="b1"))
        answer = await session.answer(refused)
        assert item_code(answer) == grpc.StatusCode.UNAVAILABLE and answer.error.other_site == "127.0.0.1:7999"
        await session.close()

    with_site(test, ApiConfig(health_refresh_ms=20, object_bytes_max=100))


class CountingBackend(FakeBackend):
    """Counts the writes running at once."""

    def __init__(self) -> None:
        super().__init__("a", peer="b")
        self.running = 0
        self.running_max = 0

    async def write(self, operations: Any, request_id: bytes, timeout_s: float) -> Any:
        self.running += 1
        self.running_max = max(self.running_max, self.running)
        try:
            return await super().write(operations, request_id, timeout_s)
        finally:
            self.running -= 1


def test_session_runs_at_most_session_inflight_max_calls_at_once() -> None:
    backend = CountingBackend()
    backend.write_delay_s = 0.02

    async def test(site: Site) -> None:
        session = Session(site.objects)
        tags = [
            session.send(put=objects_pb2.PutRequest(bucket="s", key=f"k{i}", data=b"v", request_id=b"i%d" % i))
            for i in range(12)
        ]
        answers = [await session.answer(tag) for tag in tags]
        assert all(answer.WhichOneof("result") == "put" for answer in answers)
        assert len({answer.put.ack.ts for answer in answers}) == 12
        assert backend.running_max == 3
        await session.close()

    with_site(test, ApiConfig(health_refresh_ms=20, session_inflight_max=3), backend)


def test_a_stopping_server_answers_the_session_calls_it_started_then_ends_the_stream_naming_the_other_site() -> None:
    async def main() -> None:
        backend = FakeBackend("a", peer="b", peer_address="127.0.0.1:7999")
        backend.write_delay_s = 0.3
        server = await start_site_server(backend, "127.0.0.1:0", ApiConfig())
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                session = Session(objects_pb2_grpc.ObjectServiceStub(channel))
                slow = session.send(put=objects_pb2.PutRequest(bucket="s", key="k", data=b"v", request_id=b"slow"))
                while backend.writes_seen == 0:
                    await asyncio.sleep(0.005)
                began = asyncio.get_running_loop().time()
                stopping = asyncio.ensure_future(server.stop(5.0))
                assert (await session.answer(slow)).put.ack.ts > 0  # started: run to the end and answered
                ended = await expect(grpc.StatusCode.UNAVAILABLE, session.call.read(), "stopping", "127.0.0.1:7999")
                trailers = dict(ended.trailing_metadata() or ())
                assert trailers["replicator-other-site"] == "127.0.0.1:7999"
                await stopping
                assert asyncio.get_running_loop().time() - began < 2.0  # not the 5 s grace
                assert backend.store.records_applied == 1
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_list_paginates_in_key_order_with_prefix_and_skips_tombstones() -> None:
    async def test(site: Site) -> None:
        for name in ["a1", "a2", "a3", "b1", "a4", "a5"]:
            await site.objects.Put(objects_pb2.PutRequest(bucket="l", key=name, data=b"xy", request_id=rid()))
        await site.objects.Put(objects_pb2.PutRequest(bucket="l2", key="a9", data=b"", request_id=rid()))
        await site.objects.Delete(objects_pb2.DeleteRequest(bucket="l", key="a2", request_id=rid()))
        keys_seen: list[str] = []
        token = b""
        pages = 0
        while True:
            page = await site.objects.List(
                objects_pb2.ListRequest(bucket="l", prefix="a", page_size=2, page_token=token)
            )
            pages += 1
            keys_seen += [o.key for o in page.objects]
            assert all(o.size_bytes == 2 for o in page.objects)
            token = page.next_page_token
            if not token:
                break
        assert keys_seen == ["a1", "a3", "a4", "a5"]
        assert pages >= 3
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            site.objects.List(objects_pb2.ListRequest(bucket="l", prefix="a", page_token=b"zz")),
            "page_token",
        )

    with_site(test)


# ---- errors from the backend


def test_unavailable_names_the_other_site_and_outcome_unknown_is_deadline_exceeded() -> None:
    async def test(site: Site) -> None:
        site.backend.available = False
        error = await expect(
            grpc.StatusCode.UNAVAILABLE,
            site.objects.Put(objects_pb2.PutRequest(bucket="b", key="k", data=b"v", request_id=rid())),
            "site 'b' at 127.0.0.1:7999",
        )
        assert ("replicator-other-site", "127.0.0.1:7999") in tuple(error.trailing_metadata() or ())
        await expect(grpc.StatusCode.UNAVAILABLE, site.objects.Get(objects_pb2.GetRequest(bucket="b", key="k")))
        site.backend.available = True
        site.backend.unknown_after_apply = 1
        await expect(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            site.objects.Put(objects_pb2.PutRequest(bucket="b", key="k", data=b"v", request_id=b"u")),
            "retry with the same request id",
        )
        retry = await site.objects.Put(objects_pb2.PutRequest(bucket="b", key="k", data=b"v", request_id=b"u"))
        assert retry.ack.duplicate

    with_site(test)


# ---- blocks


async def create_volume(site: Site, name: str = "vol", size_bytes: int = 64 * 4096, block_size: int = 4096) -> None:
    await site.blocks.CreateVolume(
        blocks_pb2.CreateVolumeRequest(name=name, size_bytes=size_bytes, block_size=block_size, request_id=rid())
    )


def test_volume_create_list_delete() -> None:
    async def test(site: Site) -> None:
        request = blocks_pb2.CreateVolumeRequest(name="v1", size_bytes=1 << 20, block_size=0, request_id=b"c1")
        created = await site.blocks.CreateVolume(request)
        assert (created.volume.block_size, created.volume.block_count) == (4096, 256)
        # A retried create (same request id) succeeds again; another create of the name does not.
        assert (await site.blocks.CreateVolume(request)).ack.duplicate
        other = blocks_pb2.CreateVolumeRequest(name="v1", size_bytes=1 << 20, request_id=b"c2")
        await expect(grpc.StatusCode.ALREADY_EXISTS, site.blocks.CreateVolume(other))
        await create_volume(site, "v2", 8192, 512)
        listed = await site.blocks.ListVolumes(blocks_pb2.ListVolumesRequest())
        assert [(v.name, v.block_size) for v in listed.volumes] == [("v1", 4096), ("v2", 512)]
        page = await site.blocks.ListVolumes(blocks_pb2.ListVolumesRequest(page_size=1))
        assert [v.name for v in page.volumes] == ["v1"] and page.next_page_token
        page = await site.blocks.ListVolumes(
            blocks_pb2.ListVolumesRequest(page_size=1, page_token=page.next_page_token)
        )
        assert [v.name for v in page.volumes] == ["v2"]
        delete = blocks_pb2.DeleteVolumeRequest(name="v1", request_id=b"d1")
        await site.blocks.DeleteVolume(delete)
        await site.blocks.DeleteVolume(delete)  # a retry of a delete that went through succeeds
        await expect(
            grpc.StatusCode.NOT_FOUND,
            site.blocks.DeleteVolume(blocks_pb2.DeleteVolumeRequest(name="v1", request_id=b"d2")),
        )
        listed = await site.blocks.ListVolumes(blocks_pb2.ListVolumesRequest())
        assert [v.name for v in listed.volumes] == ["v2"]

    with_site(test)


@pytest.mark.parametrize(
    ("size_bytes", "block_size", "fragment"),
    [
        (0, 4096, "positive multiple"),
        (4097, 4096, "positive multiple"),
        (8192, 1000, "power of two"),
        (8192, 256, "power of two"),
        (1 << 50, 4096, "volume_size_bytes_max"),
    ],
)
def test_bad_volume_geometry(size_bytes: int, block_size: int, fragment: str) -> None:
    async def test(site: Site) -> None:
        request = blocks_pb2.CreateVolumeRequest(
            name="v", size_bytes=size_bytes, block_size=block_size, request_id=rid()
        )
        await expect(grpc.StatusCode.INVALID_ARGUMENT, site.blocks.CreateVolume(request), fragment)

    with_site(test)


def test_multi_block_write_is_one_atomic_write_and_unwritten_blocks_read_as_zeros() -> None:
    async def test(site: Site) -> None:
        await create_volume(site)
        writes_before = site.backend.writes_seen
        data = b"".join(bytes([i + 1]) * 4096 for i in range(4))
        ack = (
            await site.blocks.WriteBlocks(
                blocks_pb2.WriteBlocksRequest(volume="vol", lba=10, data=data, request_id=rid())
            )
        ).ack
        assert site.backend.writes_seen == writes_before + 1
        block_versions = [v for k, v in site.backend.store.versions.items() if k.startswith(b"b")]
        assert len(block_versions) == 4 and {v.ts for v in block_versions} == {ack.ts}
        read = await site.blocks.ReadBlocks(blocks_pb2.ReadBlocksRequest(volume="vol", lba=8, count=8))
        assert read.data == bytes(2 * 4096) + data + bytes(2 * 4096)

    with_site(test)


def test_block_read_is_one_scan() -> None:
    class CountingBackend(FakeBackend):
        scans = 0

        async def scan(self, start: bytes, end: bytes | None, limit: int, timeout_s: float) -> list[Any]:
            type(self).scans += 1
            return await super().scan(start, end, limit, timeout_s)

    async def test(site: Site) -> None:
        await create_volume(site)
        for lba in (0, 5, 63):
            await site.blocks.WriteBlocks(
                blocks_pb2.WriteBlocksRequest(volume="vol", lba=lba, data=b"\x07" * 4096, request_id=rid())
            )
        read = await site.blocks.ReadBlocks(blocks_pb2.ReadBlocksRequest(volume="vol", lba=0, count=64))
        assert CountingBackend.scans == 1
        assert read.data[5 * 4096 : 6 * 4096] == b"\x07" * 4096 and read.data[4096:8192] == bytes(4096)

    with_site(test, backend=CountingBackend())


def test_trim_writes_tombstones_and_reads_zeros() -> None:
    async def test(site: Site) -> None:
        await create_volume(site)
        await site.blocks.WriteBlocks(
            blocks_pb2.WriteBlocksRequest(volume="vol", lba=0, data=b"\x01" * 4 * 4096, request_id=rid())
        )
        await site.blocks.TrimBlocks(blocks_pb2.TrimBlocksRequest(volume="vol", lba=1, count=2, request_id=rid()))
        read = await site.blocks.ReadBlocks(blocks_pb2.ReadBlocksRequest(volume="vol", lba=0, count=4))
        assert read.data == b"\x01" * 4096 + bytes(8192) + b"\x01" * 4096
        tombstones = [k for k, v in site.backend.store.versions.items() if k.startswith(b"b") and v.value is None]
        assert len(tombstones) == 2

    with_site(test)


@pytest.mark.parametrize(
    ("volume", "lba", "size", "fragment"),
    [
        ("nope", 0, 4096, "unknown volume 'nope'"),
        ("vol", 0, 100, "not a whole number"),
        ("vol", 63, 8192, "outside volume"),
        ("vol", 0, 0, "no data"),
        ("vol", 0, 128 * 1024, "block_write_bytes_max"),
    ],
)
def test_bad_block_writes_are_refused_whole(volume: str, lba: int, size: int, fragment: str) -> None:
    async def test(site: Site) -> None:
        await create_volume(site)
        before = dict(site.backend.store.versions)
        request = blocks_pb2.WriteBlocksRequest(volume=volume, lba=lba, data=b"\x01" * size, request_id=rid())
        await expect(grpc.StatusCode.INVALID_ARGUMENT, site.blocks.WriteBlocks(request), fragment)
        assert site.backend.store.versions == before

    with_site(test, ApiConfig(block_write_bytes_max=64 * 1024, health_refresh_ms=20))


def test_bad_block_reads_and_trims() -> None:
    async def test(site: Site) -> None:
        await create_volume(site)
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            site.blocks.ReadBlocks(blocks_pb2.ReadBlocksRequest(volume="vol", lba=60, count=5)),
            "outside",
        )
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            site.blocks.ReadBlocks(blocks_pb2.ReadBlocksRequest(volume="vol", lba=0, count=0)),
            "positive",
        )
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            site.blocks.ReadBlocks(blocks_pb2.ReadBlocksRequest(volume="x", lba=0, count=1)),
            "unknown volume",
        )
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            site.blocks.TrimBlocks(blocks_pb2.TrimBlocksRequest(volume="vol", lba=0, count=65, request_id=b"t")),
        )

    with_site(test)


def test_deleted_volume_blocks_never_show_through_a_new_volume() -> None:
    async def test(site: Site) -> None:
        await create_volume(site, "v")
        await site.blocks.WriteBlocks(
            blocks_pb2.WriteBlocksRequest(volume="v", lba=3, data=b"\x09" * 4096, request_id=rid())
        )
        await site.blocks.DeleteVolume(blocks_pb2.DeleteVolumeRequest(name="v", request_id=rid()))
        live_blocks = [k for k, v in site.backend.store.versions.items() if k.startswith(b"b") and v.value is not None]
        assert live_blocks == []  # erased (best effort, done here)
        # Even garbage left behind in the old generation stays invisible.
        old_generation = next(iter(k for k in site.backend.store.versions if k.startswith(b"b")))
        site.backend.store.apply([Operation(old_generation, b"\x0f" * 4096)], b"garbage")
        await create_volume(site, "v")
        read = await site.blocks.ReadBlocks(blocks_pb2.ReadBlocksRequest(volume="v", lba=0, count=64))
        assert read.data == bytes(64 * 4096)

    with_site(test)


def test_write_blocks_stream() -> None:
    async def test(site: Site) -> None:
        await create_volume(site)

        async def requests() -> AsyncIterator[blocks_pb2.WriteBlocksRequest]:
            for lba in range(64):
                yield blocks_pb2.WriteBlocksRequest(
                    volume="vol", lba=lba, data=bytes([lba]) * 4096, request_id=b"w%d" % lba
                )
            yield blocks_pb2.WriteBlocksRequest(volume="vol", lba=64, data=bytes(4096), request_id=b"out")

        answers = {a.request_id: a async for a in site.blocks.WriteBlocksStream(requests())}
        assert answers[b"out"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert sum(a.WhichOneof("result") == "ack" for a in answers.values()) == 64
        read = await site.blocks.ReadBlocks(blocks_pb2.ReadBlocksRequest(volume="vol", lba=0, count=64))
        assert read.data == b"".join(bytes([lba]) * 4096 for lba in range(64))

    with_site(test)


def test_key_layout() -> None:
    assert keys.object_key(b"bk", b"k") == b"obk\x00k"
    assert keys.block_key(b"vol", 7, 1) == b"bvol\x00" + (7).to_bytes(8, "big") + (1).to_bytes(8, "big")
    assert keys.block_key(b"v", 1, 255) < keys.block_key(b"v", 1, 256)
    assert keys.prefix_end(b"ab\xff") == b"ac" and keys.prefix_end(b"\xff") is None
    assert keys.describe_key(keys.object_key(b"bk", b"k")) == "object bk/k"
    assert keys.describe_key(keys.block_key(b"vol", 7, 9)) == "block vol@9"
    assert keys.block_keys(b"vol", 7, 254, 3) == [keys.block_key(b"vol", 7, lba) for lba in (254, 255, 256)]
    data = bytes(range(12))
    puts = keys.block_puts(b"vol", 7, 5, data, 4)
    assert puts == [Operation(keys.block_key(b"vol", 7, 5 + i), data[4 * i : 4 * i + 4]) for i in range(3)]
    assert all(type(put.value) is bytes for put in puts)


# ---- admin and health


def test_status_and_admin_actions() -> None:
    async def test(site: Site) -> None:
        status = (await site.admin.Status(admin_pb2.StatusRequest())).status
        assert (status.site, status.peer, status.state, status.epoch) == ("a", "b", "SYNC", 3)
        await site.admin.Resync(admin_pb2.ResyncRequest(full=True))
        await site.admin.Switchover(admin_pb2.SwitchoverRequest())
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION, site.admin.Failover(admin_pb2.FailoverRequest()), "split brain"
        )
        await site.admin.Failover(admin_pb2.FailoverRequest(force=True))
        assert site.backend.actions == [("resync", True), ("switchover", True), ("failover", True)]
        site.backend.state = "SOLO"
        # A refusal in this state, not an outage: FAILED_PRECONDITION (replicatorctl exits 1, not 3).
        await expect(grpc.StatusCode.FAILED_PRECONDITION, site.admin.Switchover(admin_pb2.SwitchoverRequest()), "SYNC")

    with_site(test)


def test_verify_streams_progress_then_report() -> None:
    async def test(site: Site) -> None:
        for i in range(20):
            await site.objects.Put(objects_pb2.PutRequest(bucket="b", key=f"k{i}", data=b"x", request_id=rid()))
        site.backend.store.differing_keys = (b"ob\x00k1", b"ob\x00k2", b"ob\x00k3")
        events = [e async for e in site.admin.Verify(admin_pb2.VerifyRequest(keys_max=2))]
        assert events[-1].WhichOneof("event") == "report"
        assert all(e.WhichOneof("event") == "progress" for e in events[:-1]) and len(events) > 1
        report = events[-1].report
        assert (report.keys_compared, report.differing_count, report.truncated) == (20, 3, True)
        assert list(report.differing_keys) == [b"ob\x00k1", b"ob\x00k2"]
        site.backend.available = False
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [e async for e in site.admin.Verify(admin_pb2.VerifyRequest())]
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    with_site(test)


def test_health_follows_the_site_state() -> None:
    async def test(site: Site) -> None:
        async def check(service: str) -> int:
            return (await site.health.Check(health_pb2.HealthCheckRequest(service=service))).status

        serving = health_pb2.HealthCheckResponse.SERVING
        assert await check("") == serving
        assert await check("replicator.v1.ObjectService") == serving
        site.backend.available = False  # state FENCED
        watch = site.health.Watch(health_pb2.HealthCheckRequest(service="replicator.v1.BlockService"))
        async for update in watch:
            if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        watch.cancel()
        assert await check("") == serving
        assert await check("replicator.v1.AdminService") == serving

    with_site(test)


# ---- witness


def test_witness_servicer() -> None:
    async def main() -> None:
        server = await start_witness_server(FakeWitnessBackend(), "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = witness_pb2_grpc.WitnessServiceStub(channel)
                granted = await stub.Arbitrate(witness_pb2.ArbitrateRequest(pair="p", site="a", epoch=1))
                assert (granted.verdict, granted.epoch) == (witness_pb2.VERDICT_GRANTED, 2)
                denied = await stub.Arbitrate(witness_pb2.ArbitrateRequest(pair="p", site="b", epoch=1))
                assert (denied.verdict, denied.epoch, denied.mode, denied.holder) == (
                    witness_pb2.VERDICT_DENIED,
                    2,
                    witness_pb2.PAIR_MODE_SOLO,
                    "a",
                )
                synced = await stub.MarkSynced(witness_pb2.MarkSyncedRequest(pair="p", site="a", epoch=2))
                assert (synced.verdict, synced.epoch, synced.mode) == (
                    witness_pb2.VERDICT_GRANTED,
                    3,
                    witness_pb2.PAIR_MODE_SYNC,
                )
                status = await stub.Status(witness_pb2.WitnessStatusRequest())
                assert [(p.pair, p.epoch) for p in status.pairs] == [("p", 3)]
                await expect(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    stub.Arbitrate(witness_pb2.ArbitrateRequest(pair="", site="a", epoch=1)),
                    "pair is empty",
                )
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_fake_store_is_shared_between_sites() -> None:
    store = FakeStore()
    a, b = FakeBackend("a", store), FakeBackend("b", store)

    async def main() -> None:
        await a.write([Operation(b"k", b"v")], b"r1", 1.0)
        assert (await b.read(b"k", 1.0)).value == b"v"  # type: ignore[union-attr]
        assert (await b.write([Operation(b"k", b"w")], b"r1", 1.0)).duplicate

    asyncio.run(main())


# ---- properties of the key layout

_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True).map(str.encode)
_object_keys = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=8)


@given(bucket=_names, other=_names, key=_object_keys, prefix=st.text(max_size=3))
def test_a_bucket_prefix_listing_is_exactly_one_key_range(bucket: bytes, other: bytes, key: str, prefix: str) -> None:
    start = keys.object_prefix(bucket, prefix.encode())
    end = keys.prefix_end(start)
    for owner in (bucket, other):
        storage_key = keys.object_key(owner, key.encode())
        inside = start <= storage_key and (end is None or storage_key < end)
        assert inside == (owner == bucket and key.encode().startswith(prefix.encode()))


@given(volume=_names, generation=st.integers(0, 2**64 - 1), lbas=st.lists(st.integers(0, 2**64 - 1), min_size=2))
def test_block_keys_sort_by_lba_and_decode(volume: bytes, generation: int, lbas: list[int]) -> None:
    block_keys = [keys.block_key(volume, generation, lba) for lba in lbas]
    assert sorted(block_keys) == [keys.block_key(volume, generation, lba) for lba in sorted(lbas)]
    assert [keys.lba_from_block_key(k) for k in block_keys] == lbas
    prefix = keys.block_generation_prefix(volume, generation)
    assert all(k.startswith(prefix) for k in block_keys)
