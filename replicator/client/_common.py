"""What the blocking and the asyncio clients share: the retry shell, request ids, messages.

The retry rule itself is `retry.RetryPlan` (no I/O); `RetryingShell` here
classifies gRPC errors into the plan's outcomes and turns its give-up into the
ClientError the caller sees, with `maybe_applied` set from the plan. The two
clients only sleep and call.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from replicator.api.backend import SiteStatus, VerifyReport
from replicator.client.errors import ClientError, error_for
from replicator.client.retry import RETRIED, Outcome, RetryPlan, RetryPolicy, Step
from replicator.config import TlsFiles, parse_address
from replicator.v1 import admin_pb2, objects_pb2

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# Answers that say a site applied nothing and retrying cannot change that.
DEFINITE_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
OTHER_SITE_METADATA_KEY = "replicator-other-site"
RETRY_AFTER_METADATA_KEY = "replicator-retry-after-ms"  # with RESOURCE_EXHAUSTED: the site is busy
MESSAGE_BYTES_MAX = 64 * 1024 * 1024
STREAM_ITEMS_PER_TIMEOUT = 64  # put_many: each this many items of a stream add one call timeout


def reconnect_options(backoff_ms_max: int) -> list[tuple[str, int]]:
    """Channel options that bound gRPC's reconnect back-off.

    gRPC's defaults start at 1 s and grow by 1.6 up to 120 s, so a channel to a
    peer that was down for a minute stays in back-off for tens of seconds after
    the peer is back (the operator trial of 2026-12 measured 40.8 s after a
    75 s witness outage). Capped here at about the heartbeat, a site reaches a
    returning witness or site within `backoff_ms_max` plus one connect.
    """
    initial_ms = min(100, backoff_ms_max)
    return [
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.min_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", backoff_ms_max),
    ]


# The witness is asked when a site must decide, and must be reachable again soon after it returns.
WITNESS_RECONNECT_BACKOFF_MS_MAX = 500
# Clients and the sites' own channels to each other (verify).
SITE_RECONNECT_BACKOFF_MS_MAX = 1000

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    *reconnect_options(SITE_RECONNECT_BACKOFF_MS_MAX),
]
WITNESS_CHANNEL_OPTIONS = reconnect_options(WITNESS_RECONNECT_BACKOFF_MS_MAX)


class RequestIds:
    """Request ids: 16 random bytes fixed per client, then a 64-bit counter (unique, never reused)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(16)
        self._counter = itertools.count(1)

    def next(self) -> bytes:
        return self._prefix + next(self._counter).to_bytes(8, "big")


def check_endpoints(endpoints: Sequence[str]) -> list[str]:
    if isinstance(endpoints, str):
        raise TypeError("endpoints must be a list of 'host:port' strings, not one string")
    endpoints = list(endpoints)
    if not 1 <= len(endpoints) <= 2:
        raise ValueError(f"give one or two site endpoints, got {len(endpoints)}")
    for endpoint in endpoints:
        parse_address(endpoint)
    return endpoints


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def classify(error: grpc.RpcError) -> Outcome:
    """The retry plan's view of a failed attempt."""
    return outcome_of(error.code(), other_site_named(error))


def outcome_of(code: grpc.StatusCode, other_site: bool) -> Outcome:
    """A status as the retry plan sees it; `other_site`: the answer named the other site."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return Outcome.REFUSED if other_site else Outcome.UNREACHABLE
    if code == grpc.StatusCode.CANCELLED:
        # The server cancelled the call: a site stopping (a drained restart) cancels what is still in
        # flight. The site went away mid-call, as when its connection breaks: retried with the same
        # request id, and a write's outcome is unknown until a retry learns it.
        return Outcome.UNREACHABLE
    return _OUTCOMES.get(code, Outcome.FAILED)


def status_code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


_OUTCOMES = {
    grpc.StatusCode.DEADLINE_EXCEEDED: Outcome.TIMEOUT,
    grpc.StatusCode.DATA_LOSS: Outcome.CORRUPT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Outcome.BUSY,
    **{code: Outcome.REJECTED for code in DEFINITE_CODES},
}


def _trailer(error: grpc.RpcError, name: str) -> str | None:
    try:
        trailers = error.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a connection-level error may have no trailers to give
        return None
    return next((str(value) for key, value in trailers if key == name), None)


def other_site_named(error: grpc.RpcError) -> bool:
    """The server refused and named the other site (trailer `replicator-other-site`): it applied nothing."""
    return _trailer(error, OTHER_SITE_METADATA_KEY) is not None


def retry_after_ms(error: grpc.RpcError) -> int | None:
    """A busy site's hint (trailer `replicator-retry-after-ms`), if it sent a valid one."""
    value = _trailer(error, RETRY_AFTER_METADATA_KEY)
    return int(value) if value is not None and value.isdigit() else None


def failure(
    error: grpc.RpcError, endpoint: str, tried: list[str], maybe_applied: bool = False, timed_out: bool = False
) -> ClientError:
    """The ClientError for the error that ended a call after the attempts at `tried`.

    `maybe_applied` (a write some attempt of which may have reached a site) is set on the error.
    A write an earlier attempt of which timed out may be applied even if the last attempt was
    refused: the caller gets OutcomeUnknown then, never an error that says nothing was applied.
    """
    code = error.code()
    details = error.details() or code.name
    if code in RETRYABLE and len(tried) > 1:
        details = f"{details} (tried {', '.join(dict.fromkeys(tried))}, {len(tried)} attempts)"
    elif code == grpc.StatusCode.UNAVAILABLE:
        details = f"{endpoint}: {details}"
    if timed_out and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS):
        details += "; an earlier attempt's outcome is unknown: the write may be applied, retry it to learn"
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    result = error_for(code, details, endpoint)
    result.maybe_applied = maybe_applied
    return result


# Builds the error that ends a call: (endpoints tried, maybe applied, a write timed out) -> error.
GiveUp = Callable[[list[str], bool, bool], ClientError]


class PutMany:
    """put_many's bookkeeping, the same for both clients: items still to send, answers, failures.

    Items are independent: each is acknowledged, failed for good (a status retrying cannot
    change) or left pending for the next round (a retryable status). A round that leaves some
    pending counts as one failed attempt of the call, with the worst outcome among them.
    """

    def __init__(self, requests: list[objects_pb2.PutRequest], call_timeout_s: float) -> None:
        self.requests = requests
        self.call_timeout_s = call_timeout_s
        self.ts: list[int | None] = [None] * len(requests)
        self.pending = {request.request_id: index for index, request in enumerate(requests)}
        self.failed: list[ClientError] = []
        self.round: list[Outcome] = []  # outcomes of this round's items left pending
        self.last: ClientError | None = None

    def batch(self) -> list[objects_pb2.PutRequest]:
        """This round's requests (the pending ones, in input order)."""
        self.round = []
        return [self.requests[index] for index in sorted(self.pending.values())]

    def timeout_s(self) -> float:
        return self.call_timeout_s * math.ceil(1 + len(self.pending) / STREAM_ITEMS_PER_TIMEOUT)

    def answered(self, response: objects_pb2.PutResponse, endpoint: str) -> None:
        position = self.pending.get(response.request_id)
        if position is None:
            return
        if response.HasField("ack"):
            self.ts[position] = response.ack.ts
            del self.pending[response.request_id]
            return
        code = status_code(response.error.code)
        outcome = outcome_of(code, bool(response.error.other_site))
        self.last = error_for(code, response.error.message, endpoint)
        if outcome in RETRIED:
            self.round.append(outcome)
            return
        del self.pending[response.request_id]
        self.failed.append(error_for(code, f"{self.requests[position].key}: {response.error.message}", endpoint))

    def outcome(self) -> Outcome:
        """The round's outcome as one attempt: OK when nothing is pending."""
        if not self.pending:
            return Outcome.OK
        for worst in (Outcome.TIMEOUT, Outcome.UNREACHABLE, Outcome.CORRUPT, Outcome.BUSY):
            if worst in self.round:
                return worst
        return Outcome.REFUSED

    def results(self) -> list[int]:
        if self.failed:
            raise self.failed[0]
        return [ts for ts in self.ts if ts is not None]

    def give_up(self, tried: list[str], maybe_applied: bool, timed_out: bool) -> ClientError:
        error = self.failed[0] if self.failed else self.last
        assert error is not None
        error.maybe_applied = maybe_applied
        return error

    def give_up_after(self, stream_error: grpc.RpcError) -> GiveUp:
        def give_up(tried: list[str], maybe_applied: bool, timed_out: bool) -> ClientError:
            if self.failed:
                return self.give_up(tried, maybe_applied, timed_out)
            return failure(stream_error, tried[-1], tried, maybe_applied, timed_out)

        return give_up


class RetryingShell:
    """The part of a client's retry loop that does not sleep or call: which stubs, what error."""

    endpoints: list[str]
    retry: RetryPolicy
    _stubs: list[dict[str, Any]]
    _current: int  # sticky: the site that answered (or was tried) last

    def _plan(self, write: bool, pinned: bool = False) -> RetryPlan:
        if pinned:  # an operator action names the site it acts on: the first endpoint, once
            return RetryPlan(replace(self.retry, attempts_max=1), 1, 0, write=write)
        return RetryPlan(self.retry, len(self.endpoints), self._current, write=write)

    def _failed(self, plan: RetryPlan, error: grpc.RpcError) -> float:
        """Record a failed attempt: the delay before the next one, or raise the call's ClientError."""

        def give_up(tried: list[str], maybe_applied: bool, timed_out: bool) -> ClientError:
            return failure(error, tried[-1], tried, maybe_applied, timed_out)

        return self._next(plan, classify(error), give_up, retry_after_ms(error))

    def _next(self, plan: RetryPlan, outcome: Outcome, give_up: GiveUp, retry_after: int | None = None) -> float:
        decision = plan.record(outcome, retry_after)
        if decision.step is Step.GIVE_UP:
            raise give_up([self.endpoints[index] for index in plan.tried], not decision.outcome_known, plan.timed_out)
        if plan.endpoints > 1:  # a pinned call (one endpoint) leaves the sticky choice alone
            self._current = decision.endpoint
        return decision.delay_s

    def _succeeded(self, plan: RetryPlan, result: Any) -> Any:
        plan.record(Outcome.OK)
        if plan.endpoints > 1:
            self._current = plan.endpoint
        return result


def status_from_message(message: admin_pb2.SiteStatus) -> SiteStatus:
    return SiteStatus(
        site=message.site,
        peer=message.peer,
        pair=message.pair,
        state=message.state,
        epoch=message.epoch,
        role=message.role,
        peer_reachable=message.peer_reachable,
        witness_reachable=message.witness_reachable,
        lag_records=message.lag_records,
        lag_bytes=message.lag_bytes,
        dirty_keys=message.dirty_keys,
        resync_progress=(message.resync_done, message.resync_total),
        preferred=message.preferred_site,
        peer_address=message.peer_address,
        details=dict(message.details),
        state_reason=message.state_reason,
        state_since_ms=message.state_since_ms,
        started_ms=message.started_ms,
        version=message.version,
        resync_kind=message.resync_kind,
        resync_rate_keys_per_s=message.resync_rate_keys_per_s,
        resync_eta_s=message.resync_eta_s,
        witness_preferred=message.witness_preferred,
        draining=message.draining,
    )


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Verify's outcome as the client sees it (the server lists at most keys_max keys)."""

    keys_compared: int
    differing_count: int
    differing_keys: tuple[bytes, ...]
    truncated: bool
    repaired: int


def verify_result(report: admin_pb2.VerifyReport) -> VerifyResult:
    return VerifyResult(
        keys_compared=report.keys_compared,
        differing_count=report.differing_count,
        differing_keys=tuple(report.differing_keys),
        truncated=report.truncated,
        repaired=report.repaired,
    )


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size_bytes: int
    ts: int


@dataclass(frozen=True, slots=True)
class LargeInfo:
    """An object of the large-object calls (the S3 namespace): etag as S3 shows it, without quotes."""

    key: str
    size_bytes: int
    etag: str
    mtime_ms: int
    content_type: str = ""


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    name: str
    size_bytes: int
    block_size: int
    block_count: int


__all__ = ["LargeInfo", "ObjectInfo", "RetryPolicy", "VerifyReport", "VerifyResult", "VolumeInfo"]
