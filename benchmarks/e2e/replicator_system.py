"""The Replicator systems of the benchmark and their driver.

- `ReplicatorSystem` ("replicator"): a witness and two site daemons started by
  `replicator.local.LocalCluster` in the given directory: real processes, real RocksDB with
  fsync, the real site link over TCP, real gRPC, everything on 127.0.0.1. Every write is
  acknowledged only once durable at both sites.
- `ReplicatorSingleSystem` ("replicator-single", "replication off"): THE SAME daemon alone.
  This is how "replication off" is measured, with no special build or setting: the pair is
  started, both sites reach SYNC, then site b is stopped cleanly (SIGTERM, `stop_process("b")`)
  and the suite waits until site a reports SOLO (the witness granted it the pair, so a commits
  locally without its peer). Every request then goes to a only; writes are durable at a alone
  (its own RocksDB group commit and fsync) and the site link is idle. The difference between
  the two systems is what replication costs.

Both create a block volume (`VOLUME`, 4 KiB blocks, `volume_size_bytes`) in `start()` for the
block runs, and name it in the driver spec's options.

The driver (kind "replicator", `open_driver(spec, worker)`): one worker process's coroutines share
it. With placement "both" it holds two `AsyncClient`s over the same two endpoints, one ordered
[a, b] and one [b, a]; the client sends to the first endpoint of its list and stays there while it
answers, so the coroutines (the load generator's coroutine n of worker w starts at site (w + n) % 2)
are spread half on site a, half on site b: active-active. With "one" every coroutine uses [a, b],
so everything goes to a (b stays the failover endpoint, unused while a answers). The clients run in
their default multiplexed mode (each client's concurrent calls share one session stream per site;
spec.options["multiplex"] = False makes every call unary, for comparison). The clients do
not retry (RetryPolicy(attempts_max=1) unless spec.options["retry_attempts"] says otherwise): a
failed call must show up as an error in the results, not as a slow success after a retry.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from pathlib import Path
from typing import Any

from benchmarks.e2e.common import PLACEMENTS, DriverSpec, SystemUnavailable
from benchmarks.e2e.loadgen import CLIENT_TASK_PREFIX

BUCKET = "bench"
VOLUME = "benchvol"
BLOCK_SIZE = 4096
VOLUME_SIZE_BYTES = 4 * 1024**3  # sparse: only what a run writes takes space
STATE_TIMEOUT_S = 30.0
CALL_TIMEOUT_MS = 20_000  # large 1 MiB writes at high concurrency queue for a while; errors beyond this


def _site_state(endpoint: str) -> str:
    from replicator.client import Client, RetryPolicy

    try:
        with Client([endpoint], retry=RetryPolicy(attempts_max=1, call_timeout_ms=1000)) as client:
            return str(client.status().state)
    except Exception as error:  # not answering yet
        return f"unreachable ({type(error).__name__})"


def _wait_state(endpoints: dict[str, str], wanted: str, timeout_s: float = STATE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {name: _site_state(endpoint) for name, endpoint in endpoints.items()}
        if all(state == wanted for state in states.values()):
            return
        time.sleep(0.1)
    shown = ", ".join(f"{name} {state}" for name, state in states.items())
    raise SystemUnavailable(f"the Replicator sites did not reach {wanted} within {timeout_s:.0f} s ({shown})")


class ReplicatorSystem:
    """A witness and two sites on loopback (see the module docstring)."""

    name = "replicator"
    single = False
    timeouts = "demo"  # LocalCluster's timeout profile: "demo" (short, loopback) or "production" (the defaults)

    def __init__(self, directory: str | Path, *, volume_size_bytes: int = VOLUME_SIZE_BYTES) -> None:
        self.directory = Path(directory)
        self.volume_size_bytes = volume_size_bytes
        self.cluster: Any = None  # replicator.local.LocalCluster once started
        self.endpoints: dict[str, str] = {}

    def version(self) -> str:
        import replicator

        return str(replicator.__version__)

    def start(self) -> None:
        from replicator.local import LocalCluster, LocalClusterError, site_daemon_available

        if not site_daemon_available():
            raise SystemUnavailable("the Replicator site daemon is not installed (run `make build`)")
        self.cluster = LocalCluster(self.directory, health_timeout_s=60, stop_timeout_s=10, timeouts=self.timeouts)
        try:
            self.cluster.start(sites=True)
            sites = self.cluster.cluster["sites"]
            self.endpoints = {name: sites[name]["grpc"] for name in ("a", "b")}
            _wait_state(self.endpoints, "SYNC")
            self._create_volume()
            if self.single:
                # Replication off: the same daemon alone. b stops cleanly; a is granted SOLO by the
                # witness and from then on commits without a peer.
                self.cluster.stop_process("b")
                _wait_state({"a": self.endpoints["a"]}, "SOLO")
        except LocalClusterError as error:
            self.stop()
            raise SystemUnavailable(f"cannot start the Replicator cluster in {self.directory}: {error}") from None
        except BaseException:
            self.stop()
            raise

    def settings(self) -> str:
        """The timeouts the sites really run with (replicator.local's demo settings, read back)."""
        from replicator.config import load_site_config

        try:
            site = load_site_config(self.directory / "a.toml").site
        except Exception as error:
            return f"(cannot read a.toml: {error})"
        mode = "site a alone (b stopped, a SOLO)" if self.single else "witness + sites a and b"
        return (
            f"{mode}, replicator.local {self.timeouts} settings: peer_timeout_ms {site.peer_timeout_ms}, "
            f"heartbeat_interval_ms {site.heartbeat_interval_ms}, lease_ms {site.lease_ms}; clients do not retry"
        )

    def wait_ready(self, timeout_s: float = STATE_TIMEOUT_S) -> str:
        """Before each run: wait until the system is in its measured state again (both sites SYNC, or a
        SOLO for the single site) and say what was seen. Raises SystemUnavailable after `timeout_s`.

        A pair that dropped out of SYNC under the previous run's load (see the sites' logs) would
        otherwise make every later run measure a resync instead of the steady state."""
        wanted = "SOLO" if self.single else "SYNC"
        endpoints = {"a": self.endpoints["a"]} if self.single else dict(self.endpoints)
        before = {name: _site_state(endpoint) for name, endpoint in endpoints.items()}
        if all(state == wanted for state in before.values()):
            return "ready"
        began = time.monotonic()
        _wait_state(endpoints, wanted, timeout_s)
        seen = ", ".join(f"{name} {state}" for name, state in before.items())
        return f"was not ready ({seen}); {wanted} again after {time.monotonic() - began:.1f} s"

    def mark(self) -> dict[str, int]:
        """Where each process's log ends now (for `incidents_since`)."""
        marks = {}
        for name in ("a", "b", "witness"):
            try:
                marks[name] = (self.directory / f"{name}.log").stat().st_size
            except OSError:
                marks[name] = 0
        return marks

    def incidents_since(self, mark: dict[str, int]) -> list[str]:
        """The sites' role changes logged since `mark` ("b SYNC->SUSPENDED (peer timeout)", ...): a pair that
        leaves SYNC during a run is measured in another state, which the results must say."""
        incidents = []
        for name in ("a", "b"):
            try:
                with (self.directory / f"{name}.log").open("rb") as handle:
                    handle.seek(mark.get(name, 0))
                    text = handle.read().decode(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if '"role"' not in line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "role":
                    incidents.append(f"{name} {event.get('old')}->{event.get('new')} ({event.get('reason', '')})")
        return incidents

    def _create_volume(self) -> None:
        from replicator.client import AlreadyExists, Client

        with Client([self.endpoints["a"], self.endpoints["b"]]) as client:
            try:
                client.create_volume(VOLUME, self.volume_size_bytes, BLOCK_SIZE)
            except AlreadyExists:
                pass

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    def processes(self) -> dict[str, int]:
        """The running processes of this system (b is not one of them in the single-site system)."""
        if self.cluster is None:
            return {}
        return {
            name: process.pid
            for name, process in self.cluster.processes.items()
            if process.pid is not None and self.cluster.is_running(name)
        }

    def driver_spec(self, placement: str = "both") -> DriverSpec:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if not self.endpoints:
            raise RuntimeError("start() the system first")
        if self.single:
            endpoints: tuple[str, ...] = (self.endpoints["a"],)
            placement = "one"
        else:
            endpoints = (self.endpoints["a"], self.endpoints["b"])
        options = {
            "placement": placement,
            "bucket": BUCKET,
            "volume": VOLUME,
            "block_size": BLOCK_SIZE,
            "volume_size_bytes": self.volume_size_bytes,
        }
        return DriverSpec("replicator", endpoints, options)


class ReplicatorSingleSystem(ReplicatorSystem):
    """The same daemon with replication off: site a alone, SOLO (see the module docstring)."""

    name = "replicator-single"
    single = True


class ReplicatorProductionSystem(ReplicatorSystem):
    """The same pair with every timeout at the configuration's shipped default (what an operator runs)."""

    name = "replicator-production"
    timeouts = "production"


class ReplicatorDriver:
    """One worker's driver: AsyncClients, a coroutine sticks to the one it was given first."""

    def __init__(self, spec: DriverSpec, worker: int) -> None:
        from replicator.client import AsyncClient, RetryPolicy

        options = spec.options
        endpoints = list(spec.endpoints)
        orders = [endpoints]
        if options.get("placement", "both") == "both" and len(endpoints) == 2:
            orders.append(endpoints[::-1])
        retry = RetryPolicy(
            attempts_max=int(options.get("retry_attempts", 1)),
            call_timeout_ms=int(options.get("call_timeout_ms", CALL_TIMEOUT_MS)),
        )
        # The public client as a user would run it: multiplexed (its default) unless the spec says "multiplex": False.
        multiplex = bool(options.get("multiplex", True))
        self.clients = [AsyncClient(order, retry=retry, multiplex=multiplex) for order in orders]
        self.bucket = str(options.get("bucket", BUCKET))
        self._assigned: weakref.WeakKeyDictionary[asyncio.Task[Any], Any] = weakref.WeakKeyDictionary()
        self.worker = worker
        self._next = worker

    def _client(self) -> Any:
        task = asyncio.current_task()
        if task is None:
            return self.clients[0]
        client = self._assigned.get(task)
        if client is None:
            # The load generator names its coroutines "bench-client-<n>": coroutine n of worker w starts
            # at site (w + n) % 2, so every worker alternates and c=1 always starts at a. Other tasks
            # (the prefill) take turns.
            name = task.get_name()
            if name.startswith(CLIENT_TASK_PREFIX) and name[len(CLIENT_TASK_PREFIX):].isdigit():
                slot = self.worker + int(name[len(CLIENT_TASK_PREFIX):])
            else:
                slot, self._next = self._next, self._next + 1
            client = self.clients[slot % len(self.clients)]
            self._assigned[task] = client
        return client

    async def put(self, key: str, value: bytes) -> None:
        await self._client().put(self.bucket, key, value)

    async def get(self, key: str) -> bytes | None:
        from replicator.client import NotFound

        try:
            data: bytes = await self._client().get(self.bucket, key)
        except NotFound:
            return None
        return data

    async def write_block(self, volume: str, lba: int, data: bytes) -> None:
        await self._client().write_blocks(volume, lba, data)

    async def read_block(self, volume: str, lba: int, count: int) -> bytes:
        data: bytes = await self._client().read_blocks(volume, lba, count)
        return data

    # the client library's names
    write_blocks = write_block
    read_blocks = read_block

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


async def open_driver(spec: DriverSpec, worker: int) -> ReplicatorDriver:
    return ReplicatorDriver(spec, worker)
