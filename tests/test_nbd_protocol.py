"""The NBD codec (pure functions) with Hypothesis, and the server in-process over FakeBackend.

The server tests drive the real NbdServer with the low-level client of
nbd_support over loopback; FakeBackend lets them fence the site, slow its
writes and delete volumes at will.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.api import keys
from replicator.api.fake import FakeBackend, FakeStore
from replicator.config import ApiConfig, NbdConfig
from replicator.core.records import Operation
from replicator.nbd import protocol as p
from replicator.nbd.server import NbdServer

# ---------------------------------------------------------------- codec


@given(
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_request_round_trip(flags: int, command: int, cookie: int, offset: int, length: int) -> None:
    request = p.Request(flags, command, cookie, offset, length)
    raw = p.encode_request(request)
    assert len(raw) == p.REQUEST_BYTES
    assert p.parse_request(raw) == request


@given(st.binary(min_size=p.REQUEST_BYTES, max_size=p.REQUEST_BYTES))
def test_a_request_with_bad_magic_is_a_protocol_error(raw: bytes) -> None:
    if raw[:4] == struct.pack(">I", p.REQUEST_MAGIC):
        return
    with pytest.raises(p.ProtocolError):
        p.parse_request(raw)


@given(st.text(max_size=40).filter(lambda s: "\x00" not in s), st.lists(st.integers(0, 0xFFFF), max_size=8))
def test_info_request_round_trip_and_truncation(name: str, requests: list[int]) -> None:
    raw = p.encode_info_request(name, tuple(requests))
    assert p.parse_info_request(raw) == p.InfoRequest(name, tuple(requests))
    for cut in range(len(raw)):
        with pytest.raises(p.ProtocolError):
            p.parse_info_request(raw[:cut])
    with pytest.raises(p.ProtocolError):
        p.parse_info_request(raw + b"x")


def test_option_header_checks_magic_and_bound() -> None:
    assert p.parse_option_header(p.encode_option(p.OPT_GO, b"abc")[:16]) == p.OptionHeader(p.OPT_GO, 3)
    with pytest.raises(p.ProtocolError):
        p.parse_option_header(struct.pack(">QII", 1, p.OPT_GO, 0))
    with pytest.raises(p.ProtocolError):
        p.parse_option_header(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, p.OPTION_BYTES_MAX + 1))


def test_client_flags() -> None:
    assert p.parse_client_flags(struct.pack(">I", 3)) == 3
    for bad in (0, 2, 4, 0x80000001):
        with pytest.raises(p.ProtocolError):
            p.parse_client_flags(struct.pack(">I", bad))


def test_meta_contexts() -> None:
    assert p.matching_contexts((), listing=True) == [(p.BASE_ALLOCATION_ID, p.BASE_ALLOCATION)]
    assert p.matching_contexts((), listing=False) == []
    assert p.matching_contexts(("base:",), listing=True) == [(p.BASE_ALLOCATION_ID, p.BASE_ALLOCATION)]
    assert p.matching_contexts(("base:",), listing=False) == []
    assert p.matching_contexts(("qemu:dirty-bitmap:x", "base:allocation"), listing=False) == [
        (p.BASE_ALLOCATION_ID, p.BASE_ALLOCATION)
    ]
    raw = struct.pack(">I", 1) + b"v" + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
    assert p.parse_meta_context_request(raw) == p.MetaContextRequest("v", ("base:allocation",))


@settings(max_examples=200)
@given(
    st.lists(st.booleans(), min_size=1, max_size=40), st.sampled_from([512, 4096]), st.integers(0, 4095),
    st.integers(0, 4095),
)  # fmt: skip
def test_extents_cover_the_range_exactly_and_alternate(allocated: list[bool], size: int, head: int, tail: int) -> None:
    head %= size
    first = 3 * size + head
    end = (3 + len(allocated)) * size - (tail % size if len(allocated) > 1 or tail % size < size - head else 0)
    if end <= first:
        return
    extents = p.extents_from_allocation(allocated, size, first, end)
    assert sum(length for length, _ in extents) == end - first
    assert all(length > 0 for length, _ in extents)
    assert all(a[1] != b[1] for a, b in zip(extents, extents[1:], strict=False))  # runs are merged
    # Each byte's state is its block's.
    position = first
    for length, flags in extents:
        for byte in (position, position + length - 1):
            index = byte // size - 3
            assert (flags == 0) == allocated[index]
        position += length


# ---------------------------------------------------------------- server over FakeBackend


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address: str) -> Raw:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def go(self, volume: str) -> None:
        await self.reader.readexactly(18)
        self.writer.write(struct.pack(">I", 3) + p.encode_option(p.OPT_GO, p.encode_info_request(volume)))
        while True:
            _, reply, length = p.parse_option_reply(await self.reader.readexactly(p.OPTION_REPLY_BYTES))
            await self.reader.readexactly(length)
            if reply == p.REP_ACK:
                return
            assert reply == p.REP_INFO, hex(reply)

    def send(self, command: int, offset: int, length: int, cookie: int, data: bytes = b"") -> None:
        self.writer.write(p.encode_request(p.Request(0, command, cookie, offset, length)) + data)

    async def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        header = p.parse_simple_reply(await self.reader.readexactly(p.SIMPLE_REPLY_BYTES))
        data = await self.reader.readexactly(read_length) if read_length and not header.error else b""
        return header.cookie, header.error, data

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), 5) == b""
        except ConnectionResetError:
            return True


def _create(store: FakeStore, name: str, size: int, block_size: int = 4096, request_id: bytes = b"create") -> None:
    meta = keys.VolumeMeta(name, size, block_size, keys.generation_for(request_id))
    store.apply([Operation(keys.volume_key(name.encode()), meta.encode())], request_id)


def serve(body: Callable[[FakeBackend, NbdServer], Awaitable[None]]) -> None:
    """Run `body` against a started NbdServer over a FakeBackend holding volume "v" (1 MiB)."""

    async def main() -> None:
        backend = FakeBackend("a")
        _create(backend.store, "v", 1 << 20)
        server = NbdServer(
            backend, NbdConfig(listen="127.0.0.1:0", inflight_requests_max=4, state_poll_ms=10), ApiConfig()
        )
        await server.start()
        try:
            await asyncio.wait_for(body(backend, server), 30)
        finally:
            await server.stop()

    asyncio.run(main())


def test_fenced_site_hard_closes_connections_and_refuses_new_ones() -> None:
    serve(_fenced_site_hard_closes_connections_and_refuses_new_ones)


async def _fenced_site_hard_closes_connections_and_refuses_new_ones(backend: FakeBackend, server: NbdServer) -> None:
    client = await Raw.connect(server.address)
    await client.go("v")
    client.send(p.CMD_WRITE, 0, 4096, 1, b"\x07" * 4096)
    assert await client.reply() == (1, 0, b"")
    backend.available = False  # status() now says FENCED, requests raise Unavailable
    assert await client.closed()  # dropped, never an NBD_ESHUTDOWN answer
    late = await Raw.connect(server.address)
    assert await late.closed()  # not even greeted
    backend.available = True
    again = await Raw.connect(server.address)
    await again.go("v")
    again.send(p.CMD_READ, 0, 4096, 9)
    assert await again.reply(4096) == (9, 0, b"\x07" * 4096)


def test_unavailable_request_drops_the_connection_unanswered() -> None:
    serve(_unavailable_request_drops_the_connection_unanswered)


async def _unavailable_request_drops_the_connection_unanswered(backend: FakeBackend, server: NbdServer) -> None:
    client = await Raw.connect(server.address)
    await client.go("v")
    backend.state = "SUSPENDED"  # still connected while suspended ...
    backend.write_delay_s = 0.05

    async def refuse(*args: object) -> None:
        from replicator.api.errors import Unavailable

        raise Unavailable("no lease")

    backend.scan = refuse  # type: ignore[assignment,method-assign]
    client.send(p.CMD_READ, 0, 4096, 3)
    assert await client.closed()  # ... but a refused request drops it: the client resends elsewhere


def test_replies_follow_completion_order_and_in_flight_is_bounded() -> None:
    serve(_replies_follow_completion_order_and_in_flight_is_bounded)


async def _replies_follow_completion_order_and_in_flight_is_bounded(backend: FakeBackend, server: NbdServer) -> None:
    client = await Raw.connect(server.address)
    await client.go("v")
    active = 0
    peak = 0
    original = backend.write

    async def slow_write(operations, request_id, timeout_s):  # type: ignore[no-untyped-def]
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        # The first write is the slowest: later ones overtake it.
        await asyncio.sleep(0.2 if operations[0].value == b"\x01" * 4096 else 0.02)
        active -= 1
        return await original(operations, request_id, timeout_s)

    backend.write = slow_write  # type: ignore[method-assign]
    for cookie in range(1, 13):
        client.send(p.CMD_WRITE, cookie * 4096, 4096, cookie, bytes([cookie]) * 4096)
    order = [(await client.reply())[0] for _ in range(12)]
    assert sorted(order) == list(range(1, 13))
    assert order[0] != 1 and 1 in order  # cookie 1 was overtaken
    assert peak <= 4  # nbd.inflight_requests_max


def test_a_volume_deleted_and_recreated_answers_eio() -> None:
    serve(_a_volume_deleted_and_recreated_answers_eio)


async def _a_volume_deleted_and_recreated_answers_eio(backend: FakeBackend, server: NbdServer) -> None:
    client = await Raw.connect(server.address)
    await client.go("v")
    _create(backend.store, "v", 1 << 20, request_id=b"create-again")  # another generation
    client.send(p.CMD_WRITE, 0, 4096, 5, b"\x01" * 4096)
    assert await client.reply() == (5, p.EIO, b"")
    # Nothing was written, to either generation.
    assert backend.store.scan(keys.BLOCK_PREFIX, keys.prefix_end(keys.BLOCK_PREFIX), 10) == []


def test_too_many_connections_are_refused() -> None:
    serve(_too_many_connections_are_refused)


async def _too_many_connections_are_refused(backend: FakeBackend, server: NbdServer) -> None:
    small = NbdServer(backend, NbdConfig(listen="127.0.0.1:0", connections_max=1), ApiConfig())
    await small.start()
    try:
        first = await Raw.connect(small.address)
        await first.go("v")
        second = await Raw.connect(small.address)
        assert await second.closed()
        first.send(p.CMD_FLUSH, 0, 0, 77)
        assert await first.reply() == (77, 0, b"")
    finally:
        await small.stop()


# ---------------------------------------------------------------- configuration


def test_nbd_configuration_is_validated(tmp_path: pytest.TempPathFactory) -> None:
    from replicator.config import ConfigError, site_config_from_mapping

    site = {"name": "a", "peer_name": "b", "pair_id": "p", "data_dir": "d"}
    assert site_config_from_mapping({"site": site}).nbd.listen == ""  # off unless configured
    config = site_config_from_mapping({"site": site, "nbd": {"listen": "127.0.0.1:10809", "inflight_requests_max": 8}})
    assert (config.nbd.listen, config.nbd.inflight_requests_max) == ("127.0.0.1:10809", 8)
    assert config.exposed_addresses() == []
    assert site_config_from_mapping({"site": site, "nbd": {"listen": "0.0.0.0:10809"}}).exposed_addresses() == [
        "0.0.0.0:10809"
    ]
    for bad, message in (
        ({"listen": "nowhere"}, "nbd.listen"),
        ({"listen": "127.0.0.1:1", "connections_max": 0}, "nbd.connections_max"),
        ({"listne": "127.0.0.1:1"}, "did you mean listen"),
        ({"listen": "127.0.0.1:7400"}, "same address"),
    ):
        with pytest.raises(ConfigError, match=message):
            site_config_from_mapping({"site": site, "nbd": bad})
