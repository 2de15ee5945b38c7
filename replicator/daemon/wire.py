"""Core peer messages <-> frames (docs/wire.md, "Core messages").

The link carries frames; the protocol core speaks `replicator.core.messages`.
This module is the only place that knows how one maps onto the other:

- Hello: RESYNC_CONTROL CORE_HELLO, counts (epoch, role, incarnation,
  synced_epoch, clock_high), key = generation (the link's own HELLO names the sites);
- ShipRecords: RECORDS; a reconcile shipment is preceded by RECONCILE_START
  and ended by RECONCILE_DONE, so the receiver marks the records in between;
- PreparedAck / CommitWatermark / CommitConfirm: the cumulative frames;
- Heartbeat / HeartbeatAck: HEARTBEAT(_ACK), the lease bit in the nonce's top bit;
- the resync and reconcile controls: RESYNC_CONTROL kinds;
- ResyncData: RESYNC_DATA; Goodbye: GOODBYE.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from replicator import framing
from replicator.core import messages as msg
from replicator.core.messages import Role
from replicator.core.records import Record
from replicator.transport.link import GOODBYE_CLOSING

Kind = framing.ResyncKind
FT = framing.FrameType
LEASE_BIT = 1 << 63
ROLES = list(Role)


def _pack_keys(keys: tuple[bytes, ...]) -> bytes:
    return b"".join(struct.pack("<I", len(key)) + key for key in keys)


def _unpack_keys(blob: bytes) -> tuple[bytes, ...]:
    keys = []
    position = 0
    while position < len(blob):
        (length,) = struct.unpack_from("<I", blob, position)
        position += 4
        keys.append(bytes(blob[position : position + length]))
        position += length
    if position != len(blob):
        raise framing.MalformedFrame("bad key list")
    return tuple(keys)


def _pack_dedup(entries: tuple[tuple[bytes, int], ...]) -> bytes:
    return b"".join(struct.pack("<IQ", len(q), ts) + q for q, ts in entries)


def _unpack_dedup(blob: bytes) -> tuple[tuple[bytes, int], ...]:
    entries = []
    position = 0
    while position < len(blob):
        length, ts = struct.unpack_from("<IQ", blob, position)
        position += 12
        entries.append((bytes(blob[position : position + length]), ts))
        position += length
    if position != len(blob):
        raise framing.MalformedFrame("bad dedup list")
    return tuple(entries)


# Goodbye frames the link itself sends on a clean close (replicator/transport/link.py, Link.close).
LINK_GOODBYE_REASONS = frozenset({GOODBYE_CLOSING})
LINK_GOODBYE_MESSAGES = frozenset({"closing"})


@dataclass
class Encoder:
    """Turns core messages into frames; remembers whether a reconcile shipment is open."""

    site: str
    # The link's frame limit: every frame made is checked against it (the core cut the message
    # to message_bytes_max, the frame limit less a headroom; this is the pair assertion).
    frame_bytes_max: int | None = None
    reconcile_open: bool = False

    def encode(self, message: msg.PeerMessage) -> list[bytearray]:
        frames = self._encode(message)
        if self.frame_bytes_max is not None:
            for frame in frames:
                assert len(frame) <= self.frame_bytes_max, (
                    f"{type(message).__name__} made a frame of {len(frame)} bytes, over {self.frame_bytes_max}"
                )
        return frames

    def _encode(self, message: msg.PeerMessage) -> list[bytearray]:
        frames: list[bytearray] = []

        def frame() -> bytearray:
            out = bytearray()
            frames.append(out)
            return out

        if isinstance(message, msg.Hello):
            self.reconcile_open = False
            framing.encode_resync_control(
                frame(),
                message.epoch,
                Kind.CORE_HELLO,
                (message.epoch, ROLES.index(message.role), message.incarnation, message.synced_epoch)
                + (() if message.clock_high is None else (message.clock_high,)),
                message.generation,
            )
        elif isinstance(message, msg.ShipRecords):
            if message.reconcile and not self.reconcile_open:
                self.reconcile_open = True
                framing.encode_resync_control(frame(), message.epoch, Kind.RECONCILE_START)
            framing.encode_records(frame(), message.epoch, message.records)
        elif isinstance(message, msg.ReconcileDone):
            self.reconcile_open = False
            framing.encode_resync_control(frame(), message.epoch, Kind.RECONCILE_DONE, (message.next_seq,))
        elif isinstance(message, msg.ReconcileAck):
            framing.encode_resync_control(frame(), message.epoch, Kind.RECONCILE_ACK)
        elif isinstance(message, msg.PreparedAck):
            framing.encode_cumulative(frame(), FT.PREPARED_ACK, message.epoch, self.site, message.incarnation, message.seq)
        elif isinstance(message, msg.CommitWatermark):
            framing.encode_cumulative(
                frame(), FT.COMMIT_WATERMARK, message.epoch, self.site, message.incarnation, message.seq
            )
        elif isinstance(message, msg.CommitConfirm):
            framing.encode_cumulative(
                frame(), FT.COMMIT_CONFIRM, message.epoch, self.site, message.incarnation, message.seq
            )
        elif isinstance(message, msg.Heartbeat):
            framing.encode_heartbeat(frame(), FT.HEARTBEAT, message.epoch, message.nonce)
        elif isinstance(message, msg.HeartbeatAck):
            nonce = message.nonce | (LEASE_BIT if message.lease_granted else 0)
            framing.encode_heartbeat(frame(), FT.HEARTBEAT_ACK, message.epoch, nonce)
        elif isinstance(message, msg.ResyncBegin):
            framing.encode_resync_control(frame(), message.epoch, Kind.BEGIN, (int(message.full), message.next_seq))
        elif isinstance(message, msg.ResyncBeginAck):
            framing.encode_resync_control(
                frame(), message.epoch, Kind.BEGIN_ACK, (message.next_seq,), _pack_keys(message.suspect_keys)
            )
        elif isinstance(message, msg.ResyncDedup):
            framing.encode_resync_control(frame(), message.epoch, Kind.DEDUP, (), _pack_dedup(message.entries))
        elif isinstance(message, msg.ResyncData):
            framing.encode_resync_data(frame(), message.epoch, message.batch, message.entries)
        elif isinstance(message, msg.ResyncAck):
            framing.encode_resync_control(frame(), message.epoch, Kind.ACK, (message.batch,))
        elif isinstance(message, msg.ResyncSynced):
            framing.encode_resync_control(frame(), message.epoch, Kind.SYNCED)
        elif isinstance(message, msg.Goodbye):
            framing.encode_goodbye(frame(), message.epoch, message.reason.value, message.message[:1000])
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"no frame for {message!r}")
        return frames


@dataclass
class Decoder:
    """Turns frames from the peer into core messages (None for frames the core does not see)."""

    pair: str
    peer: str
    reconcile_open: bool = False

    def reset(self) -> None:
        self.reconcile_open = False

    def decode(self, frame: framing.Frame) -> msg.PeerMessage | None:
        body = frame.body
        epoch = frame.epoch
        if frame.type == FT.RECORDS:
            records: tuple[Record, ...] = tuple(view.materialise() for view in body.records)
            return msg.ShipRecords(epoch, records, reconcile=self.reconcile_open)
        if frame.type == FT.PREPARED_ACK:
            return msg.PreparedAck(epoch, body.incarnation, body.seq)
        if frame.type == FT.COMMIT_WATERMARK:
            return msg.CommitWatermark(epoch, body.incarnation, body.seq)
        if frame.type == FT.COMMIT_CONFIRM:
            return msg.CommitConfirm(epoch, body.incarnation, body.seq)
        if frame.type == FT.HEARTBEAT:
            return msg.Heartbeat(epoch, body.nonce)
        if frame.type == FT.HEARTBEAT_ACK:
            return msg.HeartbeatAck(epoch, body.nonce & ~LEASE_BIT, bool(body.nonce & LEASE_BIT))
        if frame.type == FT.RESYNC_DATA:
            return msg.ResyncData(epoch, body.batch_seq, tuple(entry.materialise() for entry in body.entries))
        if frame.type == FT.GOODBYE:
            if body.reason in LINK_GOODBYE_REASONS and body.message in LINK_GOODBYE_MESSAGES:
                # The link's own goodbye (a clean close), whose code 1 the core's STALE_EPOCH also uses:
                # told apart by its fixed message, so a peer that shuts down is not taken for "you are behind".
                return msg.Goodbye(epoch, msg.GoodbyeReason.SHUTDOWN, f"peer closed the link ({body.message})")
            try:
                reason = msg.GoodbyeReason(body.reason)
            except ValueError:
                reason = msg.GoodbyeReason.SHUTDOWN
            return msg.Goodbye(epoch, reason, body.message)
        if frame.type == FT.RESYNC_CONTROL:
            kind, counts, key = body.kind, body.counts, bytes(body.key)
            if kind == Kind.CORE_HELLO:
                self.reconcile_open = False
                if len(counts) not in (4, 5) or counts[1] >= len(ROLES):
                    raise framing.MalformedFrame("bad core hello")
                clock_high = counts[4] if len(counts) == 5 else None  # 4 counts: a version without it
                return msg.Hello(
                    counts[0], self.peer, self.pair, ROLES[counts[1]], counts[2], key, counts[3], clock_high
                )
            if kind == Kind.RECONCILE_START:
                self.reconcile_open = True
                return None
            if kind == Kind.RECONCILE_DONE:
                self.reconcile_open = False
                if len(counts) != 1:
                    raise framing.MalformedFrame("bad reconcile done")
                return msg.ReconcileDone(epoch, counts[0])
            if kind == Kind.RECONCILE_ACK:
                return msg.ReconcileAck(epoch)
            if kind == Kind.BEGIN:
                if len(counts) != 2:
                    raise framing.MalformedFrame("bad resync begin")
                return msg.ResyncBegin(epoch, bool(counts[0]), counts[1])
            if kind == Kind.BEGIN_ACK:
                if len(counts) != 1:
                    raise framing.MalformedFrame("bad resync begin ack")
                return msg.ResyncBeginAck(epoch, _unpack_keys(key), counts[0])
            if kind == Kind.DEDUP:
                return msg.ResyncDedup(epoch, _unpack_dedup(key))
            if kind == Kind.ACK:
                if len(counts) != 1:
                    raise framing.MalformedFrame("bad resync ack")
                return msg.ResyncAck(epoch, counts[0])
            if kind == Kind.SYNCED:
                return msg.ResyncSynced(epoch)
            raise framing.MalformedFrame(f"resync control kind {kind} is not used by this version")
        return None  # HELLO and LINK_ACK belong to the link
