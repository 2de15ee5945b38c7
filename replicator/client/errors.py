"""Errors raised by the client library, one per gRPC status the APIs use."""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """A call failed; `code` is the gRPC status, `endpoint` the site that answered last.

    `maybe_applied` is True when the call was a write and some attempt of it may have reached a
    site without an answer that says it applied nothing (a timeout, a broken connection): the
    write may take effect, or may have, though this error ends the call. False: nothing was applied.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None, endpoint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.endpoint = endpoint
        self.maybe_applied = False


class NotFound(ClientError):
    """The object (or volume) does not exist."""


class InvalidArgument(ClientError):
    """The request was refused as malformed or out of bounds; nothing was applied."""


class AlreadyExists(ClientError):
    """The name is taken."""


class Refused(ClientError):
    """An admin action was refused in the current state (FAILED_PRECONDITION)."""


class Unavailable(ClientError):
    """No site could serve, after every retry: each refused or could not be reached.

    A refusal applied nothing; a site that could not be reached may still have received a write
    (a connection that broke): `maybe_applied` says which. After a timeout the call ends with
    OutcomeUnknown instead, whatever the last attempt said.
    """


class OutcomeUnknown(ClientError):
    """The last attempt timed out: the write may or may not be applied. Retrying the same call is safe."""


class Overloaded(ClientError):
    """The site was busy at every attempt (admission control, RESOURCE_EXHAUSTED); nothing was applied."""


class DataLoss(ClientError):
    """A stored value failed its checksum at every site tried."""


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: Refused,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: OutcomeUnknown,
    # A site that stops cancels the calls still running there: their outcome is unknown.
    grpc.StatusCode.CANCELLED: OutcomeUnknown,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
}


def error_for(code: grpc.StatusCode, message: str, endpoint: str) -> ClientError:
    return _BY_CODE.get(code, ClientError)(message, code, endpoint)
