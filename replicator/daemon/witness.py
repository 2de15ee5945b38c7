"""The witness daemon: `replicator-witness --config witness.toml`.

Theory of operation. `WitnessCore` (replicator/core/witness.py) decides
everything; this module only drives it:

- a gRPC call (Arbitrate, MarkSynced) becomes a `WitnessRequested` event with
  a fresh handle; the call awaits the `WitnessReply` for that handle, at most
  `witness.request_timeout_ms` (then DEADLINE_EXCEEDED: the outcome is
  unknown, ask again);
- a `WitnessPersist` action wakes the persister, which writes the state of
  every pair to `data_dir/witness-state.json` atomically (temporary file,
  fsync, rename, fsync of the directory) in a worker thread, then reports
  `WitnessPersisted(last id written)`; the core releases the replies that
  waited for it. Writes are grouped: one write covers every persist issued
  before it started;
- a `WitnessTick` every 20 ms releases a non-preferred site's request once
  the preferred site's grace has passed.

`Status` answers from the last durable state only, so no answer ever shows a
state the witness could forget in a crash.

Pairs. `[[pairs]]` in the configuration declare a pair's two sites and
preferred site (the other site's request is held `witness.preferred_grace_ms`).
A pair that is not declared is learned from the requests: the first two site
names seen for it become its sites (persisted with its state), it has no
preferred site and no grace (first come, first served), and a third name is
denied. At most `LEARNED_PAIRS_MAX` pairs are learned.

The data directory holds a `LOCK` file (flock) so two witnesses never share
it. A state file that fails its checksum stops the start-up (exit 1): a
witness that silently forgot a grant could grant the other site too. A
failed write is fail-stop as well: nothing more is answered, the process
exits 1.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 1 on a start-up or
storage failure, 2 on a bad command line or configuration (the key and the
reason are printed on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from replicator import __version__
from replicator.api import errors
from replicator.api.server import RunningServer, start_witness_server
from replicator.api.witness import ArbitrationOutcome, PairMode
from replicator.api.witness import PairState as ApiPairState
from replicator.checksum import crc32c
from replicator.config import ConfigError, WitnessConfig, load_witness_config
from replicator.core.messages import (
    Arbitrate,
    MarkSynced,
    Report,
    SetPreferred,
    Verdict,
    WitnessAnswer,
    WitnessMode,
)
from replicator.core.witness import (
    PairConfig,
    PairState,
    WitnessCore,
    WitnessPersist,
    WitnessPersisted,
    WitnessReply,
    WitnessRequested,
    WitnessTick,
)
from replicator.daemon import logs
from replicator.daemon.logs import log
from replicator.daemon.metrics import MetricsServer, Registry, start_metrics_server
from replicator.daemon.runner import Shutdown, quiet_grpc_core, run, sd_notify

__all__ = ["STATE_FILE", "StateError", "StateStore", "StoredPair", "WitnessDaemon", "main"]

STATE_FILE = "witness-state.json"
LOCK_FILE = "LOCK"
ID_FILE = "witness-id"  # this witness's identity: the sites of a pair check that they use the same one
STATE_FORMAT = "replicator-witness-state"
STATE_VERSION = 1
TICK_MS = 20
LEARNED_PAIRS_MAX = 10_000


class StateError(Exception):
    """The data directory cannot be used (locked by another witness, unreadable, corrupt)."""


@dataclass(frozen=True, slots=True)
class StoredPair:
    state: PairState
    sites: tuple[str, ...]  # the sites known for the pair (declared or learned), 0 to 2


def _pairs_body(pairs: dict[str, StoredPair]) -> dict[str, dict[str, object]]:
    return {
        name: {
            "epoch": p.state.epoch,
            "mode": p.state.mode.name,
            "holder": p.state.holder,
            "sites": list(p.sites),
            **({"preferred": p.state.preferred} if p.state.preferred else {}),
        }
        for name, p in sorted(pairs.items())
    }


def _body_crc(body: dict[str, dict[str, object]]) -> int:
    return int(crc32c(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()))


class StateStore:
    """Per-pair state in one small JSON file with a CRC32C, replaced atomically."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / STATE_FILE
        self._lock_fd: int | None = None
        self.witness_id = ""

    def open(self) -> dict[str, StoredPair]:
        """Create the directory, take its lock, and load the stored pairs (empty on a fresh directory)."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StateError(f"witness.data_dir {str(self.data_dir)!r}: cannot use it: {error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateError(
                f"witness.data_dir {str(self.data_dir)!r} is in use by another witness process (lock {LOCK_FILE})"
            ) from None
        self._lock_fd = fd
        try:
            self.witness_id = self._identity()
            return self._load()
        except BaseException:
            self.close()
            raise

    def _identity(self) -> str:
        """Read this data directory's witness id, or make one (durably) on a new directory."""
        path = self.data_dir / ID_FILE
        try:
            text = path.read_text().strip()
            if text:
                return text
        except FileNotFoundError:
            pass
        except OSError as error:
            raise StateError(f"{path}: cannot read: {error}") from None
        identity = os.urandom(8).hex()
        temporary = path.with_name(ID_FILE + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, (identity + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        return identity

    def _load(self) -> dict[str, StoredPair]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise StateError(f"{self.path}: cannot read: {error}") from None
        try:
            document = json.loads(raw)
            if document.get("format") != STATE_FORMAT or document.get("version") != STATE_VERSION:
                raise ValueError(f"unknown format {document.get('format')!r} version {document.get('version')!r}")
            body = document["pairs"]
            if _body_crc(body) != document["crc32c"]:
                raise ValueError("checksum mismatch")
            pairs = {}
            for name, entry in body.items():
                state = PairState(
                    int(entry["epoch"]), WitnessMode[entry["mode"]], str(entry["holder"]), str(entry.get("preferred", ""))
                )
                pairs[name] = StoredPair(state, tuple(str(s) for s in entry["sites"]))
            return pairs
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise StateError(
                f"{self.path}: corrupt witness state ({error}); refusing to start: a witness that forgot a grant "
                f"could grant the other site too. Restore the file, or remove it only if no site is running alone."
            ) from None

    def write(self, pairs: dict[str, StoredPair]) -> None:
        """Blocking: write, fsync, rename over the old file, fsync the directory."""
        body = _pairs_body(pairs)
        document = {"format": STATE_FORMAT, "version": STATE_VERSION, "pairs": body, "crc32c": _body_crc(body)}
        data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()
        temporary = self.path.with_name(STATE_FILE + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        directory = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[WitnessAnswer]
    request: Arbitrate | MarkSynced
    started: float


def _now_ms() -> float:
    return time.monotonic() * 1000


def _kind(request: Arbitrate | MarkSynced) -> str:
    return "arbitrate" if isinstance(request, Arbitrate) else "mark_synced"


class WitnessDaemon:
    """WitnessCore + durable state + gRPC + metrics. Implements the WitnessBackend protocol."""

    def __init__(self, config: WitnessConfig, registry: Registry | None = None, tick_ms: int = TICK_MS) -> None:
        self.config = config
        self.tick_ms = tick_ms
        self.store = StateStore(config.witness.data_dir)
        self.registry = registry or Registry()
        self.core: WitnessCore | None = None
        self.server: RunningServer | None = None
        self.metrics_server: MetricsServer | None = None
        self.declared = {p.id for p in config.pairs}
        self.failed = asyncio.Event()  # set on a storage failure: fail-stop
        self._durable: dict[str, StoredPair] = {}
        self._issued = 0
        self._durable_id = 0
        self._waiters: dict[int, _Waiter] = {}
        self._handles = itertools.count(1)
        self._wake = asyncio.Event()
        self._persisted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._stopped = False
        self._shutdown: Shutdown | None = None
        self._metrics()

    # ------------------------------------------------------------ metrics
    def _metrics(self) -> None:
        r = self.registry
        self.m_epoch = r.gauge("replicator_witness_pair_epoch", "Current durable epoch of each pair", ("pair",))
        self.m_mode = r.gauge(
            "replicator_witness_pair_mode", "1 for the pair's current durable mode (SYNC or SOLO)", ("pair", "mode")
        )
        self.m_holder = r.gauge(
            "replicator_witness_pair_solo", "1 while the pair is SOLO, labelled with the holder", ("pair", "holder")
        )
        self.m_requests = r.counter(
            "replicator_witness_requests_total", "Answered requests by kind and verdict", ("request", "verdict")
        )
        self.m_timeouts = r.counter(
            "replicator_witness_request_timeouts_total", "Requests not answered within request_timeout_ms", ("request",)
        )
        self.m_latency = r.histogram(
            "replicator_witness_request_seconds", "Time from request to durable answer", ("request",)
        )
        self.m_persist = r.histogram("replicator_witness_persist_seconds", "Time to write and fsync the state file")
        self.m_persists = r.counter("replicator_witness_persist_writes_total", "State file writes")
        self.m_learned = r.gauge("replicator_witness_learned_pairs", "Pairs not declared in the configuration")
        self.m_start = r.gauge("replicator_witness_start_time_seconds", "Start time of the process (unix seconds)")
        self.m_start.set(time.time())
        self.registry.add_collector(self._collect)

    def _collect(self) -> None:
        self.m_mode.clear()
        self.m_holder.clear()
        for name, stored in self._durable.items():
            self.m_epoch.labels(name).set(stored.state.epoch)
            for mode in WitnessMode:
                self.m_mode.labels(name, mode.name).set(1 if stored.state.mode is mode else 0)
            if stored.state.mode is WitnessMode.SOLO:
                self.m_holder.labels(name, stored.state.holder).set(1)
        if self.core is not None:
            self.m_learned.set(len(self.core.pairs) - len(self.declared))

    # ------------------------------------------------------------ start
    async def start(self) -> None:
        """Load the state, start the core, the persister, the ticker, gRPC and metrics. Raises on failure."""
        stored = await asyncio.to_thread(self.store.open)
        grace = self.config.witness.preferred_grace_ms
        silence = self.config.witness.preferred_silence_ms
        pairs: dict[str, PairConfig] = {}
        for spec in self.config.pairs:
            sites = (spec.sites[0], spec.sites[1])
            if spec.preferred_site:
                pairs[spec.id] = PairConfig(sites, spec.preferred_site, grace, silence)
            else:  # no preferred site: first come, first served
                pairs[spec.id] = PairConfig(sites, sites[0], 0)
            previous = stored.get(spec.id)
            if previous is not None and previous.sites and set(previous.sites) != set(sites):
                log("pair_sites_changed", level="warning", pair=spec.id, stored=previous.sites, configured=sites)
        # A declared pair with no stored state may be a pair whose sites are far ahead (this witness
        # replaces a lost one): it learns the pair's epoch from the sites before granting anything.
        fresh = {name for name in pairs if name not in stored}
        self.core = WitnessCore(pairs, {name: p.state for name, p in stored.items()}, fresh=fresh)
        for name in sorted(fresh):
            log("pair_learning", pair=name, reason="no stored state: learning the pair's epoch from its sites")
        for name, previous in stored.items():
            if name not in self.declared:
                self.core.pairs[name] = self._learned_config(previous.sites)
        self._durable = self._snapshot()
        self._tasks = [asyncio.create_task(self._persist_loop()), asyncio.create_task(self._tick_loop())]
        self.server = await start_witness_server(self, self.config.listen.grpc, self.config.tls.grpc)
        self.metrics_server = await start_metrics_server(
            self.registry, self.config.listen.metrics, health=lambda: not self.failed.is_set()
        )

    @staticmethod
    def _learned_config(sites: Sequence[str]) -> PairConfig:
        padded = (tuple(s for s in sites if s) + ("", ""))[:2]
        # No preferred site: grace 0, so `preferred` is never consulted.
        return PairConfig((padded[0], padded[1]), padded[0], 0)

    @property
    def grpc_address(self) -> str:
        assert self.server is not None
        return self.server.address

    @property
    def metrics_address(self) -> str:
        assert self.metrics_server is not None
        return self.metrics_server.address

    # ------------------------------------------------------------ WitnessBackend
    async def set_preferred(self, pair: str, site: str, preferred: str) -> ArbitrationOutcome:
        log("set_preferred", pair=pair, site=site, preferred=preferred)
        return await self._request(SetPreferred(pair, site, preferred))

    async def arbitrate(self, pair: str, site: str, epoch: int, force: bool = False) -> ArbitrationOutcome:
        if force:
            log("forced_arbitrate", level="warning", pair=pair, site=site, request_epoch=epoch)
        return await self._request(Arbitrate(pair, site, epoch, force))

    async def mark_synced(self, pair: str, site: str, epoch: int) -> ArbitrationOutcome:
        return await self._request(MarkSynced(pair, site, epoch))

    async def report(self, pair: str, site: str, epoch: int, holds_grant: bool, in_sync: bool) -> None:
        if self.failed.is_set() or self._closing or self.core is None:
            raise errors.Unavailable("witness: not answering (shutting down or its storage failed)")
        if pair not in self.core.pairs:
            return  # pairs are learned from arbitration requests only
        was_fresh = pair in self.core.fresh
        self._step(WitnessRequested(next(self._handles), Report(pair, site, epoch, holds_grant, in_sync)))
        if not was_fresh and pair in self.core.fresh:
            stored = self._durable.get(pair)
            log(
                "pair_learning",
                level="warning",
                pair=pair,
                site=site,
                reported_epoch=epoch,
                epoch=stored.state.epoch if stored else None,
                reason="a site is ahead of this witness (its state was lost or restored from an older copy)",
            )
        elif was_fresh and pair not in self.core.fresh:
            state = self.core.states[pair]
            log("pair_learned_epoch", pair=pair, site=site, epoch=state.epoch, mode=state.mode, holder=state.holder)

    @property
    def witness_id(self) -> str:
        return self.store.witness_id

    def status(self, pair: str | None) -> Sequence[ApiPairState]:
        fresh = self.core.fresh if self.core is not None else set()
        # Declared pairs not durable yet (fresh, or just learned and being written) show epoch 0.
        known = set(self._durable) | fresh | (self.declared & set(self.core.states) if self.core is not None else set())
        names = sorted(known) if pair is None else [pair] if pair in known else []
        return [
            ApiPairState(name, 0, PairMode.SYNC, "", self._preferred(name))
            if name in fresh or name not in self._durable
            else ApiPairState(
                name,
                self._durable[name].state.epoch,
                PairMode[self._durable[name].state.mode.name],
                self._durable[name].state.holder,
                self._preferred(name),
            )
            for name in names
        ]

    def _preferred(self, pair: str) -> str:
        """The preferred site as this witness applies it: a switchover's, else the declared one ("" none)."""
        stored = self._durable.get(pair)
        if stored is not None and stored.state.preferred:
            return stored.state.preferred
        config = self.core.pairs.get(pair) if self.core is not None else None
        return config.preferred if config is not None and config.preferred_grace_ms > 0 else ""

    async def _request(self, request: Arbitrate | MarkSynced | SetPreferred) -> ArbitrationOutcome:
        if self.failed.is_set():
            raise errors.Unavailable("witness: its state storage failed; it answers nothing until restarted")
        if self._closing or self.core is None:
            raise errors.Unavailable("witness: shutting down")
        handle = next(self._handles)
        future: asyncio.Future[WitnessAnswer] = asyncio.get_running_loop().create_future()
        self._waiters[handle] = _Waiter(future, request, time.monotonic())
        self._learn(request.pair, request.site)
        timeout_ms = self.config.witness.request_timeout_ms
        try:
            self._step(WitnessRequested(handle, request))
            answer = await asyncio.wait_for(future, timeout_ms / 1000)
        except TimeoutError:
            self.m_timeouts.labels(_kind(request)).inc()
            log(
                "request_timeout",
                level="warning",
                request=_kind(request),
                pair=request.pair,
                site=request.site,
                request_epoch=request.epoch,
                timeout_ms=timeout_ms,
            )
            raise errors.OutcomeUnknown(
                f"witness: no durable answer within {timeout_ms} ms; the outcome is unknown, ask again"
            ) from None
        finally:
            self._waiters.pop(handle, None)
        return ArbitrationOutcome(
            granted=answer.verdict in (Verdict.GRANTED, Verdict.SYNCED, Verdict.STATE),
            epoch=answer.epoch,
            mode=PairMode[answer.mode.name],
            holder=answer.holder,
        )

    def _learn(self, pair: str, site: str) -> None:
        assert self.core is not None
        if pair in self.declared:
            return
        config = self.core.pairs.get(pair)
        if config is None:
            if len(self.core.pairs) - len(self.declared) >= LEARNED_PAIRS_MAX:
                log("pair_not_learned", level="warning", pair=pair, site=site, reason="too many learned pairs")
                return
            self.core.pairs[pair] = self._learned_config((site,))
            self.core.states.setdefault(pair, PairState())
            log("pair_learned", pair=pair, site=site)
        elif "" in config.sites and site not in config.sites:
            self.core.pairs[pair] = self._learned_config((config.sites[0], site))
            log("pair_learned", pair=pair, site=site, sites=self.core.pairs[pair].sites)

    # ------------------------------------------------------------ driving the core
    def _step(self, event: WitnessRequested | WitnessPersisted | WitnessTick) -> None:
        assert self.core is not None
        for action in self.core.step(event, _now_ms()):
            if isinstance(action, WitnessPersist):
                self._issued = action.persist_id
                self._wake.set()
            elif isinstance(action, WitnessReply):
                self._on_reply(action)

    def _on_reply(self, reply: WitnessReply) -> None:
        waiter = self._waiters.get(reply.handle)
        if waiter is None or waiter.future.done():
            log("late_reply", level="debug", handle=reply.handle, verdict=reply.answer.verdict)
            return
        request, answer = waiter.request, reply.answer
        kind = _kind(request)
        latency = time.monotonic() - waiter.started
        self.m_requests.labels(kind, answer.verdict.name.lower()).inc()
        self.m_latency.labels(kind).observe(latency)
        log(
            answer.verdict.name.lower(),
            request=kind,
            pair=request.pair,
            site=request.site,
            request_epoch=request.epoch,
            epoch=answer.epoch,
            mode=answer.mode,
            holder=answer.holder,
            latency_ms=round(latency * 1000, 2),
            mono_ns=time.monotonic_ns(),  # the host's monotonic clock: the chaos suite orders events by it
        )
        waiter.future.set_result(answer)

    def _snapshot(self) -> dict[str, StoredPair]:
        assert self.core is not None
        snapshot = {}
        for name, state in self.core.states.items():
            if name in self.core.fresh:
                continue  # not a fact yet: learned from the sites first
            config = self.core.pairs.get(name)
            sites = tuple(s for s in config.sites if s) if config is not None else ()
            snapshot[name] = StoredPair(state, sites)
        return snapshot

    async def _persist_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._issued <= self._durable_id:
                continue
            upto, snapshot = self._issued, self._snapshot()
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.store.write, snapshot)
            except Exception as error:
                self._fail(error)
                return
            self.m_persist.observe(time.monotonic() - started)
            self.m_persists.inc()
            previous, self._durable = self._durable, snapshot
            for name, stored in snapshot.items():
                before = previous.get(name)
                if before is None or before.state != stored.state:
                    log(
                        "state_changed",
                        pair=name,
                        epoch=stored.state.epoch,
                        mode=stored.state.mode,
                        holder=stored.state.holder,
                        previous_epoch=before.state.epoch if before else None,
                        previous_mode=before.state.mode if before else None,
                    )
            self._durable_id = upto
            self._step(WitnessPersisted(upto))
            self._persisted.set()

    def _fail(self, error: BaseException) -> None:
        log("state_write_failed", level="critical", error=error, path=self.store.path)
        self.failed.set()
        for waiter in list(self._waiters.values()):
            if not waiter.future.done():
                waiter.future.set_exception(errors.Unavailable("witness: its state storage failed"))
        if self.server is not None:
            from grpc_health.v1 import health_pb2

            for service in ("", "replicator.v1.WitnessService"):
                asyncio.ensure_future(self.server.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING))

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_ms / 1000)
            if not self.failed.is_set():
                self._step(WitnessTick())

    async def flush(self) -> None:
        """Wait until every persist issued so far is durable (or storage failed)."""
        while self._durable_id < self._issued and not self.failed.is_set():
            self._persisted.clear()
            self._wake.set()
            waiter = asyncio.ensure_future(self._persisted.wait())
            failed = asyncio.ensure_future(self.failed.wait())
            try:
                await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                failed.cancel()

    # ------------------------------------------------------------ stop
    async def shutdown(self) -> bool:
        """Staged: gRPC (in-flight calls finish), flush state, stop tasks, metrics, release the lock."""
        if self._shutdown is not None:
            return await self._shutdown.run()
        self._closing = True
        timeout_s = self.config.witness.shutdown_stage_timeout_ms / 1000
        shutdown = self._shutdown = Shutdown()
        if self.server is not None:
            server = self.server
            shutdown.add("grpc", lambda: server.stop(timeout_s * 0.8), timeout_s)
        shutdown.add("flush_state", self.flush, timeout_s)
        shutdown.add("tasks", self._stop_tasks, timeout_s)
        if self.metrics_server is not None:
            shutdown.add("metrics", self.metrics_server.stop, timeout_s)
        shutdown.add("release_lock", self._release, timeout_s)
        return await shutdown.run()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiter in list(self._waiters.values()):
            if not waiter.future.done():
                waiter.future.set_exception(errors.Unavailable("witness: shutting down"))

    async def _release(self) -> None:
        self.store.close()


# ------------------------------------------------------------------ entry point


async def _amain(config: WitnessConfig, stop: asyncio.Event) -> int:
    daemon = WitnessDaemon(config)
    try:
        await daemon.start()
    except Exception as error:
        log("start_failed", level="critical", error=error)
        await daemon.shutdown()
        return 1
    for address in config.exposed_addresses():
        log("exposed_address", level="warning", address=address, tls=config.tls.grpc is not None)
    log(
        "started",
        name=config.witness.name,
        pid=os.getpid(),
        grpc=daemon.grpc_address,
        metrics=daemon.metrics_address,
        data_dir=config.witness.data_dir,
        pairs={name: daemon.status(name)[0].epoch for name in sorted(daemon.declared)},
        learned_pairs=sorted(set(daemon.core.pairs) - daemon.declared) if daemon.core else [],
        tls=config.tls.grpc is not None,
    )
    sd_notify(f"READY=1\nSTATUS=witness started, {len(daemon.declared)} declared pairs")
    stop_wait = asyncio.ensure_future(stop.wait())
    fail_wait = asyncio.ensure_future(daemon.failed.wait())
    await asyncio.wait({stop_wait, fail_wait}, return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    fail_wait.cancel()
    sd_notify("STOPPING=1")
    await daemon.shutdown()
    failed = daemon.failed.is_set()
    log("stopped", exit_code=1 if failed else 0)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="replicator-witness", description="The witness: arbitrates which site of a pair goes on alone."
    )
    parser.add_argument("--version", action="version", version=f"replicator-witness {__version__}")
    parser.add_argument("--config", required=True, help="witness TOML configuration file")
    parser.add_argument("--log-level", choices=sorted(logs.LEVELS), default=None, help="minimum log level")
    args = parser.parse_args(argv)
    quiet_grpc_core()
    try:
        config = load_witness_config(args.config)
    except ConfigError as error:
        print(f"replicator-witness: bad configuration {args.config}: {error}", file=sys.stderr)
        return 2
    logs.configure("witness", level=args.log_level)
    return run(lambda stop: _amain(config, stop))


if __name__ == "__main__":
    sys.exit(main())
