"""The daemon's peer port: core messages to link frames, in order, one sender task.

The records of the writes started in one turn of the event loop go out as one
RECORDS frame (one ShipRecords for the peer's core: one persist and one ack
there), up to `outbox_bytes_max`; any other message sends them first. Each
frame is queued with the link session it was made for: once that session is
gone (`new_session`), what is still queued for it is stale and dropped.
"""

from __future__ import annotations

import asyncio

from replicator.core import messages as msg
from replicator.core.records import record_wire_bytes
from replicator.daemon.logs import log
from replicator.daemon.wire import Encoder
from replicator.transport.link import Link


class PeerOutbox:
    def __init__(self, encoder: Encoder, outbox_bytes_max: int) -> None:
        self.encoder = encoder
        self.link: Link | None = None
        self.outbox: msg.ShipRecords | None = None  # records of this turn of the loop, not yet encoded
        self.outbox_bytes = 0
        self.outbox_bytes_max = max(outbox_bytes_max, 1)
        self.outbox_scheduled = False
        # Frames for the peer, each with the link session it was made for.
        self.send_queue: asyncio.Queue[tuple[int, bytearray] | None] = asyncio.Queue()
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
            self.send_queue.put_nowait((self.link_session, frame))

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
                self.send_queue.put_nowait((self.link_session, frame))

    def new_session(self) -> None:
        """The link went up or down: what was queued for the connection that ended is stale."""
        self.flush()  # records held for the connection that just ended: queued, then dropped as stale
        self.link_session += 1

    def stop_sender(self) -> None:
        self.send_queue.put_nowait(None)

    async def run_sender(self) -> None:
        link = self.link
        assert link is not None
        while True:
            item = await self.send_queue.get()
            if item is None:
                return
            session, frame = item
            if session != self.link_session:
                continue  # made for a connection that is gone: the core starts over with Hello
            try:
                await link.send(frame)
            except (ValueError, OSError) as error:
                # A frame the link refuses (a bug: everything is cut to fit) must not kill the sender
                # silently: say so, drop the session, and let the core start over from a clean state.
                log("link_send_failed", level="error", error=error, frame_bytes=len(frame))
                link.reset(f"send failed: {error}")
