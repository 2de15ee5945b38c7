"""The site-to-site link: one TCP (optionally mutual-TLS) connection carrying frames.

Theory of operation
-------------------
The link carries the frames the core hands it and reports the frames that
arrive; it knows nothing of records, epochs or states beyond what it needs
to keep a byte stream going across broken connections:

* One end dials (`role="connect"`), the other accepts (`role="accept"`).
  On every new connection both ends first send LINK_HELLO (pair id, site,
  incarnation, extras from the core) and wait for the peer's; a LINK_HELLO
  for another pair or site is refused with LINK_GOODBYE. The link's frames
  (LINK_HELLO, LINK_ACK, LINK_GOODBYE) have a code space of their own and
  never reach `on_frame`; every frame carries the protocol version in its
  header, so a peer of another version is refused at its first frame with an
  error that says so (`on_refused`).
* Every connection is a session of its own: at each handshake the numbering
  restarts and whatever was handed over for an earlier connection and not yet
  written is dropped (the core starts every session with its Hello; a frame of
  the session before would be stale in the next one). There is no resend
  across connections.
* Frames of the types in `SEQUENCED_TYPES` are numbered (`link_seq` in the
  header, 1, 2, 3 ... within one connection) and acknowledged by the peer
  (`link_ack` in the header of every frame it sends, and LINK_ACK frames when
  it has nothing else to send). The receiver checks the numbering (a gap or a
  repeat is a protocol error). The bytes sent and not yet acknowledged are
  bounded by `inflight_bytes_max`: `send` waits while the window is full
  (back-pressure toward the writers), in first-come order.
* A new peer incarnation in LINK_HELLO means the peer restarted; LinkUp says
  so. A Link object lives for one local incarnation: the daemon builds a new
  one after a restart, with the incarnation bumped.
* A frame that fails to decode (CRC, length, type ...) drops the connection;
  nothing from it is delivered. Silence longer than `heartbeat_timeout_ms`
  (a black hole) drops the connection too: this only frees a dead TCP
  connection so that the dialer dials again; whether the peer is alive is the
  core's decision (its peer_timeout_ms, on its own clock; docs/wire.md,
  "Failure detection"). The dialing end reconnects with exponential backoff
  and jitter.

Callbacks run on the event loop: `on_frame(frame)` for every delivered frame
(the frame's memoryviews stay valid as long as the frame is referenced), and
`on_state(event)` with `LinkUp` / `LinkDown`.
"""

from __future__ import annotations

import asyncio
import collections
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from replicator.framing import (
    HEADER_BYTES,
    LINK_FRAME_TYPES,
    MAGIC,
    SEQUENCED_TYPES,
    Frame,
    FrameDecoder,
    FrameType,
    FramingError,
    Goodbye,
    LinkHello,
    UnsupportedVersion,
    encode_link_ack,
    encode_link_goodbye,
    encode_link_hello,
    stamp_link,
)
from replicator.transport.config import LinkLimits, TlsConfig, certificate_names

_PAYLOAD_LENGTH = struct.Struct("<I")

# LINK_GOODBYE reason codes (the link's own frame type: the core's Goodbye is another frame).
GOODBYE_CLOSING = 1
GOODBYE_WRONG_PEER = 2
GOODBYE_PROTOCOL_ERROR = 3


@dataclass(frozen=True, slots=True)
class LocalHello:
    """What the core says about itself in every HELLO (asked for at each connection)."""

    epoch: int
    incarnation: int
    extras: bytes = b""


@dataclass(frozen=True, slots=True)
class LinkUp:
    peer: LinkHello
    peer_epoch: int
    peer_restarted: bool  # the peer's incarnation changed
    frames_dropped: int  # sent on the connection before and never acknowledged


@dataclass(frozen=True, slots=True)
class LinkDown:
    reason: str


LinkEvent = LinkUp | LinkDown


class LinkClosed(Exception):
    """The link was closed locally: nothing more can be sent."""


@dataclass(slots=True)
class LinkStats:
    connection_attempts: int = 0
    connections_up: int = 0
    handshake_failures: int = 0
    corrupt_connections: int = 0
    silent_connections: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    frames_dropped_stale: int = 0  # handed over in a session that ended before they went out
    version_refusals: int = 0  # a peer of another protocol version
    bytes_sent: int = 0
    bytes_received: int = 0


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection: reads into the decoder, hands frames to the link."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.decoder = FrameDecoder(link.limits.frame_size_bytes_max, link.limits.receive_buffer_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer_hello: LinkHello | None = None
        self.up = False
        self.dropped = False
        self.finished: asyncio.Future[None] = link._loop.create_future()
        self.last_received = 0.0
        self.refused = False  # the peer said GOODBYE_WRONG_PEER
        self.last_sent = 0.0
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.outgoing: list[bytes | bytearray | memoryview] = []  # written, not yet handed to the transport
        self.flush_scheduled = False
        self.closing = False  # dropped gracefully: what was written still goes out before the close

    # asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        self.link._connection_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer: memoryview = self.decoder.get_buffer(sizehint)
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.dropped:
            return
        self.link.stats.bytes_received += nbytes
        self.last_received = self.link._loop.time()
        try:
            frames = self.decoder.buffer_updated(nbytes)
        except UnsupportedVersion as error:
            self.link.stats.version_refusals += 1
            reason = (
                f"the peer speaks another link protocol ({error}): mixed versions are refused, "
                "run the same release at both sites (docs/upgrades.md)"
            )
            self.link._on_refused(reason)
            self.link._drop(self, reason)
            return
        except FramingError as error:
            self.link.stats.corrupt_connections += 1
            self.link._drop(self, f"bad frame from the peer: {type(error).__name__}: {error}")
            return
        if frames:
            self.link._frames_received(self, frames)

    def eof_received(self) -> bool:
        return False  # close the connection

    def connection_lost(self, error: Exception | None) -> None:
        self.link._drop(self, f"connection lost: {error!r}" if error else "connection closed by the peer")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data`; everything written during one turn of the loop goes out in one writev.
        (One write per frame cost a system call and a loopback wake-up per frame: at 32 writes in
        flight the link sent 4-6 small frames per write.)"""
        assert self.transport is not None
        self.outgoing.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.link._loop.call_soon(self.flush)
        self.last_sent = self.link._loop.time()
        self.link.stats.bytes_sent += len(data)

    def flush(self) -> None:
        self.flush_scheduled = False
        outgoing = self.outgoing
        if not outgoing or self.transport is None:
            return
        self.outgoing = []
        if self.dropped and not self.closing:
            return  # aborted: nothing more goes out
        if len(outgoing) == 1:
            self.transport.write(outgoing[0])
        else:
            self.transport.writelines(outgoing)


class Link:
    """One end of the site-to-site link. See the module docstring."""

    def __init__(
        self,
        *,
        role: Literal["connect", "accept"],
        pair_id: str,
        local_site: str,
        peer_site: str,
        address: tuple[str, int],
        hello: Callable[[], LocalHello],
        on_frame: Callable[[Frame], None],
        on_state: Callable[[LinkEvent], None],
        limits: LinkLimits | None = None,
        tls: TlsConfig | None = None,
        rng: random.Random | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        if role not in ("connect", "accept"):
            raise ValueError(f"role: must be 'connect' or 'accept', got {role!r}")
        if local_site == peer_site:
            raise ValueError("peer_site: must differ from local_site")
        self.role = role
        self.pair_id = pair_id
        self.local_site = local_site
        self.peer_site = peer_site
        self.address = address
        self.limits = limits or LinkLimits()
        self.tls = tls
        self.sessions = 0  # handshakes, each the start of a new session
        self.stats = LinkStats()
        self._hello = hello
        self._on_frame = on_frame
        self._on_state = on_state
        # Told why a connection was refused before its handshake ended, by either end (for the log).
        self._on_refused = on_refused or (lambda reason: None)
        self._rng = rng or random.Random()
        self._loop = asyncio.get_running_loop()
        self._incarnation = hello().incarnation
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[_Connection] = set()
        self._active: _Connection | None = None
        self._closed = False
        # Session state (one pair of incarnations).
        self._peer_incarnation: int | None = None
        self._next_seq = 1
        # (link seq, size) of the frames sent and not yet acknowledged: the window's accounting.
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._unacknowledged_bytes = 0
        self._received_seq = 0
        self._ack_sent = 0
        self._ack_flush_scheduled = False
        self._send_lock = asyncio.Lock()
        self._space = asyncio.Event()
        self._up_event = asyncio.Event()

    # --- public ---------------------------------------------------------------

    async def start(self) -> None:
        if self.role == "accept":
            self._server = await self._loop.create_server(
                lambda: _Connection(self),
                self.address[0],
                self.address[1],
                ssl=self.tls.server_context() if self.tls else None,
                reuse_address=True,
            )
        else:
            self._tasks.append(self._loop.create_task(self._dial_forever()))
        self._tasks.append(self._loop.create_task(self._keep_alive()))

    @property
    def listen_address(self) -> tuple[str, int]:
        assert self._server is not None, "only an accepting link listens"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def up(self) -> bool:
        return self._active is not None

    @property
    def unacknowledged_bytes(self) -> int:
        return self._unacknowledged_bytes

    async def wait_up(self) -> None:
        await self._up_event.wait()

    async def send(self, frame: bytearray) -> None:
        """Send one encoded frame; the link takes ownership of the bytearray.

        Sequenced frames count against `inflight_bytes_max` until acknowledged:
        this waits while the window would be exceeded, and drops the frame
        when the session it was handed over in ended meanwhile. Every frame
        goes out only on the connection that is up, and is dropped when none
        is: the core starts the next session over with its Hello.
        """
        if self._closed:
            raise LinkClosed("the link is closed")
        size = len(frame)
        if not isinstance(frame, bytearray) or size < HEADER_BYTES or frame[:4] != MAGIC:
            raise ValueError("send takes one encoded frame in a bytearray")
        if HEADER_BYTES + _PAYLOAD_LENGTH.unpack_from(frame, 8)[0] != size:
            raise ValueError("send takes exactly one encoded frame")
        if size > self.limits.frame_size_bytes_max:
            raise ValueError(f"frame of {size} bytes exceeds frame_size_bytes_max {self.limits.frame_size_bytes_max}")
        frame_type = frame[5]
        if frame_type in LINK_FRAME_TYPES:
            raise ValueError("LINK_HELLO, LINK_ACK and LINK_GOODBYE frames belong to the link")
        if frame_type not in SEQUENCED_TYPES:
            connection = self._active
            if connection is not None:
                stamp_link(frame, 0, 0, self._received_seq)
                self._ack_sent = self._received_seq
                connection.write(frame)
                self.stats.frames_sent += 1
            return
        sessions = self.sessions
        async with self._send_lock:  # first come, first served when the window is full
            while self._queue and self._unacknowledged_bytes + size > self.limits.inflight_bytes_max:
                self._space.clear()
                await self._space.wait()
                if self._closed:
                    raise LinkClosed("the link is closed")
            connection = self._active
            if self.sessions != sessions or connection is None:
                self.stats.frames_dropped_stale += 1
                return  # for a session that ended while it waited, or none is up: stale in the next one
            seq = self._next_seq
            self._next_seq += 1
            self._queue.append((seq, size))
            self._unacknowledged_bytes += size
            stamp_link(frame, 0, seq, self._received_seq)
            self._ack_sent = self._received_seq
            connection.write(frame)
            self.stats.frames_sent += 1

    async def close(self, reason: int = GOODBYE_CLOSING, message: str = "closing") -> None:
        """Say goodbye, close every connection and stop; waiting senders get LinkClosed."""
        if self._closed:
            return
        self._closed = True
        if self._active is not None:
            goodbye = bytearray()
            encode_link_goodbye(goodbye, self._hello().epoch, reason, message)
            stamp_link(goodbye, 0, 0, self._received_seq)
            self._active.write(goodbye)
        for connection in list(self._connections):
            self._drop(connection, "closed locally", graceful=True)
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._server is not None:
            await self._server.wait_closed()
        self._space.set()

    # --- connections ------------------------------------------------------------

    async def _dial_forever(self) -> None:
        backoff_ms = self.limits.reconnect_backoff_ms_min
        while not self._closed:
            self.stats.connection_attempts += 1
            connection: _Connection | None = None
            try:
                _, protocol = await asyncio.wait_for(
                    self._loop.create_connection(
                        lambda: _Connection(self),
                        self.address[0],
                        self.address[1],
                        ssl=self.tls.client_context() if self.tls else None,
                        server_hostname=self.peer_site if self.tls else None,
                    ),
                    self.limits.handshake_timeout_ms / 1000,
                )
                connection = protocol
            except (TimeoutError, OSError):
                self.stats.handshake_failures += 1
            if connection is not None:
                await connection.finished
                if connection.up and not connection.refused:
                    backoff_ms = self.limits.reconnect_backoff_ms_min
            if self._closed:
                return
            await asyncio.sleep(backoff_ms * self._rng.uniform(0.5, 1.0) / 1000)
            backoff_ms = min(2 * backoff_ms, self.limits.reconnect_backoff_ms_max)

    def _connection_made(self, connection: _Connection) -> None:
        if self._closed:
            assert connection.transport is not None
            connection.transport.abort()
            return
        self._connections.add(connection)
        connection.last_received = self._loop.time()
        assert connection.transport is not None
        if self.tls is not None and self.tls.verify_peer_name and self.role == "accept":
            names = certificate_names(connection.transport.get_extra_info("peercert"))
            if self.peer_site not in names:
                self.stats.handshake_failures += 1
                self._drop(connection, f"peer certificate names {sorted(names)}, not {self.peer_site!r}")
                return
        local = self._hello()
        assert local.incarnation == self._incarnation, "a Link lives for one local incarnation"
        hello = bytearray()
        encode_link_hello(hello, local.epoch, self.pair_id, self.local_site, local.incarnation, local.extras)
        connection.write(hello)
        connection.handshake_timer = self._loop.call_later(
            self.limits.handshake_timeout_ms / 1000, self._handshake_timed_out, connection
        )

    def _handshake_timed_out(self, connection: _Connection) -> None:
        if not connection.up and not connection.dropped:
            self.stats.handshake_failures += 1
            self._drop(connection, "no HELLO from the peer in time")

    def reset(self, reason: str) -> None:
        """Drop the current connection (the core asked for it); the dialing side reconnects."""
        if self._active is not None:
            self._drop(self._active, reason)

    def _drop(self, connection: _Connection, reason: str, graceful: bool = False) -> None:
        """Close a connection (idempotent); report LinkDown if it was the active one."""
        if connection.dropped:
            return
        connection.dropped = True
        if connection.handshake_timer is not None:
            connection.handshake_timer.cancel()
        self._connections.discard(connection)
        if connection.transport is not None:
            if graceful:
                connection.closing = True
                connection.flush()
                connection.transport.close()
            else:
                connection.transport.abort()
        if not connection.finished.done():
            connection.finished.set_result(None)
        if connection is self._active:
            self._active = None
            self._up_event.clear()
            self._on_state(LinkDown(reason))

    def _refuse(self, connection: _Connection, reason_code: int, reason: str) -> None:
        self.stats.handshake_failures += 1
        if not connection.up:
            self._on_refused(f"refused a connection: {reason}")
        goodbye = bytearray()
        encode_link_goodbye(goodbye, self._hello().epoch, reason_code, reason)
        connection.write(goodbye)
        self._drop(connection, reason, graceful=True)

    # --- receiving ----------------------------------------------------------------

    def _frames_received(self, connection: _Connection, frames: list[Frame]) -> None:
        for frame in frames:
            if connection.dropped:
                return
            self.stats.frames_received += 1
            if not connection.up:
                if frame.type == FrameType.LINK_GOODBYE:
                    self.stats.handshake_failures += 1
                    self._on_refused(f"the peer refused the connection: {frame.body}")
                    self._drop(connection, f"the peer said goodbye: {frame.body}")
                    return
                if frame.type != FrameType.LINK_HELLO:
                    self._refuse(connection, GOODBYE_PROTOCOL_ERROR, f"expected LINK_HELLO, got {frame.type.name}")
                    return
                assert isinstance(frame.body, LinkHello)
                self._handshake(connection, frame.body, frame.epoch)
                continue
            if frame.type == FrameType.LINK_HELLO:
                self._refuse(connection, GOODBYE_PROTOCOL_ERROR, "LINK_HELLO after the handshake")
                return
            if frame.type == FrameType.LINK_GOODBYE:
                body = frame.body
                assert isinstance(body, Goodbye)
                if body.reason == GOODBYE_WRONG_PEER:
                    # The peer refused us after its LINK_HELLO went out (a duplicate of a live instance, a
                    # wrong pair): not a session worth resetting the reconnect backoff for.
                    connection.refused = True
                    self._on_refused(f"the peer refused the connection: {body.message}")
                self._drop(connection, f"the peer said goodbye: {body.message}")
                return
            if frame.link_ack and not self._acknowledge(connection, frame.link_ack):
                return
            if frame.type in SEQUENCED_TYPES:
                if frame.link_seq != self._received_seq + 1:
                    self._refuse(
                        connection,
                        GOODBYE_PROTOCOL_ERROR,
                        f"link seq {frame.link_seq} after {self._received_seq}",
                    )
                    return
                self._received_seq = frame.link_seq
                self._on_frame(frame)
            elif frame.type != FrameType.LINK_ACK:
                if frame.link_seq != 0:
                    self._refuse(connection, GOODBYE_PROTOCOL_ERROR, f"{frame.type.name} with a link seq")
                    return
                self._on_frame(frame)
        if self._received_seq > self._ack_sent and not self._ack_flush_scheduled:
            # Acknowledge after this tick, so that frames the core sends in reply carry the ack instead.
            self._ack_flush_scheduled = True
            self._loop.call_soon(self._flush_ack)

    def _flush_ack(self) -> None:
        self._ack_flush_scheduled = False
        if self._active is not None and self._received_seq > self._ack_sent:
            self._send_link_ack(self._active)

    def _send_link_ack(self, connection: _Connection) -> None:
        ack = bytearray()
        encode_link_ack(ack, self._hello().epoch)
        stamp_link(ack, 0, 0, self._received_seq)
        self._ack_sent = self._received_seq
        connection.write(ack)

    def _acknowledge(self, connection: _Connection, ack: int) -> bool:
        if ack >= self._next_seq:
            self._refuse(connection, GOODBYE_PROTOCOL_ERROR, f"ack {ack} for a frame never sent")
            return False
        released = False
        queue = self._queue
        while queue and queue[0][0] <= ack:
            _, size = queue.popleft()
            self._unacknowledged_bytes -= size
            released = True
        if released:
            self._space.set()
        return True

    def _handshake(self, connection: _Connection, hello: LinkHello, peer_epoch: int) -> None:
        if hello.pair_id != self.pair_id or hello.site != self.peer_site:
            self._refuse(
                connection,
                GOODBYE_WRONG_PEER,
                f"expected pair {self.pair_id!r} site {self.peer_site!r}, got {hello.pair_id!r} {hello.site!r}",
            )
            return
        previous = self._active
        if (
            previous is not None
            and hello.incarnation != self._peer_incarnation
            and self._loop.time() - previous.last_received < 2 * self.limits.heartbeat_interval_ms / 1000
        ):
            # Another process claims the peer's name while the one we have is alive (it was heard
            # within two heartbeats): a duplicate instance of the peer site. Keep the live one. A peer
            # that restarted after a crash is silent by then, so it gets in on its next attempt.
            self._refuse(
                connection,
                GOODBYE_WRONG_PEER,
                f"site {self.peer_site!r} is already connected from another live process "
                f"(incarnation {self._peer_incarnation}); a second instance of it is refused",
            )
            return
        # A new session: what the peer did not acknowledge on the connection before is the core's to
        # recover (it starts every session with its Hello).
        peer_restarted = self._peer_incarnation is not None and hello.incarnation != self._peer_incarnation
        dropped = len(self._queue)
        self._queue.clear()
        self._unacknowledged_bytes = 0
        self._next_seq = 1
        self._received_seq = 0
        self._ack_sent = 0
        self._peer_incarnation = hello.incarnation
        self.sessions += 1
        self._space.set()
        if connection.handshake_timer is not None:
            connection.handshake_timer.cancel()
        previous = self._active
        if previous is not None:
            self._drop(previous, "replaced by a new connection from the peer")
        connection.peer_hello = hello
        connection.up = True
        self._active = connection
        self.stats.connections_up += 1
        self._up_event.set()
        self._on_state(LinkUp(hello, peer_epoch, peer_restarted, dropped))

    # --- liveness -------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        interval = self.limits.heartbeat_interval_ms / 1000
        timeout = self.limits.heartbeat_timeout_ms / 1000
        while True:
            await asyncio.sleep(interval / 2)
            now = self._loop.time()
            for connection in list(self._connections):
                if now - connection.last_received > timeout:
                    self.stats.silent_connections += 1
                    self._drop(connection, f"nothing from the peer for {self.limits.heartbeat_timeout_ms} ms")
                elif connection.up and (now - connection.last_sent >= interval or self._received_seq > self._ack_sent):
                    self._send_link_ack(connection)
