"""Events into the site core and actions out of it.

Events are facts (past tense) or commands (imperative); both are frozen
values. `SiteCore.step(event, now)` returns a list of actions. The shell's
rules, which every driver (asyncio daemon, simulator, tests) follows:

1. Execute the actions in the order given.
2. `Persist` is written at once (visible to reads of the store) and made
   durable later; persists become durable *in order*, and the shell reports
   `Persisted(persist_id)` for the highest id that is durable. The core never
   emits an action that depends on a persist being durable: it waits for the
   `Persisted` event itself. A failed sync is reported as `PersistFailed` and
   the site stops (fail-stop).
3. `SendToPeer` messages go out in order on the current connection (or are
   dropped if there is none: the core recovers through reconnection).
4. `ServeRead` is executed before the next event: the shell reads the key
   from the store and answers the client.
5. `AskWitness` is answered later by `WitnessAnswered` or `WitnessFailed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replicator.core.errors import ReadError, WriteError
from replicator.core.messages import PeerMessage, Role, WitnessAnswer, WitnessRequest
from replicator.core.records import Operation, Record, RecordId, Versioned

# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class WriteRequested:
    handle: int  # the shell's name for the waiting client
    request_id: bytes
    operations: tuple[Operation, ...]


@dataclass(frozen=True, slots=True)
class ReadRequested:
    handle: int
    key: bytes


@dataclass(frozen=True, slots=True)
class FailoverForced:
    """The operator forces this site to go on alone (through the witness). The
    shell checks first that the site is not serving (SUSPENDED, FENCED or
    STARTING), holds complete data (not a resync target) and has no peer."""


@dataclass(frozen=True, slots=True)
class TimePassed:
    """A tick: lets the core run its timers (heartbeats, timeouts, retries)."""


@dataclass(frozen=True, slots=True)
class Persisted:
    persist_id: int


@dataclass(frozen=True, slots=True)
class PersistFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """A connection to the peer is up; the core answers with its Hello."""


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    pass


@dataclass(frozen=True, slots=True)
class PeerSent:
    message: PeerMessage


@dataclass(frozen=True, slots=True)
class WitnessAnswered:
    request: WitnessRequest
    answer: WitnessAnswer


@dataclass(frozen=True, slots=True)
class WitnessFailed:
    request: WitnessRequest


@dataclass(frozen=True, slots=True)
class ResyncBatchLoaded:
    """Answer to LoadResyncBatch: current versions of the asked keys / range.

    The shell may answer with a prefix only (what fits in one link frame, at least one entry):
    for keys, the first len(entries) of them, the rest go back to the queue; for a scan,
    next_position continues after the last entry.
    """

    token: int
    entries: tuple[Versioned, ...]
    # For a full-resync scan: where the next scan starts, None when done.
    next_position: bytes | None


Event = (
    WriteRequested
    | ReadRequested
    | TimePassed
    | FailoverForced
    | Persisted
    | PersistFailed
    | PeerConnected
    | PeerDisconnected
    | PeerSent
    | WitnessAnswered
    | WitnessFailed
    | ResyncBatchLoaded
)


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Persist:
    """One atomic batch. Fields are applied in this order: clear_data, log
    deletes, log puts, applies (last-writer-wins on ts), dirty changes,
    dedup, meta.

    `urgent` False: no acknowledgement waits for this persist (a commit's
    apply, a log delete): the shell writes it at once (visible to reads) but
    need not start a sync for it; it becomes durable with the next sync, within
    a bound. `Persisted` still comes only once it is durable, so what waits on
    it waits a little longer and nothing else changes; a crash loses a suffix of
    the persists, as always (the record stays in the log until a later delete)."""

    persist_id: int
    log_put: tuple[Record, ...] = ()
    log_delete: tuple[RecordId, ...] = ()
    apply: tuple[Versioned, ...] = ()
    dirty_add: tuple[bytes, ...] = ()
    dirty_remove: tuple[bytes, ...] = ()
    dedup_put: tuple[tuple[bytes, int], ...] = ()  # (request id, ts of the outcome)
    meta: tuple[tuple[str, int | bytes | str], ...] = ()
    clear_data: bool = False
    urgent: bool = True


@dataclass(frozen=True, slots=True)
class SendToPeer:
    message: PeerMessage


@dataclass(frozen=True, slots=True)
class DropPeerConnection:
    reason: str


@dataclass(frozen=True, slots=True)
class AnswerWrite:
    handle: int
    ok: bool
    ts: int = 0
    duplicate: bool = False
    error: WriteError | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class ServeRead:
    handle: int
    key: bytes


@dataclass(frozen=True, slots=True)
class RejectRead:
    handle: int
    error: ReadError
    message: str = ""


@dataclass(frozen=True, slots=True)
class AskWitness:
    request: WitnessRequest


@dataclass(frozen=True, slots=True)
class LoadResyncBatch:
    token: int
    keys: tuple[bytes, ...] = ()  # incremental: these keys
    scan_from: bytes | None = None  # full: a scan from here (inclusive)
    limit: int = 0


@dataclass(frozen=True, slots=True)
class RoleChanged:
    """For logs, metrics and the split-brain checker."""

    old: Role
    new: Role
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class Committed:
    """A record became visible at this site (for the split-brain checker and metrics)."""

    record_id: RecordId
    epoch: int
    role: Role
    alone: bool  # committed without the peer's acknowledgement (SOLO / takeover)


@dataclass(frozen=True, slots=True)
class Stop:
    reason: str


Action = (
    Persist
    | SendToPeer
    | DropPeerConnection
    | AnswerWrite
    | ServeRead
    | RejectRead
    | AskWitness
    | LoadResyncBatch
    | RoleChanged
    | Committed
    | Stop
)


@dataclass(slots=True)
class Recovered:
    """What a site finds on its disk at start-up (from the store)."""

    meta: dict[str, int | bytes | str] = field(default_factory=dict)
    log: list[Record] = field(default_factory=list)
    dirty: set[bytes] = field(default_factory=set)
    dedup: dict[bytes, int] = field(default_factory=dict)
