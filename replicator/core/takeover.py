"""Takeover: a site granted the next epoch goes on alone.

Theory of operation. The witness granted us epoch e+1 (or static priority
did, with the witness out of reach). Before serving alone we wait until every
read lease we granted the peer has run out (`lease_granted_until_ms`): until
then the peer may still serve reads of the old state. Then, in one persist, we
record the new epoch and our grant, commit every record of the log (either
origin: each may have been committed by its origin, and none was ever aborted),
and mark their keys dirty for the resync to come. The role is SOLO from that
moment, but reads and writes wait until the persist is durable. The phase
object exists from the grant until then:

- WAITING_LEASES: granted, `persist_id` is None;
- COMMITTING: the whole-log commit is issued, `persist_id` names it.

A fence while WAITING_LEASES ends the takeover; while COMMITTING the commit is
already on its way, so the phase only loses its grant (`granted_epoch` None)
and still blocks serving until the commit is durable. Invariant: after a
takeover the log holds nothing unresolved (only alone writes may block keys).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from replicator.core import reads, replication
from replicator.core.errors import WriteError, invariant
from replicator.core.messages import Role
from replicator.core.plants import Plant
from replicator.core.standing import Standing

if TYPE_CHECKING:
    from replicator.core.site import SiteCore


class TakeoverStage(enum.Enum):
    WAITING_LEASES = "granted, waiting out the leases granted to the peer"
    COMMITTING = "committing the whole log in the new epoch, serving waits until it is durable"


@dataclass(slots=True)
class Takeover:
    epoch: int
    persist_id: int | None = None
    granted: bool = True  # False once fenced while COMMITTING

    @property
    def stage(self) -> TakeoverStage:
        return TakeoverStage.WAITING_LEASES if self.persist_id is None else TakeoverStage.COMMITTING

    @property
    def granted_epoch(self) -> int | None:
        return self.epoch if self.granted else None


def grant(core: SiteCore, epoch: int) -> None:
    """The witness (or static priority) granted us `epoch`: wait out the leases, then take over."""
    if core.takeover is not None and core.takeover.persist_id is not None:
        # Granted again while the last takeover's commit is on its way (fenced meanwhile): that
        # commit's end forgets the grant too, as the grant it replaces.
        core.takeover.epoch, core.takeover.granted = epoch, True
        return
    core.takeover = Takeover(epoch)


def run_timer(core: SiteCore) -> None:
    """Take over once the leases we granted have run out."""
    takeover = core.takeover
    if takeover is None or not takeover.granted or takeover.persist_id is not None:
        return
    if core.now_ms >= core.reads.lease_granted_until_ms or core.plants.on(Plant.NO_LEASE_WAIT):
        take_over(core, takeover)


def take_over(core: SiteCore, takeover: Takeover) -> None:
    """Granted and the leases are out: commit the whole log and go on alone."""
    core.drop_session("taking over")
    records = core.replication.sorted_records()
    epoch = takeover.epoch
    core.epoch = epoch
    core.standing = Standing.GRANT_HOLDER
    core.persist(meta=(("epoch", epoch), ("grant", 1), ("target", 0)))
    # SOLO from here on, but serving waits (the takeover stays) until the commits below are durable.
    core.set_role(Role.SOLO, f"granted epoch {epoch}")
    persist_id = replication.commit_whole_log(core, records, alone=True, mark_dirty=True)
    takeover.persist_id = persist_id
    invariant(not core.replication.records, "the log holds records after a takeover")
    invariant(
        all(pending.alone for pending in core.replication.pending.values()),
        "a write shipped to the peer is unresolved after a takeover",
    )
    core.after(persist_id, functools.partial(_finish, core))


def _finish(core: SiteCore) -> None:
    core.takeover = None
    reads.wake(core)


def fence(core: SiteCore, reason: str) -> None:
    core.set_role(Role.FENCED, reason)
    core.reads.lease_until_ms = 0.0
    if core.takeover is not None:
        if core.takeover.persist_id is None:
            core.takeover = None
        else:
            core.takeover.granted = False
    # Own writes in flight: the peer may commit them, or not.
    for pending in list(core.replication.pending.values()):
        if pending.alone:
            continue
        for handle in pending.handles:
            core.reject_write(handle, WriteError.UNKNOWN, "outcome unknown: this site was fenced")
        pending.handles = []
    reads.wake(core)
