"""The site-to-site link: handshake, pipelining, back-pressure, reconnects, faults, mutual TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from replicator import framing
from replicator.core.records import Operation, Record, RecordId
from replicator.framing import FrameType
from replicator.transport import (
    Link,
    LinkClosed,
    LinkDown,
    LinkLimits,
    LinkUp,
    LocalHello,
    TlsConfig,
    new_event_loop,
)
from replicator.transport.faultproxy import BOTH, DOWN, UP, FaultProxy

FAST = LinkLimits(
    frame_size_bytes_max=1024 * 1024,
    inflight_bytes_max=4 * 1024 * 1024,
    heartbeat_interval_ms=20,
    heartbeat_timeout_ms=250,
    handshake_timeout_ms=500,
    reconnect_backoff_ms_min=5,
    reconnect_backoff_ms_max=60,
    receive_buffer_bytes=64 * 1024,
)
WAIT_SECONDS_MAX = 15


def run(test: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(asyncio.wait_for(test(), 45))


async def eventually(predicate: Callable[[], bool], what: str = "condition") -> None:
    """Wait (bounded) until predicate() holds; a bound, never a timing assertion."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS_MAX
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Site:
    """A Link with recorders for what it delivers."""

    def __init__(
        self,
        role: str,
        site: str,
        peer: str,
        address: tuple[str, int],
        *,
        incarnation: int = 1,
        epoch: int = 3,
        pair_id: str = "pair-1",
        limits: LinkLimits = FAST,
        tls: TlsConfig | None = None,
    ) -> None:
        self.records: list[Record] = []
        self.frames: list[framing.Frame] = []
        self.events: list[LinkUp | LinkDown] = []
        self.refusals: list[str] = []
        self.epoch = epoch
        self.link = Link(
            role=role,  # type: ignore[arg-type]
            pair_id=pair_id,
            local_site=site,
            peer_site=peer,
            address=address,
            hello=lambda: LocalHello(self.epoch, incarnation, b"extra-" + site.encode()),
            on_frame=self._on_frame,
            on_state=self.events.append,
            limits=limits,
            tls=tls,
            on_refused=self.refusals.append,
        )

    def _on_frame(self, frame: framing.Frame) -> None:
        self.frames.append(frame)
        if frame.type == FrameType.RECORDS:
            self.records.extend(record.materialise() for record in frame.body.records)

    @property
    def ups(self) -> list[LinkUp]:
        return [event for event in self.events if isinstance(event, LinkUp)]

    @property
    def downs(self) -> list[LinkDown]:
        return [event for event in self.events if isinstance(event, LinkDown)]

    async def send_records(self, records: list[Record]) -> None:
        frame = bytearray()
        framing.encode_records(frame, self.epoch, records)
        await self.link.send(frame)


def make_records(origin: str, first: int, count: int, value_bytes: int = 200) -> list[Record]:
    return [
        Record(
            RecordId(origin, 1, seq),
            3,
            10_000 + seq,
            b"req-%d" % seq,
            (Operation(b"key-%d" % seq, bytes([seq % 251]) * value_bytes),),
        )
        for seq in range(first, first + count)
    ]


async def pair(proxy_between: bool = False, **options) -> tuple[Site, Site, FaultProxy | None]:
    """An accepting site "b" and a dialing site "a", optionally through a fault proxy."""
    acceptor = Site("accept", "b", "a", ("127.0.0.1", 0), **options.pop("acceptor", {}), **options)
    await acceptor.link.start()
    proxy = None
    address = acceptor.link.listen_address
    if proxy_between:
        proxy = FaultProxy(address, seed=11)
        await proxy.start()
        address = proxy.address
    dialer = Site("connect", "a", "b", address, **options)
    await dialer.link.start()
    return dialer, acceptor, proxy


async def close_all(*things) -> None:
    for thing in things:
        if thing is None:
            continue
        if isinstance(thing, Site):
            await thing.link.close()
        else:
            await thing.close()


# --- the link ------------------------------------------------------------------


def test_handshake_and_frames_both_ways():
    async def scenario():
        dialer, acceptor, _ = await pair()
        await dialer.link.wait_up()
        await eventually(lambda: acceptor.link.up, "acceptor up")
        (up,) = dialer.ups
        assert up.peer == framing.LinkHello("pair-1", "b", 1, b"extra-b")
        assert up.peer_epoch == 3 and not up.peer_restarted
        assert acceptor.ups[0].peer.site == "a"

        await dialer.send_records(make_records("a", 1, 10))
        await dialer.send_records(make_records("a", 11, 10))
        ack = bytearray()
        framing.encode_fields(ack, FrameType.PREPARED_ACK, 3, struct.pack("<QQ", 1, 20))
        heartbeat = bytearray()
        framing.encode_fields(heartbeat, FrameType.HEARTBEAT, 3, struct.pack("<Q", 77))
        await eventually(lambda: len(acceptor.records) == 20, "records at b")
        await acceptor.link.send(ack)
        await acceptor.link.send(heartbeat)
        await acceptor.send_records(make_records("b", 1, 5))
        await eventually(lambda: len(dialer.frames) == 3, "frames at a")
        assert acceptor.records == make_records("a", 1, 20)
        assert [frame.type for frame in dialer.frames] == [
            FrameType.PREPARED_ACK,
            FrameType.HEARTBEAT,
            FrameType.RECORDS,
        ]
        assert dialer.frames[0].body == framing.Fields(struct.pack("<QQ", 1, 20))
        assert dialer.frames[1].link_seq == 0 and dialer.frames[2].link_seq == 2
        await eventually(lambda: dialer.link.unacknowledged_bytes == 0, "acks at a")
        await eventually(lambda: acceptor.link.unacknowledged_bytes == 0, "acks at b")
        await close_all(dialer, acceptor)
        with pytest.raises(LinkClosed):
            await dialer.send_records(make_records("a", 21, 1))

    run(scenario)


def test_frames_handed_over_while_no_connection_is_up_are_dropped():
    """No resend across connections: the core starts every session over with its Hello."""

    async def scenario():
        port = free_port()
        dialer = Site("connect", "a", "b", ("127.0.0.1", port))
        await dialer.link.start()
        for first in range(1, 31, 10):
            await dialer.send_records(make_records("a", first, 10))
        assert dialer.link.stats.frames_dropped_stale == 3 and dialer.link.unacknowledged_bytes == 0
        acceptor = Site("accept", "b", "a", ("127.0.0.1", port))
        await acceptor.link.start()
        await dialer.link.wait_up()
        await dialer.send_records(make_records("a", 31, 10))
        await eventually(lambda: len(acceptor.records) == 10, "records at b")
        assert acceptor.records == make_records("a", 31, 10)
        assert dialer.ups[0].frames_dropped == 0
        await close_all(dialer, acceptor)

    run(scenario)


def test_back_pressure_bounds_unacknowledged_bytes():
    async def scenario():
        limits = LinkLimits(
            frame_size_bytes_max=64 * 1024,
            inflight_bytes_max=100 * 1024,
            heartbeat_interval_ms=20,
            heartbeat_timeout_ms=5000,
            reconnect_backoff_ms_min=5,
            reconnect_backoff_ms_max=50,
        )
        dialer, acceptor, proxy = await pair(proxy_between=True, limits=limits)
        await dialer.link.wait_up()
        proxy.set_blackhole(True, DOWN)  # acknowledgements are lost

        async def writer():
            for first in range(1, 201, 10):
                await dialer.send_records(make_records("a", first, 10, value_bytes=1000))  # ~10 KiB a frame

        task = asyncio.create_task(writer())
        await eventually(lambda: len(acceptor.records) >= 90, "the window to be delivered")
        for _ in range(20):
            await asyncio.sleep(0.005)
            assert dialer.link.unacknowledged_bytes <= limits.inflight_bytes_max
        assert not task.done()  # waiting for acknowledgements
        assert len(acceptor.records) < 200
        proxy.heal()
        await task
        await eventually(lambda: len(acceptor.records) == 200, "every record")
        assert acceptor.records == make_records("a", 1, 200, value_bytes=1000)
        await close_all(dialer, acceptor, proxy)

    run(scenario)


def test_corrupt_frame_drops_the_connection_and_is_not_applied():
    async def scenario():
        dialer, acceptor, proxy = await pair(proxy_between=True)
        await dialer.link.wait_up()
        await eventually(lambda: acceptor.link.up, "acceptor up")
        proxy.corrupt_next(UP)
        for first in range(1, 101, 10):
            await dialer.send_records(make_records("a", first, 10))
        await eventually(lambda: acceptor.link.stats.corrupt_connections == 1, "the corruption")
        assert proxy.stats.corruptions == 1
        assert any("bad frame" in down.reason for down in acceptor.downs)
        await eventually(lambda: len(dialer.ups) >= 2 and acceptor.link.up, "a new session")
        await dialer.link.wait_up()
        await dialer.send_records(make_records("a", 101, 10))
        await eventually(lambda: acceptor.records[-10:] == make_records("a", 101, 10), "records of the new session")
        assert_in_order_and_intact(acceptor.records)
        await close_all(dialer, acceptor, proxy)

    run(scenario)


def test_silence_drops_the_connection_and_the_link_heals():
    async def scenario():
        dialer, acceptor, proxy = await pair(proxy_between=True)
        await dialer.link.wait_up()
        proxy.set_blackhole(True, BOTH)
        await eventually(lambda: dialer.downs and acceptor.downs, "both ends to notice")
        # One end notices the silence first and closes; the other may then see that close
        # (the proxy forwards a close even while it black-holes bytes).
        reasons = [dialer.downs[0].reason, acceptor.downs[0].reason]
        assert any("nothing from the peer" in reason for reason in reasons), reasons
        proxy.heal()
        await eventually(lambda: len(dialer.ups) >= 2 and acceptor.link.up, "reconnection")
        await dialer.send_records(make_records("a", 1, 3))
        await eventually(lambda: len(acceptor.records) == 3, "records after healing")
        await close_all(dialer, acceptor, proxy)

    run(scenario)


def test_every_connection_is_a_new_session():
    """What the old connection did not deliver is dropped, not resent into the next session (the
    core starts over with Hello); numbering restarts at 1."""

    async def scenario():
        dialer, acceptor, proxy = await pair(proxy_between=True)
        await dialer.link.wait_up()
        await dialer.send_records(make_records("a", 1, 10))
        await eventually(lambda: len(acceptor.records) == 10, "first records")
        proxy.set_blackhole(True, UP)
        for first in range(11, 51, 10):
            await dialer.send_records(make_records("a", first, 10))
        await eventually(lambda: proxy.stats.bytes_blackholed > 0, "bytes to be lost")
        proxy.cut()
        proxy.heal()
        await eventually(lambda: len(dialer.ups) >= 2 and len(acceptor.ups) >= 2, "a new session")
        up = dialer.ups[-1]
        assert not up.peer_restarted and up.frames_dropped >= 1
        assert dialer.link.unacknowledged_bytes == 0
        await dialer.send_records(make_records("a", 51, 5))
        await eventually(lambda: len(acceptor.records) == 15, "records of the new session")
        assert acceptor.records == make_records("a", 1, 10) + make_records("a", 51, 5)
        assert acceptor.frames[-1].link_seq <= 5
        await close_all(dialer, acceptor, proxy)

    run(scenario)


def test_peer_restart_drops_the_resend_queue():
    async def scenario():
        dialer, acceptor, proxy = await pair(proxy_between=True)
        await dialer.link.wait_up()
        port = acceptor.link.listen_address[1]
        proxy.set_blackhole(True, UP)
        for first in range(1, 31, 10):
            await dialer.send_records(make_records("a", first, 10))
        await acceptor.link.close()
        restarted = Site("accept", "b", "a", ("127.0.0.1", port), incarnation=2)
        await restarted.link.start()
        proxy.heal()
        proxy.cut()
        await eventually(lambda: restarted.link.up and any(up.peer_restarted for up in dialer.ups), "restart")
        up = next(up for up in dialer.ups if up.peer_restarted)
        assert up.frames_dropped == 3 and up.peer.incarnation == 2
        assert dialer.link.unacknowledged_bytes == 0
        await dialer.send_records(make_records("a", 31, 5))
        await eventually(lambda: len(restarted.records) == 5, "records after the restart")
        assert restarted.records == make_records("a", 31, 5)
        assert restarted.frames[0].link_seq == 1
        await close_all(dialer, restarted, proxy)

    run(scenario)


def test_a_peer_of_another_pair_is_refused():
    async def scenario():
        acceptor = Site("accept", "b", "a", ("127.0.0.1", 0))
        await acceptor.link.start()
        stranger = Site("connect", "a", "b", acceptor.link.listen_address, pair_id="other-pair")
        await stranger.link.start()
        await eventually(lambda: stranger.link.stats.handshake_failures >= 2, "refusals")
        assert acceptor.link.stats.handshake_failures >= 2
        assert not acceptor.ups and not stranger.ups
        await close_all(stranger, acceptor)

    run(scenario)


def test_send_refuses_what_is_not_one_frame():
    async def scenario():
        dialer = Site("connect", "a", "b", ("127.0.0.1", free_port()))
        two = bytearray()
        framing.encode_fields(two, FrameType.HEARTBEAT, 1, struct.pack("<Q", 1))
        framing.encode_fields(two, FrameType.HEARTBEAT, 1, struct.pack("<Q", 2))
        with pytest.raises(ValueError):
            await dialer.link.send(two)
        hello = bytearray()
        framing.encode_link_hello(hello, 1, "p", "a", 1)
        with pytest.raises(ValueError):
            await dialer.link.send(hello)
        goodbye = bytearray()
        framing.encode_link_goodbye(goodbye, 1, 1, "closing")
        with pytest.raises(ValueError):
            await dialer.link.send(goodbye)
        with pytest.raises(ValueError):
            await dialer.link.send(bytearray(b"not a frame at all, not at all, not at all, not at all"))
        await dialer.link.close()

    run(scenario)


def test_a_peer_of_another_protocol_version_is_refused_at_hello():
    """Both sites run the same release; a LINK_HELLO of another version gets a clear refusal."""

    async def scenario():
        acceptor = Site("accept", "b", "a", ("127.0.0.1", 0))
        await acceptor.link.start()
        hello = bytearray()
        framing.encode_link_hello(hello, 3, "pair-1", "a", 1)
        hello[4] = framing.PROTOCOL_VERSION - 1  # what the release before sends
        framing.stamp_link(hello, 0, 0, 0)  # a valid header CRC: only the version is wrong
        reader, writer = await asyncio.open_connection(*acceptor.link.listen_address)
        writer.write(bytes(hello))
        await writer.drain()
        await eventually(lambda: acceptor.link.stats.version_refusals == 1, "the refusal")
        (reason,) = acceptor.refusals
        assert f"protocol version {framing.PROTOCOL_VERSION - 1}" in reason and "mixed versions" in reason
        assert not acceptor.ups
        assert await asyncio.wait_for(reader.read(), 5) is not None  # the connection is closed
        writer.close()
        await close_all(acceptor)

    run(scenario)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="inflight_bytes_max"):
        LinkLimits(frame_size_bytes_max=1 << 20, inflight_bytes_max=1 << 10)
    with pytest.raises(ValueError, match="heartbeat_timeout_ms"):
        LinkLimits(heartbeat_interval_ms=100, heartbeat_timeout_ms=150)
    with pytest.raises(ValueError, match="reconnect_backoff_ms_min"):
        LinkLimits(reconnect_backoff_ms_min=0)


def assert_in_order_and_intact(records: list[Record]) -> None:
    """At most once, in order, intact (no resend across connections: what a dropped connection
    had not delivered is the core's to ship again in the next session)."""
    seqs = [record.id.seq for record in records]
    assert seqs == sorted(set(seqs)), "a record twice or out of order"
    assert all(record == make_records("a", record.id.seq, 1, len(record.operations[0].value))[0] for record in records)


def test_fault_proxy_at_most_once_in_order():
    """Drops, delays, throttling, black holes and bit flips: records at most once, in order, intact."""

    async def scenario():
        dialer, acceptor, proxy = await pair(proxy_between=True)
        await dialer.link.wait_up()
        proxy.set_throttle(2_000_000, UP)
        done = asyncio.Event()
        sent = [0]

        async def writer():
            # Until the faults are over: a frame handed over with no connection up is dropped at once.
            while not done.is_set():
                await dialer.send_records(make_records("a", sent[0] + 1, 25, value_bytes=300))
                sent[0] += 25
                await asyncio.sleep(0.001)

        async def chaos():
            steps = [
                lambda: proxy.corrupt_next(UP),
                lambda: proxy.set_delay_ms(15, BOTH),
                proxy.cut,
                lambda: proxy.corrupt_next(DOWN),
                lambda: proxy.set_blackhole(True, DOWN),
                lambda: proxy.set_blackhole(False, DOWN),
                lambda: proxy.set_blackhole(True, UP),
                proxy.cut,
                lambda: proxy.set_blackhole(False, UP),
                lambda: proxy.set_corrupt_probability(0.05, BOTH),
                lambda: proxy.set_cut_probability(0.01),
                lambda: proxy.set_refuse(True),
                proxy.cut,
                lambda: proxy.set_refuse(False),
            ]
            for step in steps:
                delivered = len(acceptor.records)
                step()
                # Let some traffic (or a timeout) happen under this fault before the next one.
                await eventually(
                    lambda delivered=delivered: len(acceptor.records) > delivered or not dialer.link.up,
                    "progress",
                )
                await asyncio.sleep(0.05)
            proxy.heal()
            done.set()

        await asyncio.gather(writer(), chaos())
        total = sent[0]
        await eventually(lambda: dialer.link.up and acceptor.link.up, "healed")
        await dialer.send_records(make_records("a", total + 1, 5, value_bytes=300))
        await eventually(lambda: acceptor.records[-5:] == make_records("a", total + 1, 5, 300), "the last records")
        assert len(acceptor.records) > 25
        assert_in_order_and_intact(acceptor.records)
        # Three explicit cuts; one that finds no open connection (a corruption dropped it) counts nothing.
        assert proxy.stats.corruptions >= 2 and proxy.stats.cuts >= 1
        assert acceptor.link.stats.corrupt_connections + dialer.link.stats.corrupt_connections >= 1
        await close_all(dialer, acceptor, proxy)

    run(scenario)


# --- mutual TLS ------------------------------------------------------------------


def _openssl(*arguments: str, cwd: Path) -> None:
    subprocess.run(["openssl", *arguments], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip


def _make_cert(directory: Path, ca: str, name: str) -> None:
    (directory / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    _make_ca(directory, "ca")
    _make_ca(directory, "rogue-ca")
    for name in ("a", "b", "c"):
        _make_cert(directory, "ca", name)
    # A certificate that names "a" but is signed by a CA the sites do not trust.
    rogue = directory / "rogue"
    rogue.mkdir()
    for suffix in ("key", "pem"):
        (rogue / f"rogue-ca.{suffix}").write_bytes((directory / f"rogue-ca.{suffix}").read_bytes())
    _make_cert(rogue, "rogue-ca", "a")
    return directory


def tls_for(directory: Path, name: str, ca: Path | None = None) -> TlsConfig:
    return TlsConfig(str(ca or directory / "ca.pem"), str(directory / f"{name}.pem"), str(directory / f"{name}.key"))


def test_mutual_tls(certificates):
    async def scenario():
        acceptor = Site("accept", "b", "a", ("127.0.0.1", 0), tls=tls_for(certificates, "b"))
        await acceptor.link.start()
        dialer = Site("connect", "a", "b", acceptor.link.listen_address, tls=tls_for(certificates, "a"))
        await dialer.link.start()
        await dialer.link.wait_up()
        for first in range(1, 101, 20):
            await dialer.send_records(make_records("a", first, 20, value_bytes=4096))
        await eventually(lambda: len(acceptor.records) == 100, "records over TLS")
        assert acceptor.records == make_records("a", 1, 100, value_bytes=4096)
        await close_all(dialer, acceptor)

    run(scenario)


@pytest.mark.parametrize("who", ["untrusted-ca", "wrong-name"])
def test_tls_refuses_a_peer_without_a_valid_certificate(certificates, who):
    async def scenario():
        acceptor = Site("accept", "b", "a", ("127.0.0.1", 0), tls=tls_for(certificates, "b"))
        await acceptor.link.start()
        if who == "untrusted-ca":
            tls = tls_for(certificates / "rogue", "a", ca=certificates / "ca.pem")
        else:
            tls = tls_for(certificates, "c")  # a valid certificate, but for site "c"
        intruder = Site("connect", "a", "b", acceptor.link.listen_address, tls=tls)
        await intruder.link.start()
        await eventually(lambda: intruder.link.stats.connection_attempts >= 3, "attempts")
        assert not acceptor.ups and not intruder.ups
        assert acceptor.records == []
        await close_all(intruder, acceptor)

    run(scenario)


def test_tls_refuses_a_client_without_a_certificate(certificates):
    async def scenario():
        acceptor = Site("accept", "b", "a", ("127.0.0.1", 0), tls=tls_for(certificates, "b"))
        await acceptor.link.start()
        context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
        host, port = acceptor.link.listen_address
        received = b""
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname="b")
            writer.write(b"\0" * 64)
            received = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        except (ssl.SSLError, ConnectionError):
            pass
        assert received == b""  # not even a HELLO
        assert not acceptor.ups
        await close_all(acceptor)

    run(scenario)
