"""replicatord: one site of a pair, the asyncio shell around `SiteCore`.

    replicatord --config site.toml

The shell is thin: it turns I/O into core events and core actions into I/O
(the rules are in replicator/core/events.py). Each core step runs to the
end on the event loop; persists are written at once (visible to reads) and
made durable by the group committer's syncing thread, which reports
`Persisted` in order. Frames to the peer go through one sender task, in
order, with the link's back-pressure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from replicator import __version__, framing
from replicator.api import errors
from replicator.api.admission import admitted
from replicator.api.backend import RangeEntry, SiteStatus, VerifyReport, WriteResult
from replicator.api.server import ListenError, start_site_server
from replicator.api.witness import PairMode, PairState
from replicator.client.witness import AsyncWitnessClient
from replicator.config import ConfigError, SiteConfig, derive, load_site_config
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.messages import Role
from replicator.core.records import Operation, Versioned, record_wire_bytes, versioned_wire_bytes
from replicator.core.site import SiteCore
from replicator.daemon.bounded import FrameQueue, Handles, Overloaded
from replicator.daemon.clock import WallClock
from replicator.daemon.exclusive import DirectoryLock, StartupError, listen_failure
from replicator.daemon.hostmetrics import add_host_metrics
from replicator.daemon.logs import add_listener, configure, log, remove_listener
from replicator.daemon.metrics import Registry, start_metrics_server
from replicator.daemon.ops import EventBus, ResyncProgress
from replicator.daemon.runner import Shutdown, quiet_grpc_core, run, sd_notify
from replicator.daemon.wire import Decoder, Encoder
from replicator.nbd.server import NbdServer, start_nbd_server
from replicator.storage import GroupCommitter, Store
from replicator.storage.errors import CorruptValue, StorageFailed
from replicator.transport import LinkDown, LinkUp
from replicator.transport.link import Link, LocalHello

TICK_S = 0.01
WITNESS_REPORT_S = 1.0  # how often a site reports where it is to the witness
CLEAR_PAGE_KEYS = 10_000
RESYNC_PROGRESS_LOG_S = 5.0  # a running resync logs (and streams) its progress this often


def encode_meta(value: int | bytes | str) -> bytes:
    if isinstance(value, bool) or isinstance(value, int):
        return b"i" + str(int(value)).encode()
    if isinstance(value, bytes):
        return b"b" + value
    return b"s" + value.encode()


def decode_meta(raw: bytes) -> int | bytes | str:
    tag, body = raw[:1], raw[1:]
    if tag == b"i":
        return int(body)
    if tag == b"b":
        return bytes(body)
    if tag == b"s":
        return body.decode()
    raise ValueError(f"bad meta value {raw[:16]!r}")


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class SiteDaemon:
    """Owns the core, the store, the link and the servers of one site."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        section = config.site
        self.name = section.name
        self.peer = section.peer_name
        self.site_name = section.name  # SiteBackend
        self.settings = derive(config)  # every layer's settings, from the one derivation
        self.handles = Handles(self.settings.daemon.requests_inflight_max)
        self.outbox: msg.ShipRecords | None = None  # records of this turn of the loop, not yet encoded
        self.outbox_bytes = 0
        self.outbox_bytes_max = self.settings.daemon.outbox_bytes_max
        self.outbox_scheduled = False
        self.unsynced: deque[tuple[int, int]] = deque()  # (store sequence, persist id) not yet durable
        self.durability_follower: asyncio.Task[None] | None = None
        self.next_handle = 1
        self.metrics = Registry()
        self.m_role = self.metrics.gauge("replicator_role", "1 for the site's current role", ["role"])
        self.m_epoch = self.metrics.gauge("replicator_epoch", "the site's epoch")
        self.m_writes = self.metrics.counter("replicator_writes_total", "client writes by outcome", ["outcome"])
        self.m_reads = self.metrics.counter("replicator_reads_total", "client reads by outcome", ["outcome"])
        self.m_write_latency = self.metrics.histogram("replicator_write_seconds", "write latency")
        self.m_read_latency = self.metrics.histogram("replicator_read_seconds", "read latency")
        self.m_dirty = self.metrics.gauge("replicator_dirty_keys", "keys the peer may lack")
        self.m_log = self.metrics.gauge("replicator_log_records", "records in the replication log")
        self.m_inflight = self.metrics.gauge("replicator_link_inflight_bytes", "unacknowledged link bytes")
        self.m_send_queue = self.metrics.gauge("replicator_send_queue_bytes", "frames waiting for the link sender")
        self.m_checksum = self.metrics.counter("replicator_checksum_errors_total", "corrupt values found on read")
        self.m_witness = self.metrics.gauge("replicator_witness_reachable", "1 if the last witness call answered")
        self.m_peer = self.metrics.gauge("replicator_peer_connected", "1 while a session with the peer is up")
        self.m_resync = self.metrics.gauge(
            "replicator_resync_keys_remaining", "dirty keys still to send while this site is a resync source"
        )
        self.m_resync_full = self.metrics.gauge("replicator_resync_full_active", "1 while a full resync scan is running")
        self.metrics.add_collector(self._collect)
        self.witness_reachable = False
        self.stopped = asyncio.Event()
        # Frames for the peer, each with the link session it was made for (see _on_link_state).
        self.send_queue = FrameQueue(self.settings.daemon.send_queue_bytes_max)
        self.link_session = 0
        self.encoder = Encoder(self.name, frame_bytes_max=self.settings.link.frame_size_bytes_max)
        self.decoder = Decoder(section.pair_id, self.peer)
        self.tasks: list[asyncio.Task[Any]] = []
        self.link: Link | None = None
        self.link_refusals_logged: dict[str, float] = {}
        self.witness_report_now = asyncio.Event()
        self.witness_id = ""  # our witness's identity (from its answers)
        self.peer_witness_id = ""  # the peer's, from its link HELLO
        # Every identity our witness has had: a peer naming one of them is not misconfigured, only
        # behind us in learning a replaced witness's identity (or its HELLO is older than that).
        self.witness_ids_seen: set[str] = set()
        self.witness_mismatch_logged = -1e9
        self.witness_behind_logged = -1e9
        self.m_witness_behind = self.metrics.gauge(
            "replicator_witness_epochs_behind", "how many epochs the witness is behind this site (0: not behind)"
        )
        self.wall_clock = WallClock.from_environment()  # REPLICATOR_CLOCK_FAULTS: the chaos suite's clock jumps
        # For the operator: since when and why the site is in its state, resync progress, events.
        self.started_ms = int(time.time() * 1000)
        self.state_since_ms = self.started_ms
        self.state_reason = "started"
        self.resync_progress = ResyncProgress()
        self.witness_preferred = ""  # as the witness holds it, from its answers to our reports
        self.draining = False
        self.events = EventBus()
        add_listener(self.events.on_log)
        self.m_build = self.metrics.gauge(
            "replicator_build_info", "always 1; the labels name the running software", ["version", "python"]
        )
        self.m_build.labels(__version__, sys.version.split()[0]).set(1)
        self.metrics.gauge("replicator_start_time_seconds", "when the site process started (Unix time)").set(
            self.started_ms / 1000
        )
        self.m_role_changes = self.metrics.counter(
            "replicator_role_changes_total", "role changes of this site, by the new role", ["role"]
        )
        self.m_draining = self.metrics.gauge("replicator_draining", "1 while drained for maintenance")
        self.m_link_ups = self.metrics.counter("replicator_link_up_total", "sessions with the peer established")
        self.m_link_downs = self.metrics.counter("replicator_link_down_total", "sessions with the peer lost")
        self.m_link_refusals = self.metrics.counter(
            "replicator_link_refused_total", "link handshakes refused by either end (wrong peer, pair, certificate)"
        )

    # ------------------------------------------------------------ start-up
    async def start(self) -> None:
        section = self.config.site
        data_dir = Path(section.data_dir)
        # Before the store: a second daemon on this data directory gets one clear line, not RocksDB's error.
        self.directory_lock = DirectoryLock(data_dir, "replicatord.lock", "site.data_dir")
        self.directory_lock.acquire()
        # REPLICATOR_STORAGE_FAULTS (a test hook of the chaos suite) is read by the store itself.
        self.store = Store.open(data_dir / "store", self.settings.store)
        recovered = self.store.load()
        meta = {name: decode_meta(raw) for name, raw in recovered.meta.items()}
        if "generation" not in meta:
            generation = os.urandom(16)
            batch = self.store.batch()
            batch.put_meta("generation", encode_meta(generation))
            self.store.write(batch)
            self.store.sync()
            meta["generation"] = generation
            log("generation", generation=generation)
        core_recovered = ev.Recovered(
            meta=meta,
            log=[framing.record_from_log(raw, record_id) for record_id, raw in recovered.log.items()],
            dirty=set(recovered.dirty),
            dedup={request_id: int(entry.outcome) for request_id, entry in recovered.dedup.items()},
        )
        core_config = self.settings.core
        self.core = SiteCore(core_config, core_recovered)
        self.committer = GroupCommitter(self.store)
        add_host_metrics(self.metrics, data_dir, self.config.tls, self.committer)
        self.committer.start()
        witness = self.settings.witness
        self.witness = AsyncWitnessClient(witness.address, tls=witness.tls, timeout_ms=witness.timeout_ms)
        dialer = self.name < self.peer
        self.link = Link(
            role="connect" if dialer else "accept",
            pair_id=section.pair_id,
            local_site=self.name,
            peer_site=self.peer,
            address=_address(section.peer_address if dialer else self.config.listen.link),
            # The extras name our witness: two sites that use different witnesses never go on alone.
            hello=lambda: LocalHello(self.core.epoch, self._link_incarnation(), self.witness_id.encode()),
            on_frame=self._on_frame,
            on_state=self._on_link_state,
            limits=self.settings.link,
            tls=self.settings.link_tls,
            on_refused=self._on_link_refused,
        )
        self._execute(self.core.start(self._mono_ms(), self._wall_ms()))
        try:
            await self.link.start()
        except OSError as error:
            raise listen_failure(self.config.listen.link, error) from None
        self.tasks.append(asyncio.create_task(self._sender(), name="link-sender"))
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

    def _readiness(self) -> tuple[bool, str]:
        """GET /readyz: ready while the site serves clients (a load balancer's check), with why not."""
        from replicator.api.backend import health_of

        status = self.status()
        level, reasons = health_of(status)
        text = f"{level} {status.site} {status.state} epoch {status.epoch}"
        return status.serving, text + "".join(f"\n{reason}" for reason in reasons)

    def _on_link_refused(self, reason: str) -> None:
        """A link handshake refused by either end: counted, logged at most once per reason every 10 s."""
        self.m_link_refusals.inc()
        now = time.monotonic()
        if now - self.link_refusals_logged.get(reason, -1e9) < 10.0:
            return
        if len(self.link_refusals_logged) > 64:
            self.link_refusals_logged.clear()
        self.link_refusals_logged[reason] = now
        log("link_refused", level="error", site=self.name, peer=self.peer, reason=reason)

    def _link_incarnation(self) -> int:
        """The link resumes a session when the peer's incarnation is unchanged, so a wiped site
        (whose incarnations start again at 1) must not look like the process it replaced: the
        generation's first bytes make the number unique per data directory."""
        return (int.from_bytes(self.core.generation[:3], "big") << 40) | self.core.incarnation

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

    # ------------------------------------------------------------ the core driver
    def _mono_ms(self) -> float:
        return time.monotonic() * 1000.0

    def _wall_ms(self) -> int:
        return self.wall_clock.now_ms()

    def step(self, event: ev.Event) -> None:
        if self.core.role is Role.STOPPED:
            return
        self._execute(self.core.step(event, self._mono_ms(), self._wall_ms()))

    def _execute(self, actions: list[ev.Action]) -> None:
        for action in actions:
            if isinstance(action, ev.Persist):
                self._persist(action)
            elif isinstance(action, ev.SendToPeer):
                self._send_to_peer(action.message)
            elif isinstance(action, ev.DropPeerConnection):
                self._flush_outbox()
                log("peer_drop", reason=action.reason)
                if self.link is not None:
                    self.link.reset(action.reason)
            elif isinstance(action, ev.AnswerWrite | ev.RejectRead):
                future = self.handles.pop(action.handle, None)
                if future is not None and not future.done():
                    future.set_result(action)
            elif isinstance(action, ev.ServeRead):
                future = self.handles.pop(action.handle, None)
                if future is not None and not future.done():
                    try:
                        future.set_result(self.store.get(action.key))
                    except CorruptValue as error:
                        self.m_checksum.inc()
                        log("corrupt_value", level="error", key=action.key)
                        future.set_exception(errors.Corrupt(str(error)))
            elif isinstance(action, ev.AskWitness):
                if self._witness_mismatch(action.request):
                    # As if the witness could not be reached: no grant from a witness the peer does not use.
                    asyncio.get_running_loop().call_soon(self.step, ev.WitnessFailed(action.request))
                    continue
                asyncio.get_running_loop().create_task(self._ask_witness(action.request))
            elif isinstance(action, ev.LoadResyncBatch):
                self._load_resync(action)
            elif isinstance(action, ev.RoleChanged):
                if action.new is Role.SYNC:
                    self.witness_report_now.set()
                self.state_since_ms = int(time.time() * 1000)
                self.state_reason = action.reason
                self.m_role_changes.labels(action.new.name).inc()
                self._resync_role_changed(action.old, action.new)
                log(
                    "role",
                    old=action.old.name,
                    new=action.new.name,
                    epoch=action.epoch,
                    reason=action.reason,
                    mono_ns=time.monotonic_ns(),
                )
            elif isinstance(action, ev.Committed):
                if self.config.chaos.log_commits:
                    log(
                        "commit",
                        record=str(action.record_id),
                        epoch=action.epoch,
                        role=action.role.name,
                        alone=action.alone,
                        mono_ns=time.monotonic_ns(),
                    )
            elif isinstance(action, ev.Stop):
                log("stopping", level="error", reason=action.reason)
                self.stopped.set()

    def _send_to_peer(self, message: msg.PeerMessage) -> None:
        """Hand a core message to the link sender, in order. The records of the writes started in
        one turn of the loop go out as one RECORDS frame (one ShipRecords for the peer's core: one
        persist and one ack there), up to OUTBOX_BYTES_MAX; any other message sends them first."""
        if isinstance(message, msg.ShipRecords) and not message.reconcile:
            size = sum(record_wire_bytes(record) for record in message.records)
            held = self.outbox
            if held is not None and (held.epoch != message.epoch or self.outbox_bytes + size > self.outbox_bytes_max):
                self._flush_outbox()
                held = None
            if held is None:
                self.outbox = message
                self.outbox_bytes = size
                if not self.outbox_scheduled:
                    self.outbox_scheduled = True
                    asyncio.get_running_loop().call_soon(self._flush_outbox)
            else:
                self.outbox = msg.ShipRecords(held.epoch, held.records + message.records)
                self.outbox_bytes += size
            return
        self._flush_outbox()
        for frame in self.encoder.encode(message):
            self.send_queue.put(self.link_session, frame)

    def _flush_outbox(self) -> None:
        self.outbox_scheduled = False
        held = self.outbox
        if held is not None:
            self.outbox = None
            for frame in self.encoder.encode(held):
                self.send_queue.put(self.link_session, frame)

    def _persist(self, persist: ev.Persist) -> None:
        batch = self.store.batch()
        if persist.clear_data:
            # A full resync's target starts empty: erase every key, page by page, in this one batch.
            start = b""
            erased = 0
            while True:
                page = self.store.scan(start, None, CLEAR_PAGE_KEYS)
                for version in page:
                    batch.erase(version.key)
                erased += len(page)
                if len(page) < CLEAR_PAGE_KEYS:
                    break
                start = page[-1].key + b"\x00"
            # Say what a full resync throws away: among these are whatever this site wrote alone
            # in an epoch the peer superseded (a forced failover at the peer), lost from now on.
            log(
                "resync_cleared",
                level="warning" if erased else "info",
                keys=erased,
                dirty_keys=len(self.core.dirty),
                reason="full resync: this site's copy is replaced by the peer's",
            )
        for record_id in persist.log_delete:
            batch.delete_record(record_id)
        for record in persist.log_put:
            batch.put_record(record.id, framing.record_to_log(record))
        for version in persist.apply:
            batch.apply(version.key, version.ts, version.value)
        for key in persist.dirty_add:
            batch.add_dirty(key)
        for key in persist.dirty_remove:
            batch.discard_dirty(key)
        now_ms = self._wall_ms()
        for request_id, ts in persist.dedup_put:
            batch.put_dedup(request_id, str(ts).encode(), now_ms)
        for name, value in persist.meta:
            batch.put_meta(name, encode_meta(value))
        try:
            sequence = self.committer.write_now(batch)
        except StorageFailed as error:
            # Not from inside this step's actions: the rest of them go out first, in order (a commit
            # decided before the failure is logged before the stop).
            asyncio.get_running_loop().call_soon(self.step, ev.PersistFailed(str(error)))
            return
        self.unsynced.append((sequence, persist.persist_id))
        if persist.urgent:
            self.committer.request_sync()  # else it rides on the next sync (GroupCommitter.wait_durable lazy)
        if self.durability_follower is None:
            self.durability_follower = asyncio.get_running_loop().create_task(self._follow_durability())

    async def _follow_durability(self) -> None:
        """Report `Persisted` for the highest persist id made durable by each sync (one step per
        sync, not one per persist: events.py rule 2), while persists wait for their sync."""
        unsynced = self.unsynced
        try:
            while unsynced:
                try:
                    # Lazy: the urgent persists asked for their sync when written; the rest wait for one.
                    await self.committer.wait_durable(unsynced[0][0], lazy=True)
                except StorageFailed as error:
                    unsynced.clear()
                    self.step(ev.PersistFailed(str(error)))
                    return
                durable = self.store.durable_sequence
                persist_id = 0
                while unsynced and unsynced[0][0] <= durable:
                    persist_id = unsynced.popleft()[1]
                if persist_id:
                    self.step(ev.Persisted(persist_id))
        finally:
            self.durability_follower = None

    def _load_resync(self, action: ev.LoadResyncBatch) -> None:
        """Load a resync batch, as much of it as fits in one link frame (at least one entry)."""
        # The core's byte bound: it checks the batch again when it makes the ResyncData of it.
        budget = self.core.config.message_bytes_max
        if action.keys:
            entries = []
            used = 0
            for key in action.keys:
                version = self.store.get(key)
                entry = version if version is not None else Versioned(key, 0, None)
                size = versioned_wire_bytes(entry)
                if entries and used + size > budget:
                    break
                entries.append(entry)
                used += size
            loaded = ev.ResyncBatchLoaded(action.token, tuple(entries), None)
            if self.resync_progress.kind == "full":
                self.resync_progress.advance(len(entries))
        else:
            versions = self.store.scan(action.scan_from or b"", None, action.limit)
            next_position = versions[-1].key + b"\x00" if len(versions) == action.limit else None
            used = 0
            for count, version in enumerate(versions):
                used += versioned_wire_bytes(version)
                if count and used > budget:
                    versions = versions[:count]
                    next_position = versions[-1].key + b"\x00"
                    break
            loaded = ev.ResyncBatchLoaded(action.token, tuple(versions), next_position)
            if self.resync_progress.kind == "full":
                self.resync_progress.advance(len(versions))
        asyncio.get_running_loop().call_soon(self.step, loaded)

    async def _ask_witness(self, request: msg.WitnessRequest) -> None:
        try:
            if isinstance(request, msg.Arbitrate):
                outcome = await self.witness.arbitrate(request.pair, request.site, request.epoch, request.force)
                verdict = msg.Verdict.GRANTED if outcome.granted else msg.Verdict.DENIED
            elif isinstance(request, msg.Query):
                states = [s for s in await self.witness.status(request.pair) if s.pair == request.pair]
                # A pair the witness never changed is SYNC in its first epoch.
                outcome = states[0] if states else PairState(request.pair, 1, PairMode.SYNC, "")
                verdict = msg.Verdict.STATE
            else:
                outcome = await self.witness.mark_synced(request.pair, request.site, request.epoch)
                verdict = msg.Verdict.SYNCED if outcome.granted else msg.Verdict.DENIED
        except Exception as error:  # the witness unreachable, a deadline, a refused call
            self.witness_reachable = False
            log("witness_failed", level="warning", request=type(request).__name__, error=str(error)[:200])
            self.step(ev.WitnessFailed(request))
            return
        self.witness_reachable = True
        mode = msg.WitnessMode.SOLO if outcome.mode.name == "SOLO" else msg.WitnessMode.SYNC
        answer = msg.WitnessAnswer(verdict, outcome.epoch, mode, outcome.holder)
        log("witness_answer", request=type(request).__name__, verdict=verdict.name, epoch=outcome.epoch)
        self.step(ev.WitnessAnswered(request, answer))

    # ------------------------------------------------------------ link
    def _on_link_state(self, event: Any) -> None:
        self._flush_outbox()  # records held for the connection that just ended: queued, then dropped as stale
        # Whatever the core queued for the connection that just ended (or for none) is stale from now on.
        self.link_session += 1
        self.send_queue.drop_all()
        if isinstance(event, LinkUp):
            self.decoder.reset()
            self.peer_witness_id = bytes(event.peer.extras).decode(errors="replace")
            if self._witnesses_differ():
                self._log_witness_mismatch()
            self.m_link_ups.inc()
            log("link_up", peer_restarted=event.peer_restarted, frames_dropped=event.frames_dropped)
            self.step(ev.PeerConnected())
        elif isinstance(event, LinkDown):
            self.m_link_downs.inc()
            log("link_down", reason=event.reason)
            self.step(ev.PeerDisconnected())

    def _on_frame(self, frame: framing.Frame) -> None:
        try:
            message = self.decoder.decode(frame)
        except framing.FramingError as error:
            log("bad_frame", level="warning", error=str(error))
            if self.link is not None:
                self.link.reset("bad frame")
            return
        if message is not None:
            self.step(ev.PeerSent(message))

    async def _sender(self) -> None:
        assert self.link is not None
        while True:
            session, frame = await self.send_queue.get()
            if session != self.link_session:
                continue  # made for a connection that is gone: the core starts over with Hello
            try:
                await self.link.send(frame)
            except (ValueError, OSError) as error:
                # A frame the link refuses (a bug: everything is cut to fit) must not kill the sender
                # silently: say so, drop the session, and let the core start over from a clean state.
                log("link_send_failed", level="error", error=error, frame_bytes=len(frame))
                self.link.reset(f"send failed: {error}")

    async def _probe_witness(self) -> None:
        """Report where this site is to the witness every second, and at once when the pair is SYNC
        again (a witness without state for the pair learns its epoch from these before it grants
        anything); keep `witness_reachable` true to life; warn loudly when the witness is behind."""
        while True:
            core = self.core
            try:
                states, identity = await self.witness.report(
                    self.config.site.pair_id,
                    self.name,
                    core.epoch,
                    holds_grant=core.holds_grant and core.role in (Role.SOLO, Role.RESYNC_SOURCE),
                    in_sync=core.role is Role.SYNC and core._session_up(),
                )
                self.witness_reachable = True
                self._check_witness_epoch(states)
                ours = [state for state in states if state.pair == self.config.site.pair_id]
                self.witness_preferred = ours[0].preferred if ours else ""
                if identity and identity != self.witness_id:
                    log("witness_identity", witness=self.config.witness.address, witness_id=identity)
                    self.witness_id = identity
                    self.witness_ids_seen.add(identity)
                    if self.link is not None and self.link.up:
                        self.link.reset("our witness changed: tell the peer in a new HELLO")
            except Exception:
                self.witness_reachable = False
            self.witness_report_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.witness_report_now.wait(), WITNESS_REPORT_S)

    def _witness_mismatch(self, request: msg.WitnessRequest) -> bool:
        """The two sites use different witnesses (a misconfiguration): going on alone could split the
        pair (each granted by its own witness), so no Arbitrate goes out, except an operator's forced one."""
        if not self._witnesses_differ():
            return False
        if not isinstance(request, msg.Arbitrate) or request.force:
            return False
        self._log_witness_mismatch()
        return True

    def _witnesses_differ(self) -> bool:
        return bool(self.witness_id and self.peer_witness_id) and self.peer_witness_id not in self.witness_ids_seen

    def _log_witness_mismatch(self) -> None:
        if time.monotonic() - self.witness_mismatch_logged >= 10.0:
            self.witness_mismatch_logged = time.monotonic()
            log(
                "witness_mismatch",
                level="critical",
                site=self.name,
                witness=self.config.witness.address,
                witness_id=self.witness_id,
                peer_witness_id=self.peer_witness_id,
                action="not asking to go on alone: the two sites must use the same witness (witness.address)",
            )

    def _check_witness_epoch(self, states: Sequence[PairState]) -> None:
        epoch = next((state.epoch for state in states if state.pair == self.config.site.pair_id), 0)
        behind = max(self.core.epoch - epoch, 0)
        if epoch == 0 and self.core.epoch == 1:
            behind = 0  # a new pair: the witness learns epoch 1 once the sites have met
        self.m_witness_behind.set(behind)
        if behind and time.monotonic() - self.witness_behind_logged >= 10.0:
            self.witness_behind_logged = time.monotonic()
            log(
                "witness_behind",
                level="error",
                site=self.name,
                epoch=self.core.epoch,
                witness_epoch=epoch,
                reason="the witness has no state for the pair (replaced?)"
                if epoch == 0
                else "the witness is behind this site (its state lost or restored from an older copy?)",
                action="the witness learns the pair's epoch from the sites' reports; see docs/operations.md",
            )

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.step(ev.TimePassed())
            progress = self.resync_progress
            if progress.active and time.monotonic() - progress.last_logged >= RESYNC_PROGRESS_LOG_S:
                self._update_resync_progress()
                progress.last_logged = time.monotonic()
                log("resync_progress", peer=self.peer, **progress.fields())

    # ------------------------------------------------------------ resync progress (for status and events)
    def _resync_role_changed(self, old: Role, new: Role) -> None:
        progress = self.resync_progress
        if new is Role.RESYNC_SOURCE and old is not Role.RESYNC_SOURCE:
            full = getattr(self.core, "resync_full_position", None)
            kind = "full" if full is not None else "incremental"
            progress.begin(kind, len(self.core.dirty))
            log("resync_started", kind=kind, peer=self.peer, keys=progress.total, epoch=self.core.epoch)
            if kind == "full":
                asyncio.get_running_loop().create_task(self._count_full_resync(full))
        elif new is Role.RESYNC_TARGET and old is not Role.RESYNC_TARGET:
            progress.begin("target", 0)
            log("resync_started", kind="target", source=self.peer, epoch=self.core.epoch)
        elif progress.active and new not in (Role.RESYNC_SOURCE, Role.RESYNC_TARGET):
            self._update_resync_progress()
            fields = progress.fields()
            seconds = round(time.monotonic() - progress.started, 3)
            outcome = "done" if new is Role.SYNC else f"stopped ({new.name})"
            log("resync_done", outcome=outcome, seconds=seconds, **fields)
            progress.end()

    async def _count_full_resync(self, position: bytes) -> None:
        """A full resync's total: the keys from its scan position on (counted off the event loop)."""
        count, _ = await asyncio.to_thread(self.store.range_digest, position or b"", None)
        if self.resync_progress.kind == "full":
            self.resync_progress.total = max(self.resync_progress.total, count + len(self.core.dirty))

    def _update_resync_progress(self) -> None:
        progress = self.resync_progress
        if progress.kind == "incremental":
            progress.set_remaining(len(self.core.dirty))

    def _collect(self) -> None:
        core = self.core
        for role in Role:
            self.m_role.labels(role.name).set(1 if core.role is role else 0)
        self.m_epoch.set(core.epoch)
        self.m_dirty.set(len(core.dirty))
        self.m_log.set(len(core.log))
        self.m_witness.set(1 if self.witness_reachable else 0)
        self.m_peer.set(1 if core._session_up() else 0)
        self.m_resync.set(len(core.dirty) if core.role is Role.RESYNC_SOURCE else 0)
        self.m_resync_full.set(1 if core.resync_full_position is not None else 0)
        if self.link is not None:
            self.m_inflight.set(self.link.unacknowledged_bytes)
        self.m_send_queue.set(self.send_queue.bytes)

    # ------------------------------------------------------------ SiteBackend
    def _handle(self, write: bool) -> tuple[int, asyncio.Future[Any]]:
        try:
            self.handles.check_room()
            if write:
                self.send_queue.check_room()  # writes are what fill it: back-pressure toward them
        except Overloaded as error:
            (self.m_writes if write else self.m_reads).labels("overloaded").inc()
            raise errors.Unavailable(str(error), self.config.site.peer_grpc_address) from None
        handle = self.next_handle
        self.next_handle += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.handles[handle] = future
        return handle, future

    def _unavailable(self, what: str) -> errors.Unavailable:
        # The servicer adds "site 'a' cannot serve (...); try site 'b' at ADDRESS": say only why here.
        role = self.core.role.name
        why = f"{what} refused while {role}"
        if role == "SYNC" and not self.core._session_up():
            why += ", the peer just became unreachable (a failover is under way)"
        elif role in ("SUSPENDED", "FENCED", "STARTING"):
            why += f"; {self.state_reason}" if self.state_reason else ""
        return errors.Unavailable(why, self.config.site.peer_grpc_address)

    def _refuse_if_draining(self, counter: Any) -> None:
        if self.draining:
            counter.labels("draining").inc()
            raise errors.Unavailable("drained for maintenance", self.config.site.peer_grpc_address)

    async def write(self, operations: Sequence[Operation], request_id: bytes, timeout_s: float) -> WriteResult:
        self._refuse_if_draining(self.m_writes)
        started = time.perf_counter()
        handle, future = self._handle(write=True)
        self.step(ev.WriteRequested(handle, request_id, tuple(operations)))
        try:
            answer: ev.AnswerWrite = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            self.m_writes.labels("unknown").inc()
            raise errors.OutcomeUnknown() from None
        finally:
            self.handles.pop(handle, None)
        if answer.ok:
            self.m_writes.labels("ok").inc()
            self.m_write_latency.observe(time.perf_counter() - started)
            return WriteResult(answer.ts, answer.duplicate)
        self.m_writes.labels(answer.error or "error").inc()
        if answer.error in ("unavailable", "overloaded"):
            raise self._unavailable("write")
        if answer.error == "invalid":
            raise errors.InvalidRequest(answer.message)
        raise errors.OutcomeUnknown(f"outcome unknown: {answer.message}")

    async def read(self, key: bytes, timeout_s: float) -> Versioned | None:
        self._refuse_if_draining(self.m_reads)
        started = time.perf_counter()
        handle, future = self._handle(write=False)
        self.step(ev.ReadRequested(handle, key))
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            self.m_reads.labels("timeout").inc()
            raise self._unavailable("read in time") from None
        finally:
            self.handles.pop(handle, None)
        if isinstance(result, ev.RejectRead):
            self.m_reads.labels(result.error).inc()
            raise self._unavailable("read")
        self.m_reads.labels("ok").inc()
        self.m_read_latency.observe(time.perf_counter() - started)
        version: Versioned | None = result
        return version

    async def scan(self, start: bytes, end: bytes | None, limit: int, timeout_s: float) -> list[Versioned]:
        # Linearizable per key: every key of the range is read through the core. The reads are issued
        # together: a key with nothing pending is served at once, so a page costs a few turns of the
        # event loop instead of one per key (a range full of tombstones, as S3 buckets leave, stays cheap).
        found = self.store.scan(start, end, limit)
        answers = await asyncio.gather(*(self.read(v.key, timeout_s) for v in found), return_exceptions=True)
        results = []
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            if answer is not None:
                results.append(answer)
        return results

    def status(self) -> SiteStatus:
        core = self.core
        progress = self.resync_progress
        self._update_resync_progress()
        role = ""
        if core.role in (Role.SOLO, Role.RESYNC_SOURCE):
            role = "source"
        elif core.role is Role.RESYNC_TARGET:
            role = "target"
        return SiteStatus(
            site=self.name,
            peer=self.peer,
            state=core.role.name,
            epoch=core.epoch,
            pair=self.config.site.pair_id,
            role=role,
            peer_reachable=core._session_up(),
            witness_reachable=self.witness_reachable,
            lag_records=len(core.log),
            dirty_keys=len(core.dirty),
            resync_progress=(progress.done, progress.total) if progress.kind != "target" else (0, 0),
            preferred=self.config.site.preferred_site,
            peer_address=self.config.site.peer_grpc_address,
            details={
                "incarnation": str(core.incarnation),
                "pending_writes": str(len(core.pending)),
                "tie_break_site": core.config.preferred,
                "witness": self.config.witness.address,
                # The request limits, so that a client can refuse an oversized input before reading it.
                "object_bytes_max": str(self.config.api.object_bytes_max),
                "block_write_bytes_max": str(self.config.api.block_write_bytes_max),
                "block_read_bytes_max": str(self.config.api.block_read_bytes_max),
                "trim_blocks_max": str(self.config.api.trim_blocks_max),
            }
            | self._nbd_details(),
            state_reason=self.state_reason,
            state_since_ms=self.state_since_ms,
            started_ms=self.started_ms,
            version=__version__,
            resync_kind=progress.kind,
            resync_rate_keys_per_s=round(progress.rate(), 1) if progress.kind != "target" else 0.0,
            resync_eta_s=round(progress.eta_s(), 1) if progress.kind != "target" else 0.0,
            witness_preferred=self.witness_preferred,
            draining=self.draining,
        )

    def _nbd_details(self) -> dict[str, str]:
        """The NBD server's base URI (an export is BASE/VOLUME), for `replicatorctl volume list`."""
        nbd = getattr(self, "nbd", None)
        if nbd is None:
            return {}
        return {"nbd": f"{'nbds' if self.config.tls.nbd is not None else 'nbd'}://{nbd.address}"}

    async def verify(self, repair: bool, progress: Callable[[int, int], None]) -> VerifyReport:
        """Online verify against the peer (replicator/daemon/verify.py); repair: this site's version wins."""
        from replicator.daemon.verify import LocalSide, PeerSide, Verifier

        started = time.perf_counter()
        peer = PeerSide(self.peer, self.config.site.peer_grpc_address, self.config.tls.grpc)
        try:
            outcome = await Verifier(LocalSide(self.store), peer, progress).run()
        finally:
            await peer.close()
        repaired = 0
        if repair and outcome.differing_keys:
            repaired = await self._verify_repair(outcome.differing_keys)
        log(
            "verify",
            keys_compared=outcome.keys_compared,
            entries_compared=outcome.entries_compared,
            ranges_narrowed=outcome.ranges_narrowed,
            candidates=outcome.candidates,
            differing=len(outcome.differing_keys),
            repaired=repaired,
            seconds=round(time.perf_counter() - started, 3),
        )
        return VerifyReport(outcome.keys_compared, tuple(outcome.differing_keys), repaired)

    # ------------------------------------------------------------ operator: drain, events
    async def drain(self, undo: bool) -> int:
        """Planned maintenance: refuse new client requests (UNAVAILABLE naming the peer, so clients
        move there at once, and health checks answer NOT_SERVING) and wait, up to the request
        timeout, for the requests in flight. Returns how many were still in flight. The pair stays
        SYNC: the site keeps replicating the peer's writes until it is stopped."""
        if undo:
            self.draining = False
            self.m_draining.set(0)
            log("drain", action="undone", site=self.name)
            return 0
        if self.core.role not in (Role.SYNC,):
            raise errors.Refused(
                f"drain needs the pair in SYNC (the peer must be able to serve alone); site {self.name} is "
                f"{self.core.role.name}"
            )
        self.draining = True
        self.m_draining.set(1)
        log("drain", action="started", site=self.name, in_flight=len(self.handles))
        deadline = time.monotonic() + self.config.api.request_timeout_ms / 1000
        while self.handles and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        log("drain", action="drained", site=self.name, in_flight=len(self.handles))
        return len(self.handles)

    def follow_events(self, history: bool, follow: bool) -> Any:
        return self.events.follow(history, follow)

    async def resync(self, full: bool) -> None:
        role = self.core.role
        if full:
            raise errors.Refused(
                "a full resync on demand is not supported: the core starts one by itself when the peer's "
                "generation changed (its data directory was wiped or replaced); to force one, stop the "
                "site to be rebuilt, empty its data_dir and start it again"
            )
        if role in (Role.RESYNC_SOURCE, Role.RESYNC_TARGET):
            return  # already running; `status` shows it
        raise errors.Refused(
            f"no resync to start: resync is automatic (it starts when a granted site meets its peer again) "
            f"and site {self.name} is {role.name}"
            + (
                ", the pair is in sync"
                if role is Role.SYNC
                else f"; it starts when site {self.peer} connects"
                if role is Role.SOLO
                else ""
            )
        )

    async def switchover(self) -> None:
        """Planned switchover: make the peer the preferred site at the witness (durably). While
        both sites are SYNC either one serves reads and writes; what changes is who wins when the
        link between them fails and both ask the witness at once."""
        if self.core.role is not Role.SYNC:
            raise errors.Refused(f"switchover needs the pair in SYNC; site {self.name} is {self.core.role.name}")
        try:
            outcome = await self.witness.set_preferred(self.config.site.pair_id, self.name, self.peer)
        except Exception as error:
            raise errors.Refused(f"switchover: the witness did not answer: {error}") from None
        if not outcome.granted:
            raise errors.Refused(f"switchover: the witness refused to prefer site {self.peer}")
        log("switchover", preferred=self.peer)

    async def failover(self, force: bool) -> None:
        """Forced failover: the operator vouches that the other site is down. This site asks the
        witness for the next epoch with `force` (granted whatever the witness's state), then goes
        on alone as after any grant (after the leases it granted ran out). It still needs the
        witness: a failover without it could not be fenced against the other site later."""
        if not force:
            raise errors.InvalidRequest("a forced failover needs force=True (replicatorctl failover --force)")
        core = self.core
        if core.role not in (Role.FENCED, Role.SUSPENDED, Role.STARTING):
            raise errors.Refused(
                f"forced failover is only for a site that is FENCED, SUSPENDED or STARTING with the peer "
                f"unreachable; site {self.name} is {core.role.name}"
            )
        if core._session_up():
            raise errors.Refused(f"forced failover refused: the peer site {self.peer} is reachable")
        if core.is_target:
            raise errors.Refused(
                f"forced failover refused: site {self.name} was being resynchronised and lacks data; "
                f"bring site {self.peer} back instead"
            )
        log("failover_forced", level="warning", site=self.name, epoch=core.epoch)
        self.step(ev.FailoverForced())
        deadline = time.monotonic() + (self.config.site.lease_ms + 3 * self.config.witness.timeout_ms) / 1000 + 2
        while time.monotonic() < deadline:
            if core.role is Role.SOLO and core.grant_epoch is None:
                return
            await asyncio.sleep(0.05)
        raise errors.Refused(
            f"forced failover did not complete: site {self.name} is {core.role.name} (is the witness "
            f"reachable? a forced failover needs its grant: it is never taken without the witness)"
        )

    # ------------------------------------------------------------ verify (helpers, and the peer's side)
    async def _verify_repair(self, keys: Sequence[bytes]) -> int:
        """Rewrite each key's current version from this site through the replicated write path.

        Only while SYNC (the write then reaches both sites); a fresh ts beats both copies, so this
        site's version wins. A key this site holds corrupt is left alone (repair from the peer)."""
        timeout_s = self.config.api.request_timeout_ms / 1000
        repaired = 0
        for key in keys:
            if self.core.role is not Role.SYNC:
                log("verify_repair_skipped", level="warning", key=key, state=self.core.role.name)
                continue
            try:
                current = await self.read(key, timeout_s)
                value = None if current is None else current.value
                await self.write([Operation(key, value)], b"verify-repair:" + os.urandom(16), timeout_s)
            except (errors.Unavailable, errors.OutcomeUnknown, errors.Corrupt, errors.InvalidRequest) as error:
                log("verify_repair_failed", level="warning", key=key, error=str(error)[:200])
                continue
            repaired += 1
        return repaired

    async def range_digests(self, ranges: Sequence[tuple[bytes, bytes | None]]) -> list[tuple[int, bytes]]:
        from replicator.daemon.verify import store_digests

        return await asyncio.to_thread(store_digests, self.store, list(ranges))

    async def range_entries(self, start: bytes, end: bytes | None, limit: int) -> list[RangeEntry]:
        from replicator.daemon.verify import store_entries

        return await asyncio.to_thread(store_entries, self.store, start, end, limit)

    async def key_entries(self, keys: Sequence[bytes]) -> list[RangeEntry]:
        from replicator.daemon.verify import store_key_entries

        return await asyncio.to_thread(store_key_entries, self.store, list(keys))


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
