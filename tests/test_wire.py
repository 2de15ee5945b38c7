"""Core messages <-> link frames (replicator/daemon/wire.py): every message survives the trip,
and a control frame with the wrong numbers is refused, not half-read."""

from __future__ import annotations

import pytest

from replicator import framing
from replicator.core import messages as msg
from replicator.core.messages import Role
from replicator.core.records import Operation, Record, RecordId
from replicator.daemon.wire import Decoder, Encoder

RECORD = Record(RecordId("a", 3, 7), 2, 1234, b"req", (Operation(b"k", b"v"),))
MESSAGES: list[msg.PeerMessage] = [
    msg.Hello(2, "a", "pair", Role.SYNC, 3, b"gen", 1),
    msg.ShipRecords(2, (RECORD,)),
    msg.PreparedAck(2, 3, 7),
    msg.CommitWatermark(2, 3, 7),
    msg.CommitConfirm(2, 3, 7),
    msg.Heartbeat(2, 5),
    msg.HeartbeatAck(2, 5, True),
    msg.ReconcileDone(2, 8),
    msg.ReconcileAck(2),
    msg.ResyncBegin(2, True, 9),
    msg.ResyncBegin(2, False, 1),
    msg.ResyncBeginAck(2, (b"x", b"y"), 4),
    msg.ResyncAck(2, 11),
    msg.ResyncSynced(3),
]


def _trip(message: msg.PeerMessage) -> list[msg.PeerMessage]:
    decoder = Decoder(pair="pair", peer="a")
    out = []
    for frame in Encoder("a").encode(message):
        decoded = decoder.decode(framing.decode_frame(bytes(frame)))
        if decoded is not None:
            out.append(decoded)
    return out


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_core_messages_survive_the_link(message: msg.PeerMessage) -> None:
    assert _trip(message) == [message]


@pytest.mark.parametrize(
    "kind, counts",
    [
        (framing.ResyncKind.RECONCILE_DONE, ()),
        (framing.ResyncKind.BEGIN, (1,)),
        (framing.ResyncKind.BEGIN_ACK, ()),
        (framing.ResyncKind.BEGIN_ACK, (1, 2)),
    ],
)
def test_control_frames_without_their_next_seq_are_malformed(kind: framing.ResyncKind, counts: tuple[int, ...]) -> None:
    out = bytearray()
    framing.encode_resync_control(out, 2, kind, counts)
    with pytest.raises(framing.MalformedFrame):
        Decoder(pair="pair", peer="a").decode(framing.decode_frame(bytes(out)))
