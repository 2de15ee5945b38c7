"""AdminService servicer: status and operator actions over a SiteBackend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from replicator.api._handling import translate_errors, translate_stream_errors
from replicator.api.backend import RangeEntry, SiteBackend, SiteStatus, VerifyReport
from replicator.api.errors import InvalidRequest, Refused
from replicator.config import ApiConfig
from replicator.daemon.logs import log
from replicator.v1 import admin_pb2, admin_pb2_grpc

FAILOVER_REFUSAL = (
    "forced failover refused without force=true: it makes this site go on alone although the witness "
    "did not choose it (the witness, which must be reachable, grants the next epoch whatever its state); "
    "if the other site is in fact alive and serving, the two copies diverge (split brain) and what the "
    "other site acknowledged since the split is lost when it returns. Use it only when you know the "
    "other site is down and the witness will not let this site go on by itself."
)


# Bounds of the internal verify RPCs (one request, one answer).
DIGEST_RANGES_MAX = 4096
ENTRIES_LIMIT_MAX = 10_000
ENTRIES_LIMIT_DEFAULT = 1000


def key_range(message: admin_pb2.KeyRange) -> tuple[bytes, bytes | None]:
    return message.start, None if message.to_end else message.end


def key_range_message(start: bytes, end: bytes | None) -> admin_pb2.KeyRange:
    return admin_pb2.KeyRange(start=start, end=end or b"", to_end=end is None)


def entry_message(entry: RangeEntry) -> admin_pb2.RangeEntry:
    return admin_pb2.RangeEntry(
        key=entry.key, ts=entry.ts, tombstone=entry.tombstone, crc=entry.crc, corrupt=entry.corrupt
    )


def entry_from_message(message: admin_pb2.RangeEntry) -> RangeEntry:
    return RangeEntry(message.key, message.ts, message.tombstone, message.crc, message.corrupt)


def status_message(status: SiteStatus) -> admin_pb2.SiteStatus:
    done, total = status.resync_progress
    return admin_pb2.SiteStatus(
        site=status.site,
        peer=status.peer,
        pair=status.pair,
        state=status.state,
        epoch=status.epoch,
        role=status.role,
        peer_reachable=status.peer_reachable,
        witness_reachable=status.witness_reachable,
        lag_records=status.lag_records,
        lag_bytes=status.lag_bytes,
        dirty_keys=status.dirty_keys,
        resync_done=done,
        resync_total=total,
        preferred_site=status.preferred,
        peer_address=status.peer_address,
        details=status.details,
        state_reason=status.state_reason,
        state_since_ms=status.state_since_ms,
        started_ms=status.started_ms,
        version=status.version,
        resync_kind=status.resync_kind,
        resync_rate_keys_per_s=status.resync_rate_keys_per_s,
        resync_eta_s=status.resync_eta_s,
        witness_preferred=status.witness_preferred,
        draining=status.draining,
    )


def client_identity(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Who called: the peer address and, over mutual TLS, the client certificate's names (for the audit log)."""
    identity = {"client": str(context.peer() or "")}
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - an insecure channel has no auth context to speak of
        auth = {}
    for field, name in (("x509_common_name", "client_cn"), ("x509_subject_alternative_name", "client_san")):
        values = [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in auth.get(field, ())]
        if values:
            identity[name] = ",".join(values)
    return identity


def audit(action: str, context: grpc.aio.ServicerContext, **fields: object) -> None:
    """One `admin` log event (and event-stream entry) per operator action, with the caller's identity."""
    log("admin", action=action, **client_identity(context), **fields)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, backend: SiteBackend, config: ApiConfig) -> None:
        self.backend = backend
        self.config = config

    @translate_errors
    async def Status(
        self, request: admin_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.StatusResponse:
        return admin_pb2.StatusResponse(status=status_message(self.backend.status()))

    @translate_stream_errors
    async def Verify(
        self, request: admin_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.VerifyEvent]:
        keys_max = min(request.keys_max or self.config.verify_keys_max, self.config.verify_keys_max)
        # Only the latest progress matters: a slow reader sees fewer, fresher updates.
        latest: list[tuple[int, int]] = []
        changed = asyncio.Event()

        def progress(done: int, total: int) -> None:
            latest[:] = [(done, total)]
            changed.set()

        audit("verify", context, repair=request.repair)
        verification = asyncio.create_task(self.backend.verify(request.repair, progress))
        try:
            while not verification.done():
                waiter = asyncio.create_task(changed.wait())
                await asyncio.wait({verification, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if latest:
                    ((done, total),) = latest
                    latest.clear()
                    changed.clear()
                    yield admin_pb2.VerifyEvent(progress=admin_pb2.VerifyProgress(done=done, total=total))
            report: VerifyReport = verification.result()
            if latest:  # the last progress, posted just before verify returned
                ((done, total),) = latest
                yield admin_pb2.VerifyEvent(progress=admin_pb2.VerifyProgress(done=done, total=total))
        finally:
            # The client went away: stop comparing (verify only reads, repairs are single writes).
            verification.cancel()
        listed = report.differing_keys[:keys_max]
        yield admin_pb2.VerifyEvent(
            report=admin_pb2.VerifyReport(
                keys_compared=report.keys_compared,
                differing_count=len(report.differing_keys),
                differing_keys=listed,
                truncated=len(listed) < len(report.differing_keys),
                repaired=report.repaired,
            )
        )

    @translate_errors
    async def Resync(
        self, request: admin_pb2.ResyncRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ResyncResponse:
        audit("resync", context, full=request.full)
        await self.backend.resync(request.full)
        return admin_pb2.ResyncResponse()

    @translate_errors
    async def Switchover(
        self, request: admin_pb2.SwitchoverRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SwitchoverResponse:
        audit("switchover", context)
        await self.backend.switchover()
        return admin_pb2.SwitchoverResponse()

    @translate_errors
    async def Failover(
        self, request: admin_pb2.FailoverRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.FailoverResponse:
        audit("failover", context, force=request.force)
        if not request.force:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, FAILOVER_REFUSAL)
        await self.backend.failover(force=True)
        return admin_pb2.FailoverResponse()

    # Internal: the peer's online verify reads this site's state through these two.
    @translate_errors
    async def RangeDigest(
        self, request: admin_pb2.RangeDigestRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RangeDigestResponse:
        if not 1 <= len(request.ranges) <= DIGEST_RANGES_MAX:
            raise InvalidRequest(f"RangeDigest: give 1..{DIGEST_RANGES_MAX} ranges, got {len(request.ranges)}")
        digests = await self.backend.range_digests([key_range(r) for r in request.ranges])
        return admin_pb2.RangeDigestResponse(
            digests=[admin_pb2.RangeDigestResult(count=count, digest=digest) for count, digest in digests]
        )

    @translate_errors
    async def RangeEntries(
        self, request: admin_pb2.RangeEntriesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RangeEntriesResponse:
        if request.keys:
            if len(request.keys) > ENTRIES_LIMIT_MAX:
                raise InvalidRequest(f"RangeEntries: at most {ENTRIES_LIMIT_MAX} keys, got {len(request.keys)}")
            entries = await self.backend.key_entries(list(request.keys))
        else:
            limit = request.limit or ENTRIES_LIMIT_DEFAULT
            if limit > ENTRIES_LIMIT_MAX:
                raise InvalidRequest(f"RangeEntries: limit at most {ENTRIES_LIMIT_MAX}, got {limit}")
            start, end = key_range(request.range)
            entries = await self.backend.range_entries(start, end, limit)
        return admin_pb2.RangeEntriesResponse(entries=[entry_message(e) for e in entries])

    @translate_stream_errors
    async def Events(
        self, request: admin_pb2.EventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.EventLine]:
        follow_events = getattr(self.backend, "follow_events", None)
        if follow_events is None:
            raise Refused("this site keeps no event stream")
        async for line in follow_events(request.history, not request.no_follow):
            yield admin_pb2.EventLine(json=line)

    @translate_errors
    async def Drain(self, request: admin_pb2.DrainRequest, context: grpc.aio.ServicerContext) -> admin_pb2.DrainResponse:
        drain = getattr(self.backend, "drain", None)
        if drain is None:
            raise Refused("this site cannot be drained")
        audit("drain", context, undo=request.undo)
        return admin_pb2.DrainResponse(in_flight=await drain(request.undo))


__all__ = ["AdminServicer", "FAILOVER_REFUSAL", "InvalidRequest", "status_message"]
