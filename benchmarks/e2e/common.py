"""The contract between the end-to-end benchmark's parts (systems, drivers, load generator, report).

A *system* is something the suite starts and stops on loopback (a Replicator pair, an etcd
cluster, a Redis primary with a replica). The load generator runs in separate worker
processes; each worker turns the system's picklable `DriverSpec` into a `Driver` with
`open_driver(spec, worker)` and drives it with many concurrent coroutines.

    system.start()                       # raises SystemUnavailable with a clear message
    spec = system.driver_spec("both")    # placement: "both" (active-active) or "one"
    ... workers: driver = await open_driver(spec, worker_index); await driver.put(key, value) ...
    system.processes()                   # {"etcd-1": pid, ...} for CPU accounting
    system.stop()                        # always, also after errors

Driver kinds are looked up in DRIVER_MODULES; each module there defines
`async def open_driver(spec: DriverSpec, worker: int) -> Driver`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# kind -> module defining `open_driver`
DRIVER_MODULES: dict[str, str] = {
    "replicator": "benchmarks.e2e.replicator_system",
    "etcd": "benchmarks.e2e.baselines",
    "redis": "benchmarks.e2e.baselines",
}

PLACEMENTS = ("both", "one")


class SystemUnavailable(Exception):
    """A system could not be installed or started; the message says why and what to do."""


@dataclass(frozen=True)
class DriverSpec:
    kind: str  # a key of DRIVER_MODULES
    endpoints: tuple[str, ...]  # "127.0.0.1:port", the ones the clients should use
    options: Mapping[str, Any] = field(default_factory=dict)  # picklable extras (TLS paths, bucket, ...)


class Driver(Protocol):
    """One per worker process, shared by that worker's coroutines."""

    async def put(self, key: str, value: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def close(self) -> None: ...


class BlockDriver(Driver, Protocol):
    """Drivers that also do block volumes (Replicator only)."""

    async def write_block(self, volume: str, lba: int, data: bytes) -> None: ...

    async def read_block(self, volume: str, lba: int, count: int) -> bytes: ...


class System(Protocol):
    name: str  # "replicator", "replicator-single", "etcd", "redis"

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def processes(self) -> dict[str, int]: ...

    def driver_spec(self, placement: str = "both") -> DriverSpec: ...


async def open_driver(spec: DriverSpec, worker: int) -> Driver:
    module = importlib.import_module(DRIVER_MODULES[spec.kind])
    driver: Driver = await module.open_driver(spec, worker)
    return driver
