"""replicatord: one site of a pair, the asyncio shell around `SiteCore`.

    replicatord --config site.toml

This module assembles adapters and does nothing else. The core is driven by the one
`SiteDriver` (replicator/driver.py: the actions executed by the rules of
replicator/core/events.py); its ports here are the group committer over RocksDB (persists
written at once, made durable by the syncing thread, reported in order), the peer outbox and
link (daemon/peer.py: one sender task, in order, with the link's back-pressure), the witness
client (daemon/witness_port.py) and the clocks. The gRPC/S3/NBD backend is daemon/backend.py;
the driver's host, resync progress and metrics (from `SiteCore.snapshot()`) daemon/site_state.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from replicator import __version__
from replicator.api.admission import admitted
from replicator.api.server import ListenError, start_site_server
from replicator.client.witness import AsyncWitnessClient
from replicator.config import TICK_MS, ConfigError, SiteConfig, derive, load_site_config
from replicator.core import events as ev
from replicator.core.site import SiteCore
from replicator.daemon.backend import SiteBackendMixin
from replicator.daemon.bounded import Handles
from replicator.daemon.clock import WallClock
from replicator.daemon.exclusive import DirectoryLock, StartupError, listen_failure
from replicator.daemon.hostmetrics import add_host_metrics
from replicator.daemon.logs import add_listener, configure, log, remove_listener
from replicator.daemon.metrics import start_metrics_server
from replicator.daemon.ops import EventBus, ResyncProgress
from replicator.daemon.peer import PeerLinkMixin, PeerOutbox
from replicator.daemon.runner import Shutdown, quiet_grpc_core, run, sd_notify
from replicator.daemon.site_state import DaemonHost, SiteStateMixin, register_site_metrics
from replicator.daemon.wire import Decoder, Encoder
from replicator.daemon.witness_port import WitnessPortMixin
from replicator.driver import SiteDriver, recover
from replicator.nbd.server import NbdServer, start_nbd_server
from replicator.storage import GroupCommitter, Store
from replicator.storage.errors import StorageFailed
from replicator.transport.link import Link

TICK_S = TICK_MS / 1000
RESYNC_PROGRESS_LOG_S = 5.0  # a running resync logs (and streams) its progress this often


class SiteDaemon(SiteBackendMixin, WitnessPortMixin, PeerLinkMixin, SiteStateMixin):
    """Owns the core, the store, the link and the servers of one site."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        section = config.site
        self.name = section.name
        self.peer = section.peer_name
        self.site_name = section.name  # SiteBackend
        self.settings = derive(config)  # every layer's settings, from the one derivation
        self.handles = Handles(self.settings.daemon.requests_inflight_max)
        self.durability_follower: asyncio.Task[None] | None = None
        self.next_handle = 1
        self.stopped = asyncio.Event()
        self.peer_port = PeerOutbox(
            Encoder(self.name, frame_bytes_max=self.settings.link.frame_size_bytes_max),
            self.settings.daemon.outbox_bytes_max,
            self.settings.daemon.send_queue_bytes_max,
        )
        self.decoder = Decoder(section.pair_id, self.peer)
        self.tasks: list[asyncio.Task[Any]] = []
        self.link: Link | None = None
        self.link_refusals_logged: dict[str, float] = {}
        self._init_witness_port()
        self.wall_clock = WallClock.from_environment()  # REPLICATOR_CLOCK_FAULTS: the chaos suite's clock jumps
        # For the operator: since when and why the site is in its state, resync progress, events.
        self.started_ms = int(time.time() * 1000)
        self.state_since_ms = self.started_ms
        self.state_reason = "started"
        self.resync_progress = ResyncProgress()
        register_site_metrics(self)
        self.draining = False
        self.events = EventBus()
        add_listener(self.events.on_log)

    # ------------------------------------------------------------ start-up
    async def start(self) -> None:
        section = self.config.site
        data_dir = Path(section.data_dir)
        # Before the store: a second daemon on this data directory gets one clear line, not RocksDB's error.
        self.directory_lock = DirectoryLock(data_dir, "replicatord.lock", "site.data_dir")
        self.directory_lock.acquire()
        # REPLICATOR_STORAGE_FAULTS (a test hook of the chaos suite) is read by the store itself.
        self.store = Store.open(data_dir / "store", self.settings.store)
        core_recovered = recover(self.store, self._new_generation)
        core_config = self.settings.core
        self.core = SiteCore(core_config, core_recovered)
        self.committer = GroupCommitter(self.store)
        self.driver = SiteDriver(
            self.core, self.store, self.peer_port, self, self, DaemonHost(self), write=self.committer.write_now,
            hold_persists=True,
        )
        add_host_metrics(self.metrics, data_dir, self.config.tls, self.committer)
        self.committer.start()
        witness = self.settings.witness
        self.witness = AsyncWitnessClient(witness.address, tls=witness.tls, timeout_ms=witness.timeout_ms)
        self.link = self._make_link()
        self.peer_port.link = self.link
        self.driver.start()
        try:
            await self.link.start()
        except OSError as error:
            raise listen_failure(self.config.listen.link, error) from None
        self.tasks.append(asyncio.create_task(self.peer_port.run_sender(), name="link-sender"))
        self.tasks.append(asyncio.create_task(self._ticker(), name="ticker"))
        self.tasks.append(asyncio.create_task(self._probe_witness(), name="witness-probe"))
        api = self.config.api  # gRPC and S3 share the site's admission control (api/admission.py)
        admitted_backend = admitted(self, api.admission_ops_max, api.admission_bytes_max, api.admission_wait_ms)
        self.server = await start_site_server(
            admitted_backend, self.config.listen.grpc, api, self.config.tls.grpc, self.config.s3
        )
        try:
            self.metrics_server = await start_metrics_server(
                self.metrics, self.config.listen.metrics, ready=self._readiness
            )
        except OSError as error:
            raise listen_failure(self.config.listen.metrics, error) from None
        self.nbd: NbdServer | None = None
        if self.config.nbd.listen:
            try:
                self.nbd = await start_nbd_server(
                    self, self.config.nbd, self.config.api, self.config.tls.nbd, self.metrics
                )
            except OSError as error:
                raise listen_failure(self.config.nbd.listen, error) from None
        self.s3_server = None
        if self.config.s3.enabled:
            from replicator.s3.server import start_s3_server  # aiohttp is loaded only when S3 is on

            self.s3_server = await start_s3_server(
                admitted_backend,
                self.config.s3,
                self.config.api.request_timeout_ms / 1000,
                self.config.tls.s3,
                self.metrics,
                self.config.api.key_bytes_max,
            )
            log("s3 listening", s3=self.s3_server.address, tls=self.config.tls.s3 is not None)
        log(
            "started",
            site=self.name,
            epoch=self.core.epoch,
            incarnation=self.core.incarnation,
            grpc=self.server.address,
            metrics=self.metrics_server.address,
            nbd=self.nbd.address if self.nbd is not None else "",
            exposed=self.config.exposed_addresses() if hasattr(self.config, "exposed_addresses") else [],
        )

    async def stop(self) -> None:
        remove_listener(self.events.on_log)
        shutdown = Shutdown()
        timeout = self.config.site.shutdown_stage_timeout_ms / 1000
        if getattr(self, "nbd", None) is not None:
            nbd = self.nbd
            assert nbd is not None
            # First: NBD clients must see their connections drop (never ESHUTDOWN) and go elsewhere.
            shutdown.add("drop NBD connections", nbd.stop, timeout)
        shutdown.add("stop accepting requests", lambda: self.server.stop(timeout / 2), timeout)
        if getattr(self, "s3_server", None) is not None:
            shutdown.add("stop the S3 endpoint", self.s3_server.stop, timeout)
        shutdown.add("drain in-flight writes", self._drain, timeout)
        shutdown.add("close the link", self._close_link, timeout)
        shutdown.add("flush storage", self.committer.close, timeout)
        shutdown.add("close servers", self._close_rest, timeout)
        await shutdown.run()
        self.store.close()
        self.directory_lock.release()

    async def abort_start(self) -> None:
        """Undo a start-up that failed half-way (best effort: each part may not exist yet)."""
        for task in self.tasks:
            task.cancel()
        parts: list[Callable[[], Any]] = [
            lambda: self.server.stop(0),
            lambda: self.metrics_server.stop(),
            lambda: self.nbd.stop() if getattr(self, "nbd", None) is not None else None,
            lambda: self.link.close() if self.link is not None else None,
            lambda: self.committer.close(),
            lambda: self.witness.close(),
        ]
        for part in parts:
            try:
                result = part()
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, 2.0)
            except (AttributeError, Exception):  # noqa: PERF203 - each part on its own
                pass
        for name in ("store", "directory_lock"):
            thing = getattr(self, name, None)
            if thing is not None:
                closer = thing.release if name == "directory_lock" else thing.close
                try:
                    closer()
                except Exception:  # noqa: BLE001 - best effort on a failed start
                    pass

    async def _drain(self) -> None:
        while any(not future.done() for future in self.handles.values()):
            await asyncio.sleep(0.01)

    async def _close_link(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.link is not None:
            await self.link.close()

    async def _close_rest(self) -> None:
        await self.metrics_server.stop()
        await self.witness.close()

    # ------------------------------------------------------------ the driver's ports (Clock, WitnessPort)
    def mono_ms(self) -> float:
        return time.monotonic() * 1000.0

    def wall_ms(self) -> int:
        return self.wall_clock.now_ms()

    def _new_generation(self) -> bytes:
        generation = os.urandom(16)
        log("generation", generation=generation)
        return generation

    def step(self, event: ev.Event) -> None:
        self.driver.step(event)

    def follow_durability(self) -> None:
        if self.durability_follower is None:
            self.durability_follower = asyncio.get_running_loop().create_task(self._follow_durability())

    async def _follow_durability(self) -> None:
        """Report each sync's durable sequence to the driver (one Persisted per sync: events.py
        rule 2), while persists wait for their sync."""
        driver = self.driver
        try:
            while (sequence := driver.first_unsynced_sequence) is not None:
                try:
                    # Lazy: the urgent persists asked for their sync when written; the rest wait for one.
                    await self.committer.wait_durable(sequence, lazy=True)
                except StorageFailed as error:
                    driver.sync_failed(str(error))
                    return
                driver.durable(self.store.durable_sequence)
        finally:
            self.durability_follower = None

    # ------------------------------------------------------------ time
    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.step(ev.TimePassed())
            progress = self.resync_progress
            if progress.active and time.monotonic() - progress.last_logged >= RESYNC_PROGRESS_LOG_S:
                self._update_resync_progress()
                progress.last_logged = time.monotonic()
                log("resync_progress", peer=self.peer, **progress.fields())



async def _main(config: SiteConfig, stop: asyncio.Event) -> int:
    daemon = SiteDaemon(config)
    try:
        await daemon.start()
    except (StartupError, ListenError, StorageFailed, OSError) as error:
        # One line, no traceback: a taken port, a data directory in use, a store that cannot open.
        log("start_failed", level="critical", site=config.site.name, error=str(error))
        await daemon.abort_start()
        return 1
    sd_notify(f"READY=1\nSTATUS=site {daemon.name} started, {daemon.core.role.name}")
    stopped = asyncio.create_task(daemon.stopped.wait())
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait({stopped, signalled}, return_when=asyncio.FIRST_COMPLETED)
    sd_notify("STOPPING=1")
    await daemon.stop()
    return 1 if daemon.stopped.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="replicatord", description="Run one site of a Replicator pair.")
    parser.add_argument("--version", action="version", version=f"replicatord {__version__}")
    parser.add_argument("--config", required=True, help="the site's TOML configuration")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error", "critical"],
        default=None,
        help="minimum log level (default: REPLICATOR_LOG_LEVEL, else info)",
    )
    args = parser.parse_args(argv)
    quiet_grpc_core()
    try:
        config = load_site_config(args.config)
    except (ConfigError, OSError) as error:
        print(f"replicatord: {args.config}: {error}", file=sys.stderr)
        return 2
    configure("replicatord", config.site.name, level=args.log_level)
    for deprecated in config.deprecated:
        log("config_deprecated", level="warning", config=args.config, key=deprecated)
    return run(lambda stop: _main(config, stop))


if __name__ == "__main__":
    sys.exit(main())
