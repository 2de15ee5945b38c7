"""The daemon's peer port: core messages to link frames, in order, one sender task.

The records of the writes started in one turn of the event loop go out as one
RECORDS frame (one ShipRecords for the peer's core: one persist and one ack
there), up to `outbox_bytes_max`; any other message sends them first. Each
frame is queued with the link session it was made for: once that session is
gone (`new_session`), what is still queued for it is stale and dropped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from replicator import framing
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.records import record_wire_bytes
from replicator.daemon.bounded import FrameQueue
from replicator.daemon.logs import log
from replicator.daemon.wire import Encoder
from replicator.transport import LinkDown, LinkUp
from replicator.transport.link import Link, LocalHello


class PeerOutbox:
    def __init__(self, encoder: Encoder, outbox_bytes_max: int, send_queue_bytes_max: int) -> None:
        self.encoder = encoder
        self.link: Link | None = None
        self.outbox: msg.ShipRecords | None = None  # records of this turn of the loop, not yet encoded
        self.outbox_bytes = 0
        self.outbox_bytes_max = max(outbox_bytes_max, 1)
        self.outbox_scheduled = False
        # Frames for the peer, each with the link session it was made for.
        self.send_queue = FrameQueue(send_queue_bytes_max)  # bounded: writes are refused while it is full
        self.link_session = 0

    # ---------------------------------------------------------- PeerPort
    def send(self, message: msg.PeerMessage) -> None:
        if isinstance(message, msg.ShipRecords) and not message.reconcile:
            size = sum(record_wire_bytes(record) for record in message.records)
            held = self.outbox
            if held is not None and (held.epoch != message.epoch or self.outbox_bytes + size > self.outbox_bytes_max):
                self.flush()
                held = None
            if held is None:
                self.outbox = message
                self.outbox_bytes = size
                if not self.outbox_scheduled:
                    self.outbox_scheduled = True
                    asyncio.get_running_loop().call_soon(self.flush)
            else:
                self.outbox = msg.ShipRecords(held.epoch, held.records + message.records)
                self.outbox_bytes += size
            return
        self.flush()
        for frame in self.encoder.encode(message):
            self.send_queue.put(self.link_session, frame)

    def drop(self, reason: str) -> None:
        self.flush()
        log("peer_drop", reason=reason)
        if self.link is not None:
            self.link.reset(reason)

    # ---------------------------------------------------------- the daemon's side
    def flush(self) -> None:
        self.outbox_scheduled = False
        held = self.outbox
        if held is not None:
            self.outbox = None
            for frame in self.encoder.encode(held):
                self.send_queue.put(self.link_session, frame)

    def new_session(self) -> None:
        """The link went up or down: what was queued for the connection that ended is stale."""
        self.flush()  # records held for the connection that just ended: queued, then dropped as stale
        self.link_session += 1
        self.send_queue.drop_all()

    async def run_sender(self) -> None:
        link = self.link
        assert link is not None
        while True:
            session, frame = await self.send_queue.get()
            if session != self.link_session:
                continue  # made for a connection that is gone: the core starts over with Hello
            try:
                await link.send(frame)
            except (ValueError, OSError) as error:
                # A frame the link refuses (a bug: everything is cut to fit) must not kill the sender
                # silently: say so, drop the session, and let the core start over from a clean state.
                log("link_send_failed", level="error", error=error, frame_bytes=len(frame))
                link.reset(f"send failed: {error}")


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class PeerLinkMixin:
    """The link in SiteDaemon: made from the configuration, its callbacks turning frames into core
    messages and sessions into PeerConnected / PeerDisconnected (its attributes are the daemon's)."""

    @property
    def send_queue(self) -> FrameQueue:
        """The frames waiting for the link sender (the peer outbox's bounded queue)."""
        queue: FrameQueue = self.peer_port.send_queue
        return queue

    @property
    def link_session(self) -> int:
        session: int = self.peer_port.link_session
        return session

    def _make_link(self) -> Link:
        section = self.config.site
        dialer = self.name < self.peer
        return Link(
            role="connect" if dialer else "accept",
            pair_id=section.pair_id,
            local_site=self.name,
            peer_site=self.peer,
            address=_address(section.peer_address if dialer else self.config.listen.link),
            # The extras name our witness: two sites that use different witnesses never go on alone.
            hello=lambda: LocalHello(self.core.epoch, self._link_incarnation(), self.witness_id.encode()),
            on_frame=self._on_frame,
            on_state=self._on_link_state,
            limits=self.settings.link,
            tls=self.settings.link_tls,
            on_refused=self._on_link_refused,
        )


    def _on_link_refused(self, reason: str) -> None:
        """A link handshake refused by either end: counted, logged at most once per reason every 10 s."""
        self.m_link_refusals.inc()
        now = time.monotonic()
        if now - self.link_refusals_logged.get(reason, -1e9) < 10.0:
            return
        if len(self.link_refusals_logged) > 64:
            self.link_refusals_logged.clear()
        self.link_refusals_logged[reason] = now
        log("link_refused", level="error", site=self.name, peer=self.peer, reason=reason)

    def _link_incarnation(self) -> int:
        """The link resumes a session when the peer's incarnation is unchanged, so a wiped site
        (whose incarnations start again at 1) must not look like the process it replaced: the
        generation's first bytes make the number unique per data directory."""
        view = self.core.snapshot()
        return (int.from_bytes(view.generation[:3], "big") << 40) | view.incarnation

    def _on_link_state(self, event: Any) -> None:
        # Whatever the core queued for the connection that just ended (or for none) is stale from now on.
        self.peer_port.new_session()
        if isinstance(event, LinkUp):
            self.decoder.reset()
            self.peer_witness_id = bytes(event.peer.extras).decode(errors="replace")
            if self._witnesses_differ():
                self._log_witness_mismatch()
            self.m_link_ups.inc()
            log("link_up", peer_restarted=event.peer_restarted, frames_dropped=event.frames_dropped)
            self.step(ev.PeerConnected())
        elif isinstance(event, LinkDown):
            self.m_link_downs.inc()
            log("link_down", reason=event.reason)
            self.step(ev.PeerDisconnected())

    def _on_frame(self, frame: framing.Frame) -> None:
        try:
            message = self.decoder.decode(frame)
        except framing.FramingError as error:
            log("bad_frame", level="warning", error=str(error))
            if self.link is not None:
                self.link.reset("bad frame")
            return
        if message is not None:
            self.step(ev.PeerSent(message))
