"""AdminService servicer: status and operator actions over a SiteBackend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from replicator.api._handling import translate_errors, translate_stream_errors
from replicator.api.backend import SiteBackend, SiteStatus, VerifyReport
from replicator.api.errors import InvalidRequest
from replicator.config import ApiConfig
from replicator.v1 import admin_pb2, admin_pb2_grpc

FAILOVER_REFUSAL = (
    "forced failover refused without force=true: it makes this site go on alone WITHOUT the witness's "
    "grant; if the other site is in fact alive and serving, the two copies diverge (split brain) and "
    "writes acknowledged by the other site since the split are lost. Use it only when the witness "
    "cannot decide and you know the other site is down."
)


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
    )


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
        await self.backend.resync(request.full)
        return admin_pb2.ResyncResponse()

    @translate_errors
    async def Switchover(
        self, request: admin_pb2.SwitchoverRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SwitchoverResponse:
        await self.backend.switchover()
        return admin_pb2.SwitchoverResponse()

    @translate_errors
    async def Failover(
        self, request: admin_pb2.FailoverRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.FailoverResponse:
        if not request.force:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, FAILOVER_REFUSAL)
        await self.backend.failover(force=True)
        return admin_pb2.FailoverResponse()


__all__ = ["AdminServicer", "FAILOVER_REFUSAL", "InvalidRequest", "status_message"]
