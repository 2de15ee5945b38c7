"""Messages between the two sites and between a site and the witness.

These are the core's values; the transport encodes them as frames (see
docs/wire.md). Every peer message carries the sender's epoch (fencing,
DESIGN.md section 4). Cumulative acknowledgements and watermarks are about
the *receiver's peer's own* records, identified by `(incarnation, seq)`: a
site ships its own records in seq order and commits them in that order, so
one pair of numbers says "everything up to here".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from replicator.core.records import Record, Versioned


class Role(enum.Enum):
    """The states of a site (DESIGN.md section 4, plus RECONCILE: see docs/protocol.md)."""

    STARTING = "STARTING"
    SYNC = "SYNC"
    RECONCILE = "RECONCILE"
    SUSPENDED = "SUSPENDED"
    SOLO = "SOLO"
    FENCED = "FENCED"
    RESYNC_SOURCE = "RESYNC_SOURCE"
    RESYNC_TARGET = "RESYNC_TARGET"
    STOPPED = "STOPPED"


# ---------------------------------------------------------------- site <-> site


@dataclass(frozen=True, slots=True)
class Hello:
    epoch: int
    site: str
    pair: str
    role: Role
    incarnation: int
    generation: bytes
    # Set when this site finished resyncing the peer into `synced_epoch`
    # (so a target that missed ResyncSynced can be told again).
    synced_epoch: int


@dataclass(frozen=True, slots=True)
class ShipRecords:
    epoch: int
    records: tuple[Record, ...]
    # True when the records are shipped by a same-epoch reconciliation
    # (records of either origin, acknowledged by ReconcileAck, not PreparedAck).
    reconcile: bool = False


@dataclass(frozen=True, slots=True)
class PreparedAck:
    epoch: int
    incarnation: int
    seq: int


@dataclass(frozen=True, slots=True)
class CommitWatermark:
    epoch: int
    incarnation: int
    seq: int


@dataclass(frozen=True, slots=True)
class CommitConfirm:
    epoch: int
    incarnation: int
    seq: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    epoch: int
    nonce: int


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    epoch: int
    nonce: int
    lease_granted: bool


@dataclass(frozen=True, slots=True)
class ReconcileDone:
    """All of the sender's log records were shipped before this marker.

    `next_seq` is the seq of the first record the sender will ship after the
    reconcile (its incarnation is the one in its Hello): the receiver takes
    the sender's records in exactly that sequence from then on (a gap is a
    protocol error, see SiteCore._take_in_sequence)."""

    epoch: int
    next_seq: int


@dataclass(frozen=True, slots=True)
class ReconcileAck:
    """Every record shipped before the peer's ReconcileDone is durable here."""

    epoch: int


@dataclass(frozen=True, slots=True)
class ResyncBegin:
    epoch: int
    full: bool
    # The seq of the first record the source ships during and after the resync.
    next_seq: int


@dataclass(frozen=True, slots=True)
class ResyncBeginAck:
    """The target dropped its log; `suspect_keys` are the keys of the records
    it dropped. It may have committed some of them (as origin) and lost the
    apply in a crash, so the source sends their current versions too."""

    epoch: int
    suspect_keys: tuple[bytes, ...]
    # The seq of the first record the target ships once it is SYNC again.
    next_seq: int


@dataclass(frozen=True, slots=True)
class ResyncDedup:
    """The source's dedup entries (request id, ts of the outcome), so that a
    retry reaching the target after the resync is answered, not applied again."""

    epoch: int
    entries: tuple[tuple[bytes, int], ...]


@dataclass(frozen=True, slots=True)
class ResyncData:
    epoch: int
    batch: int
    entries: tuple[Versioned, ...]


@dataclass(frozen=True, slots=True)
class ResyncAck:
    epoch: int
    batch: int


@dataclass(frozen=True, slots=True)
class ResyncSynced:
    """The witness moved the pair to SYNC(epoch): the target joins it."""

    epoch: int


class GoodbyeReason(enum.Enum):
    STALE_EPOCH = 1  # the receiver is behind and must be resynchronised
    NOT_PEER = 2  # wrong pair or site name
    SHUTDOWN = 3


@dataclass(frozen=True, slots=True)
class Goodbye:
    epoch: int
    reason: GoodbyeReason
    message: str = ""


PeerMessage = (
    Hello
    | ShipRecords
    | PreparedAck
    | CommitWatermark
    | CommitConfirm
    | Heartbeat
    | HeartbeatAck
    | ReconcileDone
    | ReconcileAck
    | ResyncBegin
    | ResyncBeginAck
    | ResyncDedup
    | ResyncData
    | ResyncAck
    | ResyncSynced
    | Goodbye
)


# ---------------------------------------------------------------- site <-> witness


class WitnessMode(enum.Enum):
    SYNC = "SYNC"
    SOLO = "SOLO"


@dataclass(frozen=True, slots=True)
class Arbitrate:
    pair: str
    site: str
    epoch: int
    # An operator's forced failover: the witness grants the next epoch whatever
    # its state (the operator vouches that the other site is down).
    force: bool = False


@dataclass(frozen=True, slots=True)
class MarkSynced:
    pair: str
    site: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Query:
    """What is the pair's state? Changes nothing (answered with Verdict.STATE)."""

    pair: str
    site: str


@dataclass(frozen=True, slots=True)
class SetPreferred:
    """Planned switchover: `preferred` wins when both sites ask at once from now on.
    Answered with Verdict.STATE (done) or DENIED (not a site of the pair)."""

    pair: str
    site: str
    preferred: str
    epoch: int = 0  # unused; keeps every request's shape alike for logs


WitnessRequest = Arbitrate | MarkSynced | Query | SetPreferred


class Verdict(enum.Enum):
    GRANTED = "GRANTED"  # Arbitrate: the site goes on alone in `epoch`
    SYNCED = "SYNCED"  # MarkSynced: the pair is SYNC in `epoch`
    DENIED = "DENIED"
    STATE = "STATE"  # Query: the current state, nothing changed


@dataclass(frozen=True, slots=True)
class WitnessAnswer:
    verdict: Verdict
    epoch: int
    mode: WitnessMode
    holder: str  # "" when mode is SYNC
