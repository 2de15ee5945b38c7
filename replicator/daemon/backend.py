"""The site's gRPC backend (replicator/api/backend.py's SiteBackend): clients' writes, reads
and scans go to the core through the driver; status and metrics come from the core's frozen
snapshot (`SiteCore.snapshot`); the operator's calls (drain, switchover, failover, verify).

A mixin of `SiteDaemon` (replicator/daemon/site.py), which assembles the parts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from replicator import __version__
from replicator.api import errors
from replicator.api.backend import RangeEntry, SiteStatus, VerifyReport, WriteResult
from replicator.core import events as ev
from replicator.core import reads
from replicator.core.messages import Role
from replicator.core.records import Operation, Versioned
from replicator.daemon.bounded import Overloaded
from replicator.daemon.logs import log
from replicator.storage.errors import CorruptValue, StorageFailed


class SiteBackendMixin:
    """The SiteBackend methods of SiteDaemon (its attributes are the daemon's)."""

    # ------------------------------------------------------------ serving
    def _readiness(self) -> tuple[bool, str]:
        """GET /readyz: ready while the site serves clients (a load balancer's check), with why not."""
        from replicator.api.backend import health_of

        status = self.status()
        level, reasons = health_of(status)
        text = f"{level} {status.site} {status.state} epoch {status.epoch}"
        return status.serving, text + "".join(f"\n{reason}" for reason in reasons)

    def _check_room(self, write: bool) -> None:
        try:
            self.handles.check_room()
            if write:
                self.peer_port.send_queue.check_room()  # writes are what fill it: back-pressure toward them
        except Overloaded as error:
            (self.m_writes if write else self.m_reads).labels("overloaded").inc()
            raise errors.Unavailable(str(error), self.config.site.peer_grpc_address) from None

    def _handle(self, write: bool) -> tuple[int, asyncio.Future[Any]]:
        self._check_room(write)
        handle = self.next_handle
        self.next_handle += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.handles[handle] = future
        return handle, future

    def _unavailable(self, what: str) -> errors.Unavailable:
        # The servicer adds "site 'a' cannot serve (...); try site 'b' at ADDRESS": say only why here.
        role = self.core.role.name
        why = f"{what} refused while {role}"
        if role == "SYNC" and not self.core.snapshot().peer_connected:
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
        self._check_room(write=False)  # an overloaded site refuses even what it could serve at once
        if not self.driver.closed and reads.serve_now(self.core, key, self.mono_ms()):
            # What the core would serve at once is read here, in this call: no step, handle or future
            # (the same store read the driver does for ServeRead). A corrupt value or a failed store
            # takes the core's way below, which reports it.
            try:
                self.driver.flush()  # what this turn persisted so far is in the store first
                version = self.store.get(key)
            except (CorruptValue, StorageFailed):
                pass
            else:
                return self._read_served(version, started)
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
        return self._read_served(result, started)

    def _read_served(self, version: Versioned | None, started: float) -> Versioned | None:
        """Count a served read (at once or through the core) and its latency."""
        self.m_reads.labels("ok").inc()
        self.m_read_latency.observe(time.perf_counter() - started)
        return version

    async def scan(self, start: bytes, end: bytes | None, limit: int, timeout_s: float) -> list[Versioned]:
        # Linearizable per key: every key of the range is read through the core. The reads are issued
        # together: a key with nothing pending is served at once, so a page costs a few turns of the
        # event loop instead of one per key (a range full of tombstones, as S3 buckets leave, stays cheap).
        self.driver.flush()  # what this turn persisted so far is in the store first
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
        view = self.core.snapshot()
        progress = self.resync_progress
        self._update_resync_progress()
        role = ""
        if view.role in (Role.SOLO, Role.RESYNC_SOURCE):
            role = "source"
        elif view.role is Role.RESYNC_TARGET:
            role = "target"
        return SiteStatus(
            site=self.name,
            peer=self.peer,
            state=view.role.name,
            epoch=view.epoch,
            pair=self.config.site.pair_id,
            role=role,
            peer_reachable=view.peer_connected,
            witness_reachable=self.witness_reachable,
            lag_records=view.log_records,
            dirty_keys=view.dirty_keys,
            resync_progress=(progress.done, progress.total) if progress.kind != "target" else (0, 0),
            preferred=self.config.site.preferred_site,
            peer_address=self.config.site.peer_grpc_address,
            details={
                "incarnation": str(view.incarnation),
                "pending_writes": str(view.pending_writes),
                "tie_break_site": view.tie_break_site,
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
        if core.snapshot().peer_connected:
            raise errors.Refused(f"forced failover refused: the peer site {self.peer} is reachable")
        if core.snapshot().is_target:
            raise errors.Refused(
                f"forced failover refused: site {self.name} was being resynchronised and lacks data; "
                f"bring site {self.peer} back instead"
            )
        log("failover_forced", level="warning", site=self.name, epoch=core.epoch)
        self.step(ev.FailoverForced())
        deadline = time.monotonic() + (self.config.site.lease_ms + 3 * self.config.witness.timeout_ms) / 1000 + 2
        while time.monotonic() < deadline:
            if core.role is Role.SOLO and not core.snapshot().takeover_pending:
                return
            await asyncio.sleep(0.05)
        raise errors.Refused(
            f"forced failover did not complete: site {self.name} is {core.role.name} (is the witness "
            f"reachable? a forced failover needs its grant: it is never taken without the witness)"
        )

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
