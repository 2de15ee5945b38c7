"""The read gate: when a site may serve a read, and the reads that wait.

A site serves reads alone in SOLO and RESYNC_SOURCE (once its takeover is
durable; while asking the witness to mark the pair synced, only with the
target connected), and in SYNC or SUSPENDED under a read lease: the peer's
heartbeat answer granted in SYNC promises it will not go on alone for
`lease_ms`, and we stop reading well before (`lease_read_ms`). A key with an
unresolved record (prepared, not yet committed or aborted here) is not read:
the read parks until the record resolves, the lease comes, or
`read_wait_ms_max` runs out. At most `parked_reads_max` reads park at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from replicator.core import events as ev
from replicator.core.errors import ReadError, invariant
from replicator.core.messages import Role
from replicator.core.plants import Plant

if TYPE_CHECKING:
    from replicator.core.site import SiteCore


@dataclass(slots=True)
class ParkedRead:
    handle: int
    key: bytes
    deadline_ms: float


class ReadGate:
    def __init__(self, parked_max: int) -> None:
        self.lease_until_ms = 0.0  # we may serve reads until then (the peer's promise, less drift)
        self.lease_granted_until_ms = 0.0  # we promised the peer not to go on alone until then
        self.parked: list[ParkedRead] = []
        self.parked_max = parked_max

    def park(self, read: ParkedRead) -> bool:
        if len(self.parked) >= self.parked_max:
            return False
        self.parked.append(read)
        return True


def can_serve(core: SiteCore, now_ms: float | None = None) -> bool:
    """Whether the site may serve reads now (at `now_ms`, by default the core's time)."""
    if core.takeover is not None:
        return False  # granted: serving waits until the takeover's commits are durable
    if core.role in (Role.SOLO, Role.RESYNC_SOURCE):
        return core.mark_synced is None or core.session_up()
    if core.role in (Role.SYNC, Role.SUSPENDED):
        now = core.now_ms if now_ms is None else now_ms
        return now < core.reads.lease_until_ms or core.plants.on(Plant.NO_READ_LEASE)
    return False


def lease_coming(core: SiteCore) -> bool:
    """SYNC with a live session but no lease yet (just joined): a read waits for it."""
    return core.role is Role.SYNC and core.session_up() and core.grant_epoch is None


def key_blocked(core: SiteCore, key: bytes) -> bool:
    return core.replication.blocked(key) and not core.plants.on(Plant.NO_READ_GATE)


def serve_now(core: SiteCore, key: bytes, now_ms: float) -> bool:
    """The rule by which `on_read` serves a read at once, at `now_ms`: the site may serve and the key
    has no unresolved record. Pure, so that a shell may ask it between two steps, at its own clock
    (never earlier than the core's), read the store and answer without a step: what it refuses
    goes through `on_read` (parked or refused there)."""
    return can_serve(core, now_ms) and not key_blocked(core, key)


def on_read(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.ReadRequested)
    if not can_serve(core) and not lease_coming(core):
        core.emit(ev.RejectRead(event.handle, ReadError.UNAVAILABLE, f"site {core.config.site} is {core.role.name}"))
        return
    if not serve_now(core, event.key, core.now_ms):
        parked = ParkedRead(event.handle, event.key, core.now_ms + core.config.read_wait_ms_max)
        if not core.reads.park(parked):
            core.emit(ev.RejectRead(event.handle, ReadError.OVERLOADED, "too many reads wait"))
        return
    core.emit(ev.ServeRead(event.handle, event.key))


def wake(core: SiteCore) -> None:
    """Serve, refuse or keep each parked read, now that something changed."""
    gate = core.reads
    if not gate.parked:
        return
    keep = []
    for parked in gate.parked:
        if not can_serve(core) and lease_coming(core):
            keep.append(parked)  # SYNC with the peer, the next heartbeat answer brings the lease
        elif not can_serve(core):
            core.emit(ev.RejectRead(parked.handle, ReadError.UNAVAILABLE, f"site is {core.role.name}"))
        elif key_blocked(core, parked.key):
            keep.append(parked)
        else:
            core.emit(ev.ServeRead(parked.handle, parked.key))
    gate.parked = keep


def time_out(core: SiteCore) -> None:
    gate = core.reads
    if not gate.parked:
        return
    keep = []
    for parked in gate.parked:
        if core.now_ms >= parked.deadline_ms:
            core.emit(ev.RejectRead(parked.handle, ReadError.TIMEOUT, "key has an unresolved write"))
        else:
            keep.append(parked)
    gate.parked = keep
    invariant(len(gate.parked) <= gate.parked_max, "more parked reads than parked_reads_max")
