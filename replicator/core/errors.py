"""The kinds of error that leave the core: enums, never free-form strings.

Local errors (the caller misused the core, a bug) raise `ProtocolError` with a
`ProtocolErrorKind`. A broken invariant raises `InvariantViolation`, an
`AssertionError` raised explicitly, so it stays on under `python -O`, and is
never caught: the site crashes rather than limp on (TigerBeetle's rule).
Remote errors (the peer sent what this role cannot take) are counted, named by
a `RemoteErrorKind`, and end the session. A client's write or read that cannot
be served gets a `WriteError` or `ReadError`; they are `StrEnum`s, so a shell
that compares them with the old strings keeps working.
"""

from __future__ import annotations

import enum


class ProtocolErrorKind(enum.Enum):
    NOT_IN_TABLE = "the (role, event) pair is not in the transition table"
    STOPPED = "the site is stopped"
    PERSIST_NEVER_ISSUED = "Persisted names a persist id the core never issued"
    FAILOVER_REFUSED = "a forced failover needs a site that is not a resync target, without a peer"
    BAD_RESYNC_BATCH = "a loaded resync batch is not a non-empty prefix of the asked keys, or too large"


class ProtocolError(Exception):
    """An event this role cannot take: a bug in the caller (local error)."""

    def __init__(self, kind: ProtocolErrorKind, detail: str = "") -> None:
        super().__init__(f"{kind.name}: {detail or kind.value}")
        self.kind = kind
        self.detail = detail


class InvariantViolation(AssertionError):
    """A broken invariant of the core: never caught, the site crashes."""


def invariant(condition: bool, message: str) -> None:
    """Check an invariant; unlike `assert`, not stripped by `python -O`."""
    if not condition:
        raise InvariantViolation(message)


class RemoteErrorKind(enum.Enum):
    """What the peer did wrong; the session drops and `protocol_errors` counts it."""

    NOT_IN_TABLE = "the peer sent a message this role cannot take"
    UNEXPECTED_HELLO = "a second Hello, or a Hello without a connection"
    OUT_OF_SEQUENCE = "records, acks, watermarks or confirms outside the announced sequence"
    SECOND_RESYNC_BEGIN_ACK = "a second ResyncBeginAck in one session"
    UNKNOWN_RESYNC_BATCH = "a ResyncAck for a batch never sent"
    RESYNC_BEGIN_NOT_AHEAD = "a ResyncBegin from a site that is not ahead of us"
    RESYNC_SYNCED_UNEXPECTED = "a ResyncSynced that does not follow a resync of this site"


class WriteError(enum.StrEnum):
    UNAVAILABLE = "unavailable"
    UNKNOWN = "unknown"  # the outcome is unknown: the write may still commit
    OVERLOADED = "overloaded"
    INVALID = "invalid"


class ReadError(enum.StrEnum):
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    OVERLOADED = "overloaded"
    STOPPED = "stopped"
