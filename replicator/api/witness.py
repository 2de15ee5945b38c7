"""WitnessService servicer over an abstract WitnessBackend.

The arbitration logic (one grant per epoch, durable before answering, the
preferred site's grace) lives in the core; the witness daemon implements
WitnessBackend over it and serves this thin translation layer.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import grpc

from replicator.api import errors
from replicator.v1 import witness_pb2, witness_pb2_grpc

_NAME_BYTES_MAX = 63


class PairMode(enum.Enum):
    SYNC = witness_pb2.PAIR_MODE_SYNC
    SOLO = witness_pb2.PAIR_MODE_SOLO


@dataclass(frozen=True, slots=True)
class ArbitrationOutcome:
    """GRANTED: `epoch` is the epoch the site now holds. DENIED: the witness's current state."""

    granted: bool
    epoch: int
    mode: PairMode
    holder: str


@dataclass(frozen=True, slots=True)
class PairState:
    pair: str
    epoch: int
    mode: PairMode
    holder: str
    preferred: str = ""  # the preferred site as the witness holds it (a switchover changes it); "" none


@runtime_checkable
class WitnessBackend(Protocol):
    async def arbitrate(self, pair: str, site: str, epoch: int, force: bool = False) -> ArbitrationOutcome:
        """Grant `site` SOLO in epoch+1 or deny; persist a grant before returning it. May wait (grace).
        `force`: an operator's forced failover, granted whatever the state."""
        ...

    async def mark_synced(self, pair: str, site: str, epoch: int) -> ArbitrationOutcome:
        """Move the pair from SOLO(epoch) held by `site` to SYNC(epoch+1), or deny."""
        ...

    async def set_preferred(self, pair: str, site: str, preferred: str) -> ArbitrationOutcome:
        """Planned switchover: `preferred` wins ties from now on (granted=False if it is not a site of the pair)."""
        ...

    async def report(self, pair: str, site: str, epoch: int, holds_grant: bool, in_sync: bool) -> None:
        """A site says where it is (see replicator.core.messages.Report)."""
        ...

    def status(self, pair: str | None) -> Sequence[PairState]:
        """State of one pair (empty if unknown) or of every pair (pair None)."""
        ...


def outcome_message(outcome: ArbitrationOutcome) -> witness_pb2.ArbitrationResponse:
    return witness_pb2.ArbitrationResponse(
        verdict=witness_pb2.VERDICT_GRANTED if outcome.granted else witness_pb2.VERDICT_DENIED,
        epoch=outcome.epoch,
        mode=outcome.mode.value,
        holder=outcome.holder,
    )


def outcome_from_message(message: witness_pb2.ArbitrationResponse) -> ArbitrationOutcome:
    assert message.verdict in (witness_pb2.VERDICT_GRANTED, witness_pb2.VERDICT_DENIED), message
    return ArbitrationOutcome(
        granted=message.verdict == witness_pb2.VERDICT_GRANTED,
        epoch=message.epoch,
        mode=PairMode(message.mode),
        holder=message.holder,
    )


def _check(pair: str, site: str) -> None:
    for what, value in (("pair", pair), ("site", site)):
        if not value:
            raise errors.InvalidRequest(f"{what} is empty")
        if len(value.encode()) > _NAME_BYTES_MAX:
            raise errors.InvalidRequest(f"{what} is longer than {_NAME_BYTES_MAX} bytes")


class WitnessServicer(witness_pb2_grpc.WitnessServiceServicer):
    def __init__(self, backend: WitnessBackend) -> None:
        self.backend = backend

    async def _guard(self, context: grpc.aio.ServicerContext, error: errors.BackendError) -> None:
        code = {
            errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
            errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
            errors.OutcomeUnknown: grpc.StatusCode.DEADLINE_EXCEEDED,
            errors.NotFound: grpc.StatusCode.NOT_FOUND,
        }.get(type(error), grpc.StatusCode.INTERNAL)
        await context.abort(code, error.message)

    async def SetPreferred(
        self, request: witness_pb2.SetPreferredRequest, context: grpc.aio.ServicerContext
    ) -> witness_pb2.ArbitrationResponse:
        try:
            _check(request.pair, request.site)
            _check(request.pair, request.preferred)
            return outcome_message(await self.backend.set_preferred(request.pair, request.site, request.preferred))
        except errors.BackendError as error:
            await self._guard(context, error)
            raise AssertionError("unreachable: abort raises") from error

    async def Arbitrate(
        self, request: witness_pb2.ArbitrateRequest, context: grpc.aio.ServicerContext
    ) -> witness_pb2.ArbitrationResponse:
        try:
            _check(request.pair, request.site)
            outcome = await self.backend.arbitrate(request.pair, request.site, request.epoch, request.force)
            return outcome_message(outcome)
        except errors.BackendError as error:
            await self._guard(context, error)
            raise AssertionError("unreachable: abort raises") from error

    async def MarkSynced(
        self, request: witness_pb2.MarkSyncedRequest, context: grpc.aio.ServicerContext
    ) -> witness_pb2.ArbitrationResponse:
        try:
            _check(request.pair, request.site)
            return outcome_message(await self.backend.mark_synced(request.pair, request.site, request.epoch))
        except errors.BackendError as error:
            await self._guard(context, error)
            raise AssertionError("unreachable: abort raises") from error

    async def Status(
        self, request: witness_pb2.WitnessStatusRequest, context: grpc.aio.ServicerContext
    ) -> witness_pb2.WitnessStatusResponse:
        if request.site:
            try:
                _check(request.pair, request.site)
                await self.backend.report(request.pair, request.site, request.epoch, request.holds_grant, request.in_sync)
            except errors.BackendError as error:
                await self._guard(context, error)
        states = self.backend.status(request.pair or None)
        return witness_pb2.WitnessStatusResponse(
            pairs=[
                witness_pb2.PairState(
                    pair=s.pair, epoch=s.epoch, mode=s.mode.value, holder=s.holder, preferred=s.preferred
                )
                for s in states
            ],
            witness_id=str(getattr(self.backend, "witness_id", "")),
        )
