"""The site's state for the operator, kept beside the driver: the driver's host (client answers,
role changes, commits, logs), resync progress, and the metrics, all from the core's frozen
snapshot (`SiteCore.snapshot`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from replicator import __version__
from replicator.api import errors
from replicator.core import events as ev
from replicator.core.messages import Role
from replicator.core.records import Versioned
from replicator.daemon.logs import log
from replicator.daemon.metrics import Registry
from replicator.driver import Host, SiteDriver
from replicator.storage.errors import CorruptValue


def register_site_metrics(daemon: Any) -> None:
    """The site's metrics, as attributes of the daemon (m_*); collected from the snapshot."""
    daemon.metrics = Registry()
    daemon.m_role = daemon.metrics.gauge("replicator_role", "1 for the site's current role", ["role"])
    daemon.m_epoch = daemon.metrics.gauge("replicator_epoch", "the site's epoch")
    daemon.m_writes = daemon.metrics.counter("replicator_writes_total", "client writes by outcome", ["outcome"])
    daemon.m_reads = daemon.metrics.counter("replicator_reads_total", "client reads by outcome", ["outcome"])
    daemon.m_write_latency = daemon.metrics.histogram("replicator_write_seconds", "write latency")
    daemon.m_read_latency = daemon.metrics.histogram("replicator_read_seconds", "read latency")
    daemon.m_dirty = daemon.metrics.gauge("replicator_dirty_keys", "keys the peer may lack")
    daemon.m_log = daemon.metrics.gauge("replicator_log_records", "records in the replication log")
    daemon.m_inflight = daemon.metrics.gauge("replicator_link_inflight_bytes", "unacknowledged link bytes")
    daemon.m_send_queue = daemon.metrics.gauge("replicator_send_queue_bytes", "frames waiting for the link sender")
    daemon.m_checksum = daemon.metrics.counter("replicator_checksum_errors_total", "corrupt values found on read")
    daemon.m_witness = daemon.metrics.gauge("replicator_witness_reachable", "1 if the last witness call answered")
    daemon.m_peer = daemon.metrics.gauge("replicator_peer_connected", "1 while a session with the peer is up")
    daemon.m_resync = daemon.metrics.gauge(
        "replicator_resync_keys_remaining", "dirty keys still to send while this site is a resync source"
    )
    daemon.m_resync_full = daemon.metrics.gauge("replicator_resync_full_active", "1 while a full resync scan is running")
    daemon.m_witness_behind = daemon.metrics.gauge(
        "replicator_witness_epochs_behind", "how many epochs the witness is behind this site (0: not behind)"
    )
    daemon.m_build = daemon.metrics.gauge(
        "replicator_build_info", "always 1; the labels name the running software", ["version", "python"]
    )
    daemon.m_build.labels(__version__, sys.version.split()[0]).set(1)
    daemon.metrics.gauge("replicator_start_time_seconds", "when the site process started (Unix time)").set(
        daemon.started_ms / 1000
    )
    daemon.m_role_changes = daemon.metrics.counter(
        "replicator_role_changes_total", "role changes of this site, by the new role", ["role"]
    )
    daemon.m_draining = daemon.metrics.gauge("replicator_draining", "1 while drained for maintenance")
    daemon.m_link_ups = daemon.metrics.counter("replicator_link_up_total", "sessions with the peer established")
    daemon.m_link_downs = daemon.metrics.counter("replicator_link_down_total", "sessions with the peer lost")
    daemon.m_link_refusals = daemon.metrics.counter(
        "replicator_link_refused_total", "link handshakes refused by either end (wrong peer, pair, certificate)"
    )
    daemon.metrics.add_collector(daemon._collect)


class DaemonHost(Host):
    """The driver's host in the daemon: client futures, logs, metrics, the event loop."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def later(self, driver: SiteDriver, event: ev.Event) -> None:
        asyncio.get_running_loop().call_soon(driver.step, event)

    def resync_loaded(self, driver: SiteDriver, request: ev.LoadResyncBatch, loaded: ev.ResyncBatchLoaded) -> None:
        if self.daemon.resync_progress.kind == "full":
            self.daemon.resync_progress.advance(len(loaded.entries))
        self.later(driver, loaded)

    def persists_held(self, driver: SiteDriver) -> None:
        # The persists of this turn of the loop go to the store as one batch, after its last event.
        asyncio.get_running_loop().call_soon(driver.flush)

    def write_waits(self, driver: SiteDriver, persist: ev.Persist) -> None:
        if persist.urgent:
            self.daemon.committer.request_sync()  # else it rides on the next sync (GroupCommitter.wait_durable lazy)
        self.daemon.follow_durability()

    def _answer(self, handle: int, answer: Any) -> None:
        future = self.daemon.handles.pop(handle, None)
        if future is not None and not future.done():
            future.set_result(answer)

    def write_answered(self, answer: ev.AnswerWrite) -> None:
        self._answer(answer.handle, answer)

    def read_rejected(self, reject: ev.RejectRead) -> None:
        self._answer(reject.handle, reject)

    def read_served(self, handle: int, key: bytes, version: Versioned | None, error: CorruptValue | None) -> None:
        future = self.daemon.handles.pop(handle, None)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(version)
            return
        self.daemon.m_checksum.inc()
        log("corrupt_value", level="error", key=key)
        future.set_exception(errors.Corrupt(str(error)))

    def role_changed(self, change: ev.RoleChanged) -> None:
        daemon = self.daemon
        if change.new is Role.SYNC:
            daemon.witness_report_now.set()
        daemon.state_since_ms = int(time.time() * 1000)
        daemon.state_reason = change.reason
        daemon.m_role_changes.labels(change.new.name).inc()
        daemon._resync_role_changed(change.old, change.new)
        log(
            "role",
            old=change.old.name,
            new=change.new.name,
            epoch=change.epoch,
            reason=change.reason,
            mono_ns=time.monotonic_ns(),
        )

    def committed(self, commit: ev.Committed) -> None:
        if self.daemon.config.chaos.log_commits:
            log(
                "commit",
                record=str(commit.record_id),
                epoch=commit.epoch,
                role=commit.role.name,
                alone=commit.alone,
                mono_ns=time.monotonic_ns(),
            )

    def stopping(self, reason: str) -> None:
        log("stopping", level="error", reason=reason)
        self.daemon.stopped.set()

    def cleared(self, erased: int, dirty: int) -> None:
        # Say what a full resync throws away: among these are whatever this site wrote alone
        # in an epoch the peer superseded (a forced failover at the peer), lost from now on.
        log(
            "resync_cleared",
            level="warning" if erased else "info",
            keys=erased,
            dirty_keys=dirty,
            reason="full resync: this site's copy is replaced by the peer's",
        )


class SiteStateMixin:
    """Resync progress and the metrics collector of SiteDaemon, from the core's snapshot."""

    def _resync_role_changed(self, old: Role, new: Role) -> None:
        progress = self.resync_progress
        if new is Role.RESYNC_SOURCE and old is not Role.RESYNC_SOURCE:
            full = self.core.snapshot().resync_full_position
            kind = "full" if full is not None else "incremental"
            progress.begin(kind, self.core.snapshot().dirty_keys)
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
            self.resync_progress.total = max(self.resync_progress.total, count + self.core.snapshot().dirty_keys)

    def _update_resync_progress(self) -> None:
        progress = self.resync_progress
        if progress.kind == "incremental":
            progress.set_remaining(self.core.snapshot().dirty_keys)

    def _collect(self) -> None:
        view = self.core.snapshot()
        for role in Role:
            self.m_role.labels(role.name).set(1 if view.role is role else 0)
        self.m_epoch.set(view.epoch)
        self.m_dirty.set(view.dirty_keys)
        self.m_log.set(view.log_records)
        self.m_witness.set(1 if self.witness_reachable else 0)
        self.m_peer.set(1 if view.peer_connected else 0)
        self.m_resync.set(view.dirty_keys if view.role is Role.RESYNC_SOURCE else 0)
        self.m_resync_full.set(1 if view.resync_full_position is not None else 0)
        if self.link is not None:
            self.m_inflight.set(self.link.unacknowledged_bytes)
        self.m_send_queue.set(self.peer_port.send_queue.bytes)
