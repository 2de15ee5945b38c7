"""The site-to-site link: one TCP (optionally mutual-TLS) connection carrying frames.

Theory of operation
-------------------
The link carries the frames the core hands it and reports the frames that
arrive; it knows nothing of records, epochs or states beyond what it needs
to keep a byte stream going across broken connections:

* One end dials (`role="connect"`), the other accepts (`role="accept"`).
  On every new connection both ends first send HELLO (pair id, site, epoch,
  incarnation, state, extras from the core, and the link's resume point)
  and wait for the peer's; a HELLO for another pair or site is refused with
  GOODBYE.
* Frames of the types in `SEQUENCED_TYPES` are numbered (`link_seq` in the
  header, 1, 2, 3 ... within one *session*, that is one pair of
  incarnations) and kept in a resend queue until the peer acknowledges them
  (`link_ack` in the header of every frame the peer sends, and LINK_ACK
  frames when it has nothing else to send). After a reconnect the peer's
  HELLO says up to where it received (`resume_seq`, valid only if its
  `resume_incarnation` is ours); the rest of the queue is sent again. The
  receiver delivers a sequenced frame only if it is the next one expected:
  a duplicate is dropped, a gap is a protocol error.
* The bytes in the resend queue are bounded by `inflight_bytes_max`: `send`
  waits while the window is full (back-pressure toward the writers), in
  first-come order.
* With `resume=False` every connection is a session of its own: at each
  handshake the resend queue is dropped and the numbering restarts, as after a
  peer restart. The site daemon runs its link that way, because its core
  treats every connection as a new session (Hello, then reconcile or resync)
  and a frame of the session before would be stale in the next one.
* A new peer incarnation in HELLO means the peer restarted: the resend queue
  is dropped (the peer lost what it had not persisted; the core runs its own
  recovery), the sequence numbers restart, and LinkUp says so. A Link object
  lives for one local incarnation: the daemon builds a new one after a
  restart, with the incarnation bumped.
* A frame that fails to decode (CRC, length, type ...) drops the connection;
  nothing from it is delivered and it is not acknowledged, so it is sent
  again on the next connection. Silence longer than `heartbeat_timeout_ms`
  (a black hole) drops the connection too. The dialing end reconnects with
  exponential backoff and jitter.

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
    MAGIC,
    SEQUENCED_TYPES,
    Frame,
    FrameDecoder,
    FrameType,
    FramingError,
    Hello,
    encode_goodbye,
    encode_hello,
    encode_link_ack,
    stamp_link,
)
from replicator.transport.config import LinkLimits, TlsConfig, certificate_names

_PAYLOAD_LENGTH = struct.Struct("<I")

# GOODBYE reason codes sent by the link itself (the core uses codes from 16 up).
GOODBYE_CLOSING = 1
GOODBYE_WRONG_PEER = 2
GOODBYE_PROTOCOL_ERROR = 3


@dataclass(frozen=True, slots=True)
class LocalHello:
    """What the core says about itself in every HELLO (asked for at each connection)."""

    epoch: int
    incarnation: int
    state: int
    extras: bytes = b""


@dataclass(frozen=True, slots=True)
class LinkUp:
    peer: Hello
    peer_epoch: int
    # The peer's incarnation changed: the frames not acknowledged before were dropped.
    peer_restarted: bool
    frames_resent: int
    frames_dropped: int


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
    frames_resent: int = 0
    frames_received: int = 0
    duplicates_dropped: int = 0
    frames_dropped_stale: int = 0  # without resume: handed over in a session that ended before they went out
    bytes_sent: int = 0
    bytes_received: int = 0


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection: reads into the decoder, hands frames to the link."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.decoder = FrameDecoder(link.limits.frame_size_bytes_max, link.limits.receive_buffer_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer_hello: Hello | None = None
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
        resume: bool = True,
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
        self.resume = resume
        self.sessions = 0  # handshakes that started a new session (each one, without resume)
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
        self._queue: collections.deque[tuple[int, bytearray]] = collections.deque()
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

        Sequenced frames are kept until acknowledged and resent after a
        reconnect; this waits while `inflight_bytes_max` would be exceeded.
        Other frames (heartbeats, goodbye) go out only if the link is up and
        are dropped otherwise: late, they would mean nothing.
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
        if frame_type in (FrameType.HELLO, FrameType.LINK_ACK):
            raise ValueError("HELLO and LINK_ACK frames belong to the link")
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
            if not self.resume and self.sessions != sessions:
                self.stats.frames_dropped_stale += 1
                return  # handed over for a session that ended while it waited: stale in the new one
            seq = self._next_seq
            self._next_seq += 1
            self._queue.append((seq, frame))
            self._unacknowledged_bytes += size
            connection = self._active
            if connection is not None:
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
            encode_goodbye(goodbye, self._hello().epoch, reason, message)
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
        encode_hello(
            hello,
            local.epoch,
            self.pair_id,
            self.local_site,
            local.incarnation,
            local.state,
            self._peer_incarnation or 0,
            self._received_seq,
            local.extras,
        )
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
        encode_goodbye(goodbye, self._hello().epoch, reason_code, reason)
        connection.write(goodbye)
        self._drop(connection, reason, graceful=True)

    # --- receiving ----------------------------------------------------------------

    def _frames_received(self, connection: _Connection, frames: list[Frame]) -> None:
        for frame in frames:
            if connection.dropped:
                return
            self.stats.frames_received += 1
            if not connection.up:
                if frame.type == FrameType.GOODBYE:
                    self.stats.handshake_failures += 1
                    self._on_refused(f"the peer refused the connection: {frame.body}")
                    self._drop(connection, f"the peer said goodbye: {frame.body}")
                    return
                if frame.type != FrameType.HELLO:
                    self._refuse(connection, GOODBYE_PROTOCOL_ERROR, f"expected HELLO, got {frame.type.name}")
                    return
                assert isinstance(frame.body, Hello)
                self._handshake(connection, frame.body, frame.epoch)
                continue
            if frame.type == FrameType.HELLO:
                self._refuse(connection, GOODBYE_PROTOCOL_ERROR, "HELLO after the handshake")
                return
            if frame.type == FrameType.GOODBYE and getattr(frame.body, "reason", None) == GOODBYE_WRONG_PEER:
                # The peer refused us after its HELLO went out (a duplicate of a live instance, a wrong
                # pair): not a session worth resetting the reconnect backoff for.
                connection.refused = True
                self._on_refused(f"the peer refused the connection: {getattr(frame.body, 'message', '')}")
            if frame.link_ack and not self._acknowledge(connection, frame.link_ack):
                return
            if frame.type in SEQUENCED_TYPES:
                if frame.link_seq <= self._received_seq:
                    self.stats.duplicates_dropped += 1
                    continue
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
            _, frame = queue.popleft()
            self._unacknowledged_bytes -= len(frame)
            released = True
        if released:
            self._space.set()
        return True

    def _handshake(self, connection: _Connection, hello: Hello, peer_epoch: int) -> None:
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
        peer_restarted = False
        dropped = 0
        if self._peer_incarnation is None:
            self._peer_incarnation = hello.incarnation
        if hello.incarnation != self._peer_incarnation or not self.resume:
            # A new session: what the old peer did not acknowledge is the core's to recover.
            peer_restarted = hello.incarnation != self._peer_incarnation
            dropped = len(self._queue)
            self._queue.clear()
            self._unacknowledged_bytes = 0
            self._next_seq = 1
            self._received_seq = 0
            self._ack_sent = 0
            self._peer_incarnation = hello.incarnation
            self.sessions += 1
            self._space.set()
        resume = hello.resume_seq if hello.resume_incarnation == self._incarnation and self.resume else 0
        if resume >= self._next_seq or (self._queue and self._queue[0][0] > resume + 1):
            self._refuse(
                connection,
                GOODBYE_PROTOCOL_ERROR,
                f"resume point {resume} does not match the frames sent (next {self._next_seq})",
            )
            return
        self._acknowledge(connection, resume)
        if connection.handshake_timer is not None:
            connection.handshake_timer.cancel()
        previous = self._active
        if previous is not None:
            self._drop(previous, "replaced by a new connection from the peer")
        connection.peer_hello = hello
        connection.up = True
        self._active = connection
        self.stats.connections_up += 1
        for seq, frame in self._queue:
            # A fresh copy: the old connection's transport may still hold the original.
            copy = bytearray(frame)
            stamp_link(copy, 0, seq, self._received_seq)
            connection.write(copy)
        self._ack_sent = self._received_seq
        self.stats.frames_resent += len(self._queue)
        self._up_event.set()
        self._on_state(LinkUp(hello, peer_epoch, peer_restarted, len(self._queue), dropped))

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
