"""Admission control (replicator/api/admission.py): bounded work in flight, RESOURCE_EXHAUSTED beyond it.

The unit tests drive `Admission` directly; the gRPC test puts a slow fake backend behind the real server
and fills the site's permits, so the next request waits, is refused with the retry hint and applies nothing
(the S3 answer to the same error: tests/test_s3_protocol.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.api import errors
from replicator.api._handling import RETRY_AFTER_METADATA_KEY
from replicator.api.admission import Admission, admitted
from replicator.api.fake import FakeBackend
from replicator.api.server import start_site_server
from replicator.config import ApiConfig
from replicator.v1 import objects_pb2, objects_pb2_grpc


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_requests_beyond_the_operation_limit_wait_then_are_refused_with_nothing_held() -> None:
    async def main() -> None:
        admission = Admission(ops_max=2, bytes_max=1 << 20, wait_ms=50)
        release = asyncio.Event()

        async def hold() -> None:
            async with admission.admit(10):
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        await asyncio.sleep(0)
        assert admission.stats().ops_in_flight == 2
        with pytest.raises(errors.Overloaded) as refused:
            async with admission.admit(10):
                raise AssertionError("admitted beyond ops_max")
        assert "2 requests and 20 bytes in flight" in refused.value.message and refused.value.retry_after_ms >= 10
        assert admission.stats().rejected == 1 and admission.stats().waiting == 0
        release.set()
        await asyncio.gather(*holders)
        assert (admission.stats().ops_in_flight, admission.stats().bytes_in_flight) == (0, 0)

    run(main())


def ordered_request(admission: Admission, order: list[str]):  # type: ignore[no-untyped-def]
    """A request that notes its name in `order` once admitted and holds its permit until `wait` is set."""

    async def request(name: str, size: int, wait: asyncio.Event | None = None) -> None:
        async with admission.admit(size):
            order.append(name)
            if wait is not None:
                await wait.wait()

    return request


def test_a_waiter_is_admitted_when_room_frees_and_waiters_keep_their_order() -> None:
    async def main() -> None:
        admission = Admission(ops_max=1, bytes_max=100, wait_ms=5000)
        order: list[str] = []
        gate = asyncio.Event()
        request = ordered_request(admission, order)

        first = asyncio.create_task(request("first", 10, gate))
        await asyncio.sleep(0)
        later = [asyncio.create_task(request(name, 10)) for name in ("second", "third")]
        await asyncio.sleep(0.01)
        assert order == ["first"] and admission.stats().waiting == 2
        gate.set()
        await asyncio.gather(first, *later)
        assert order == ["first", "second", "third"]

    run(main())


def test_a_large_request_blocks_smaller_ones_behind_it_and_runs_alone_if_above_the_byte_limit() -> None:
    async def main() -> None:
        admission = Admission(ops_max=10, bytes_max=100, wait_ms=5000)
        order: list[str] = []
        gate = asyncio.Event()
        request = ordered_request(admission, order)

        small = asyncio.create_task(request("small", 60, gate))
        await asyncio.sleep(0)
        huge = asyncio.create_task(request("huge", 500))  # above bytes_max: waits until nothing is in flight
        await asyncio.sleep(0)
        tiny = asyncio.create_task(request("tiny", 1))  # would fit, but must not overtake the waiting one
        await asyncio.sleep(0.01)
        assert order == ["small"]
        gate.set()
        await asyncio.gather(small, huge, tiny)
        assert order == ["small", "huge", "tiny"]

    run(main())


def test_a_cancelled_waiter_leaves_no_permit_behind() -> None:
    async def main() -> None:
        admission = Admission(ops_max=1, bytes_max=100, wait_ms=5000)
        gate = asyncio.Event()

        async def request(wait: asyncio.Event | None = None) -> None:
            async with admission.admit(5):
                if wait is not None:
                    await wait.wait()

        holder = asyncio.create_task(request(gate))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.set()
        await holder
        assert (admission.stats().ops_in_flight, admission.stats().bytes_in_flight) == (0, 0)
        async with admission.admit(5):
            assert admission.stats().ops_in_flight == 1

    run(main())


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 300),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 3)), min_size=1, max_size=25),
)
def test_the_limits_hold_at_every_moment_and_everything_returns(ops_max: int, bytes_max: int, requests) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        admission = Admission(ops_max=ops_max, bytes_max=bytes_max, wait_ms=10_000)
        worst = [0, 0]

        async def request(size: int, turns: int) -> None:
            async with admission.admit(size):
                stats = admission.stats()
                assert stats.ops_in_flight <= ops_max
                assert stats.bytes_in_flight <= bytes_max or stats.ops_in_flight == 1
                worst[0] = max(worst[0], stats.ops_in_flight)
                for _ in range(turns):
                    await asyncio.sleep(0)

        await asyncio.gather(*(request(size, turns) for size, turns in requests))
        stats = admission.stats()
        assert (stats.ops_in_flight, stats.bytes_in_flight, stats.waiting) == (0, 0, 0)
        assert stats.admitted == len(requests) and stats.rejected == 0

    run(main())


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="ops_max must be positive"):
        Admission(ops_max=0, bytes_max=1, wait_ms=0)
    with pytest.raises(ValueError, match="wait_ms must be >= 0"):
        Admission(ops_max=1, bytes_max=1, wait_ms=-1)


def test_grpc_answers_resource_exhausted_with_a_retry_hint_and_applies_nothing() -> None:
    async def main() -> None:
        backend = FakeBackend("a", peer="b")
        backend.write_delay_s = 0.5
        config = ApiConfig(health_refresh_ms=20, admission_ops_max=2, admission_wait_ms=50)
        server = await start_site_server(admitted(backend, 2, 1 << 20, 50), "127.0.0.1:0", config)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = objects_pb2_grpc.ObjectServiceStub(channel)

                def put(key: str) -> grpc.aio.UnaryUnaryCall:
                    return stub.Put(objects_pb2.PutRequest(bucket="b", key=key, data=b"v", request_id=key.encode()))

                slow = [asyncio.ensure_future(put(f"slow-{i}")) for i in range(2)]
                await asyncio.sleep(0.1)  # both hold a permit, sleeping in the backend
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await put("refused")
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "the site is busy" in refused.value.details() and "nothing applied" in refused.value.details()
                trailing = dict(refused.value.trailing_metadata() or ())
                assert int(trailing[RETRY_AFTER_METADATA_KEY]) >= 10
                await asyncio.gather(*slow)
                assert backend.writes_seen == 2  # the refused put never reached the backend
                with pytest.raises(grpc.aio.AioRpcError) as absent:
                    await stub.Get(objects_pb2.GetRequest(bucket="b", key="refused"))
                assert absent.value.code() == grpc.StatusCode.NOT_FOUND
                backend.write_delay_s = 0
                await put("refused")  # the retry, once there is room
                got = await stub.Get(objects_pb2.GetRequest(bucket="b", key="refused"))
                assert got.data == b"v"
        finally:
            await server.stop(0)

    run(main())


def test_admission_applies_to_every_call_of_a_session_stream() -> None:
    """A Session call that finds no room gets RESOURCE_EXHAUSTED with a retry hint as its own answer,
    nothing applied; the stream and the calls that were admitted go on."""

    async def main() -> None:
        backend = FakeBackend("a", peer="b")
        backend.write_delay_s = 0.3
        server = await start_site_server(admitted(backend, 1, 1 << 20, 20), "127.0.0.1:0", ApiConfig())
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                outgoing: asyncio.Queue[objects_pb2.SessionRequest | None] = asyncio.Queue()

                async def requests() -> AsyncIterator[objects_pb2.SessionRequest]:
                    while (message := await outgoing.get()) is not None:
                        yield message

                call = objects_pb2_grpc.ObjectServiceStub(channel).Session(requests())
                for tag, key in ((1, "slow"), (2, "refused")):
                    put = objects_pb2.PutRequest(bucket="b", key=key, data=b"v", request_id=key.encode())
                    outgoing.put_nowait(objects_pb2.SessionRequest(tag=tag, put=put))
                    await asyncio.sleep(0.05)
                first = await call.read()
                assert first.tag == 2 and first.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                assert "the site is busy" in first.error.message and first.error.retry_after_ms >= 10
                second = await call.read()
                assert second.tag == 1 and second.put.ack.ts > 0
                assert backend.writes_seen == 1 and backend.store.records_applied == 1  # the refused one: nothing
                backend.write_delay_s = 0
                retry = objects_pb2.PutRequest(bucket="b", key="refused", data=b"v", request_id=b"refused")
                outgoing.put_nowait(objects_pb2.SessionRequest(tag=3, put=retry))
                third = await call.read()
                assert third.tag == 3 and third.put.ack.ts > 0 and not third.put.ack.duplicate
                outgoing.put_nowait(None)
                assert await call.read() is grpc.aio.EOF
        finally:
            await server.stop(0)

    run(main())
