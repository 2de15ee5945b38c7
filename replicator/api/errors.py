"""Typed errors a site backend raises; the servicers map each to one gRPC status.

| error            | gRPC status        | meaning for the client                                 |
|------------------|--------------------|--------------------------------------------------------|
| InvalidRequest   | INVALID_ARGUMENT   | bad input; nothing applied; do not retry               |
| NotFound         | NOT_FOUND          | the key (object, volume) does not exist                |
| Unavailable      | UNAVAILABLE        | this site cannot serve; nothing applied; try the other |
| OutcomeUnknown   | DEADLINE_EXCEEDED  | may or may not be applied: retry with the same id      |
| Corrupt          | DATA_LOSS          | a stored value failed its checksum, not repairable now |
| Refused          | FAILED_PRECONDITION| an admin action refused in this state; do not retry    |
| Changed          | ABORTED            | a large object changed while being read: read it again |
| Overloaded       | RESOURCE_EXHAUSTED | the site is busy (admission control); nothing applied: |
|                  |                    | retry at the same site after `replicator-retry-after-ms`|

Raising any of these promises that the call left no partial effect, except
OutcomeUnknown, whose whole point is that the write may have been applied
(entirely, never in part: a write is one atomic record).
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class of the operating errors a SiteBackend may raise."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(BackendError):
    """The request is malformed or out of bounds; nothing was applied."""


class NotFound(BackendError):
    """The key does not exist."""

    def __init__(self, message: str = "not found") -> None:
        super().__init__(message)


class Unavailable(BackendError):
    """This site cannot serve now (fenced, resyncing, suspended without lease, stopping).

    `other_site_address` is the other site's gRPC address ("host:port") when
    known, else "": the servicer names it in the status message and in the
    trailing metadata key `replicator-other-site`.
    """

    def __init__(self, message: str, other_site_address: str = "") -> None:
        super().__init__(message)
        self.other_site_address = other_site_address


class OutcomeUnknown(BackendError):
    """The write may or may not have committed (timeout while waiting for the peer or the witness)."""

    def __init__(self, message: str = "outcome unknown: retry with the same request id") -> None:
        super().__init__(message)


class Corrupt(BackendError):
    """A stored value failed its checksum and could not be repaired from the peer."""


class Refused(BackendError):
    """An operator's action refused in the site's current state (not an outage: retrying will not help)."""


class AlreadyExists(BackendError):
    """The name is taken (CreateVolume of an existing volume by another request)."""


class Changed(BackendError):
    """A large object was replaced while it was being read, or is not the one a resumed read named."""


class Overloaded(BackendError):
    """Admission control (api/admission.py): the site has too much work in flight; nothing was applied.

    `retry_after_ms` is the hint the servicer sends in the trailing metadata key `replicator-retry-after-ms`
    (S3: the `Retry-After` header, in seconds rounded up)."""

    def __init__(self, message: str, retry_after_ms: int = 100) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
