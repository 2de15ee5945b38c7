"""Concurrent clients at both sites recording a history (chaos.checkers JSONL format).

Each client thread is one history process with its own `Client`: half start at
site a, half at b (each client knows both sites and fails over as the library
does). Keys come from a small key space so that clients conflict; every write
writes a unique value. Outcomes:

- ok: the call returned;
- fail: a read that failed (reads change nothing), or a write/delete every
  attempt of which was refused by a site that answered (UNAVAILABLE with the
  server's `replicator-other-site` trailer, INVALID_ARGUMENT, ...): nothing
  was applied;
- info: anything else (a deadline, a broken connection, a mix): the write may
  take effect at any time, or never.

The clients are the library's own `Client`: its retry plan
(replicator/client/retry.py) says whether a failed write's outcome is known,
as `ClientError.maybe_applied`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.checkers.history import History
from replicator.client import Client, ClientError, NotFound, RetryPolicy

BUCKET = "chaos"


@dataclass
class Sample:
    """One completed operation, for throughput and latency over time."""

    process: int
    f: str
    status: str
    invoke: int
    complete: int


@dataclass
class WorkloadConfig:
    clients_per_site: int = 3
    keys: int = 8
    read_fraction: float = 0.4
    delete_fraction: float = 0.05
    think_ms: float = 5.0
    call_timeout_ms: int = 2000
    attempts_max: int = 6
    seed: int = 0
    # Readers pinned to one site (a single-endpoint client) that only read the hot keys: they keep
    # asking a cut-off or paused site, where a stale read would show.
    readers_per_site: int = 0
    # Cold keys c0..c{cold_keys-1}, picked by `cold_fraction` of the writers' operations: rarely
    # rewritten, so a divergence on one survives until the sync-point comparison.
    cold_keys: int = 0
    cold_fraction: float = 0.0
    # Each writer writes only its home site's half of the hot keys, and the pinned readers read the
    # other site's half: keys a site's own pending writes do not block, so it answers reads of them
    # from its lease while the other site may already commit alone.
    home_keys: bool = False


@dataclass
class Workload:
    endpoints: dict[str, str]  # site -> gRPC address (through the client proxies)
    config: WorkloadConfig
    clock: Callable[[], int] = time.monotonic_ns
    history: History = field(init=False)
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.history = History(clock=self.clock)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gate = threading.Condition()  # pause(): clients finish what they do and wait
        self._paused = False
        self._active = 0

    def hot_keys(self) -> list[str]:
        return [f"k{i}" for i in range(self.config.keys)]

    def home_half(self, site: str) -> list[str]:
        """The hot keys the writers whose home is `site` write when `home_keys` is set."""
        hot = self.hot_keys()
        index = sorted(self.endpoints).index(site)
        half = hot[index::2]
        return half or hot

    def cold_keys(self) -> list[str]:
        return [f"c{i}" for i in range(self.config.cold_keys)]

    def keys(self) -> list[str]:
        return self.hot_keys() + self.cold_keys()

    def start(self) -> None:
        sites = sorted(self.endpoints)
        process = 0
        for site in sites:
            others = [s for s in sites if s != site]
            for _ in range(self.config.clients_per_site):
                endpoints = [self.endpoints[site]] + [self.endpoints[o] for o in others]
                thread = threading.Thread(
                    target=self._client, args=(process, endpoints, site), name=f"chaos-client-{process}",
                    daemon=True,
                )
                self._threads.append(thread)
                process += 1
            for _ in range(self.config.readers_per_site):
                other = others[0] if others and self.config.home_keys else site
                thread = threading.Thread(
                    target=self._reader, args=(process, self.endpoints[site], other), name=f"chaos-reader-{process}",
                    daemon=True,
                )
                self._threads.append(thread)
                process += 1
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._halt.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def pause(self, timeout_s: float = 30.0) -> bool:
        """Stop starting operations and wait until none is running; False if some still run at the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._gate:
            self._paused = True
            while self._active and time.monotonic() < deadline:
                self._gate.wait(0.05)
            return self._active == 0

    def resume(self) -> None:
        with self._gate:
            self._paused = False
            self._gate.notify_all()

    def _enter(self) -> bool:
        """Wait while paused; False when halted."""
        with self._gate:
            while self._paused and not self._halt.is_set():
                self._gate.wait(0.1)
            if self._halt.is_set():
                return False
            self._active += 1
            return True

    def _leave(self) -> None:
        with self._gate:
            self._active -= 1
            self._gate.notify_all()

    def _invoke(self, process: int, f: str, key: str, value: Any) -> Any:
        with self._lock:
            return self.history.invoke(process, f, key, value)

    def _complete(self, handle: Any, process: int, status: str, value: Any = None) -> None:
        with self._lock:
            now = self.clock()
            if status == "ok":
                self.history.ok(handle, value, time=now)
            elif status == "fail":
                self.history.fail(handle, time=now)
            else:
                self.history.info(handle, time=now)
            invoked = self.history_invoke_time(handle)
            self.samples.append(Sample(process, handle.f, status, invoked, now))

    def history_invoke_time(self, handle: Any) -> int:
        return int(self.history._invoke_times[handle.index])  # noqa: SLF001 - the builder keeps it

    def _count_error(self, error: Exception) -> None:
        name = type(error).__name__
        with self._lock:
            self.errors[name] = self.errors.get(name, 0) + 1

    def _client(self, process: int, endpoints: list[str], home: str) -> None:
        rng = random.Random(self.config.seed * 1000 + process)
        client = Client(endpoints, retry=self._policy())
        hot = self.home_half(home) if self.config.home_keys else self.hot_keys()
        cold = self.cold_keys()
        count = 0
        try:
            while self._enter():
                try:
                    key = rng.choice(cold if cold and rng.random() < self.config.cold_fraction else hot)
                    draw = rng.random()
                    if draw < self.config.read_fraction:
                        self._read(client, process, key)
                    elif draw < self.config.read_fraction + self.config.delete_fraction:
                        self._write(client, process, key, None)
                    else:
                        count += 1
                        self._write(client, process, key, f"p{process}-{count}")
                finally:
                    self._leave()
                if self.config.think_ms:
                    time.sleep(rng.uniform(0, 2 * self.config.think_ms) / 1000)
        finally:
            client.close()

    def _policy(self) -> RetryPolicy:
        return RetryPolicy(
            attempts_max=self.config.attempts_max,
            backoff_initial_ms=20,
            backoff_ms_max=500,
            call_timeout_ms=self.config.call_timeout_ms,
        )

    def _reader(self, process: int, endpoint: str, keys_of: str) -> None:
        """Reads hot keys (with `home_keys`, those `keys_of`'s writers write) at one site only."""
        rng = random.Random(self.config.seed * 1000 + process)
        client = Client([endpoint], retry=self._policy())
        keys = self.home_half(keys_of) if self.config.home_keys else self.hot_keys()
        try:
            while self._enter():
                try:
                    self._read(client, process, rng.choice(keys))
                finally:
                    self._leave()
                if self.config.think_ms:
                    time.sleep(rng.uniform(0, 2 * self.config.think_ms) / 1000)
        finally:
            client.close()

    def _read(self, client: Client, process: int, key: str) -> None:
        handle = self._invoke(process, "read", key, None)
        try:
            data = client.get(BUCKET, key)
        except NotFound:
            self._complete(handle, process, "ok", None)
        except Exception as error:  # noqa: BLE001 - a failed read changed nothing
            self._count_error(error)
            self._complete(handle, process, "fail")
        else:
            self._complete(handle, process, "ok", bytes(data).decode("utf-8", errors="replace"))

    def _write(self, client: Client, process: int, key: str, value: str | None) -> None:
        f = "write" if value is not None else "delete"
        handle = self._invoke(process, f, key, value)
        try:
            if value is None:
                client.delete(BUCKET, key)
            else:
                client.put(BUCKET, key, value.encode())
        except ClientError as error:
            self._count_error(error)
            self._complete(handle, process, "info" if error.maybe_applied else "fail")
        except Exception as error:  # noqa: BLE001 - not from a site: nothing says what was applied
            self._count_error(error)
            self._complete(handle, process, "info")
        else:
            self._complete(handle, process, "ok")

    def snapshot_samples(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)


def read_state(endpoint: str, keys: list[str], timeout_ms: int = 3000) -> dict[str, Any]:
    """Every object of the workload's bucket at one site (full listing, then each value), plus `keys`.

    Raises if the site cannot answer: a final state must be complete.
    """
    policy = RetryPolicy(attempts_max=3, call_timeout_ms=timeout_ms)
    state: dict[str, Any] = {}
    with Client([endpoint], retry=policy) as client:
        listed = client.list(BUCKET)
        for key in sorted(set(listed) | set(keys)):
            try:
                state[key] = bytes(client.get(BUCKET, key)).decode("utf-8", errors="replace")
            except NotFound:
                state[key] = None
    return state
