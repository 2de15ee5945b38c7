"""Client library of Replicator: objects, blocks and admin over gRPC, with automatic failover.

    from replicator.client import Client, NotFound
    with Client(["127.0.0.1:7400", "127.0.0.1:7401"]) as client:
        client.put("photos", "cat.jpg", data)
        data = client.get("photos", "cat.jpg")

`Client([one])` talks to that site only. `AsyncClient` has the same methods
as coroutines. See docs/api.md.
"""

from replicator.client._common import LargeInfo, ObjectInfo, RetryPolicy, VerifyResult, VolumeInfo
from replicator.client.aio import AsyncClient
from replicator.client.errors import (
    AlreadyExists,
    ClientError,
    DataLoss,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    Overloaded,
    Refused,
    Unavailable,
)
from replicator.client.sync import Client
from replicator.client.witness import AsyncWitnessClient, witness_status

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncWitnessClient",
    "Client",
    "ClientError",
    "DataLoss",
    "InvalidArgument",
    "LargeInfo",
    "NotFound",
    "ObjectInfo",
    "OutcomeUnknown",
    "Overloaded",
    "Refused",
    "RetryPolicy",
    "Unavailable",
    "VerifyResult",
    "VolumeInfo",
    "witness_status",
]
