"""An asyncio client of the witness, for the site daemon (Arbitrate, MarkSynced) and the CLI (Status)."""

from __future__ import annotations

import grpc

from replicator.api.witness import ArbitrationOutcome, PairMode, PairState, outcome_from_message
from replicator.client._common import WITNESS_CHANNEL_OPTIONS, channel_credentials, failure
from replicator.config import TlsFiles
from replicator.v1 import witness_pb2, witness_pb2_grpc


class AsyncWitnessClient:
    """One witness, no retries: the caller (the pair protocol) decides when to ask again."""

    def __init__(self, address: str, *, tls: TlsFiles | None = None, timeout_ms: int = 1000) -> None:
        self.address = address
        self.timeout_s = timeout_ms / 1000
        if tls is not None:
            self._channel = grpc.aio.secure_channel(address, channel_credentials(tls), options=WITNESS_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=WITNESS_CHANNEL_OPTIONS)
        self._stub = witness_pb2_grpc.WitnessServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def set_preferred(self, pair: str, site: str, preferred: str) -> ArbitrationOutcome:
        try:
            response = await self._stub.SetPreferred(
                witness_pb2.SetPreferredRequest(pair=pair, site=site, preferred=preferred), timeout=self.timeout_s
            )
        except grpc.RpcError as error:
            raise failure(error, self.address, [self.address]) from None
        return outcome_from_message(response)

    async def arbitrate(self, pair: str, site: str, epoch: int, force: bool = False) -> ArbitrationOutcome:
        """Raises replicator.client.errors.ClientError (Unavailable, OutcomeUnknown, ...) on failure."""
        try:
            response = await self._stub.Arbitrate(
                witness_pb2.ArbitrateRequest(pair=pair, site=site, epoch=epoch, force=force), timeout=self.timeout_s
            )
        except grpc.RpcError as error:
            raise failure(error, self.address, [self.address]) from None
        return outcome_from_message(response)

    async def mark_synced(self, pair: str, site: str, epoch: int) -> ArbitrationOutcome:
        try:
            response = await self._stub.MarkSynced(
                witness_pb2.MarkSyncedRequest(pair=pair, site=site, epoch=epoch), timeout=self.timeout_s
            )
        except grpc.RpcError as error:
            raise failure(error, self.address, [self.address]) from None
        return outcome_from_message(response)

    async def report(
        self, pair: str, site: str, epoch: int, *, holds_grant: bool, in_sync: bool
    ) -> tuple[list[PairState], str]:
        """A site's periodic report (where it is); answers the pair's state as the witness holds it
        and the witness's identity."""
        request = witness_pb2.WitnessStatusRequest(
            pair=pair, site=site, epoch=epoch, holds_grant=holds_grant, in_sync=in_sync
        )
        try:
            response = await self._stub.Status(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise failure(error, self.address, [self.address]) from None
        return [PairState(p.pair, p.epoch, PairMode(p.mode), p.holder, p.preferred) for p in response.pairs], response.witness_id

    async def status(self, pair: str = "") -> list[PairState]:
        try:
            response = await self._stub.Status(witness_pb2.WitnessStatusRequest(pair=pair), timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise failure(error, self.address, [self.address]) from None
        return [PairState(p.pair, p.epoch, PairMode(p.mode), p.holder, p.preferred) for p in response.pairs]


def witness_status(
    address: str, *, tls: TlsFiles | None = None, timeout_ms: int = 5000, pair: str = ""
) -> list[PairState]:
    """Blocking Status call, for the CLI."""
    credentials = channel_credentials(tls) if tls is not None else None
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    try:
        response = witness_pb2_grpc.WitnessServiceStub(channel).Status(
            witness_pb2.WitnessStatusRequest(pair=pair), timeout=timeout_ms / 1000
        )
    except grpc.RpcError as error:
        raise failure(error, address, [address]) from None
    finally:
        channel.close()
    return [PairState(p.pair, p.epoch, PairMode(p.mode), p.holder, p.preferred) for p in response.pairs]
