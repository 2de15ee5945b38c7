"""What the blocking and the asyncio clients share: retry policy, request ids, messages.

Retry rule: a call that fails with UNAVAILABLE (or a broken connection, which
gRPC reports the same way), DEADLINE_EXCEEDED or DATA_LOSS is tried again, on
the other site when there is one, up to `attempts_max` attempts. The first
switch to the other site is immediate; once every site has been tried, each
further attempt waits a backoff that doubles from `backoff_initial_ms` up to
`backoff_ms_max`, with jitter. Writes are retried with the SAME request id,
so whichever site a retry reaches, the write is applied at most once.

Exception: after DEADLINE_EXCEEDED (the outcome is unknown, the site is
alive) the next attempt goes to the SAME site, which finds the original
record and waits for it; only a second deadline there moves on. A retry at
the other site could overtake the original on its way there (docs/design.md,
"Retries").
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from replicator.api.backend import SiteStatus, VerifyReport
from replicator.client.errors import ClientError, error_for
from replicator.config import TlsFiles, parse_address
from replicator.v1 import admin_pb2

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS})
SAME_SITE_DEADLINES_MAX = 2  # deadlines in a row at one site before moving to the other
OTHER_SITE_METADATA_KEY = "replicator-other-site"
MESSAGE_BYTES_MAX = 64 * 1024 * 1024


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


# The default retry budget outlasts a failover with the default settings (docs/operations.md,
# "Failover time"): 16 attempts over two sites wait 20, 40, ... 640 ms and then 1 s eight times, with
# a jitter of 0.5-1.0, so at least 4.6 s (at most 9.3 s) of retrying against a failover of about 3 s
# (4 s when the non-preferred site survives and waits out the preferred site's grace).
@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts_max: int = 16
    backoff_initial_ms: int = 20
    backoff_ms_max: int = 1000
    call_timeout_ms: int = 5000

    def __post_init__(self) -> None:
        for name in ("attempts_max", "backoff_initial_ms", "backoff_ms_max", "call_timeout_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"RetryPolicy.{name}: must be a positive integer, got {value!r}")


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


class Rotation:
    """Which site to call next, and how long to wait before the next attempt."""

    def __init__(self, endpoints: list[str], policy: RetryPolicy) -> None:
        self.endpoints = endpoints
        self.policy = policy
        self.current = 0  # sticky: the site that answered last

    def delay_s(self, attempt: int, switch: bool = True) -> float:
        """Wait before attempt number `attempt` (0-based); moves to the other site unless `switch` is False."""
        if attempt == 0:
            return 0.0
        if switch:
            self.current = (self.current + 1) % len(self.endpoints)
        else:
            return float(self.policy.backoff_initial_ms * random.uniform(0.5, 1.0) / 1000)
        rounds = attempt - len(self.endpoints) + 1
        if rounds <= 0:
            return 0.0
        backoff_ms = min(self.policy.backoff_ms_max, self.policy.backoff_initial_ms * 2 ** (rounds - 1))
        return float(backoff_ms * random.uniform(0.5, 1.0) / 1000)


def failure(error: grpc.RpcError, endpoint: str, tried: list[str]) -> ClientError:
    code = error.code()
    details = error.details() or code.name
    if code in RETRYABLE and len(tried) > 1:
        details = f"{details} (tried {', '.join(dict.fromkeys(tried))}, {len(tried)} attempts)"
    elif code == grpc.StatusCode.UNAVAILABLE:
        details = f"{endpoint}: {details}"
    return error_for(code, details, endpoint)


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
