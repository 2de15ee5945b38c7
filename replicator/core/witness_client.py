"""Asking the witness: suspension, arbitration, and what its answers make of us.

Theory of operation. A site that loses its peer is SUSPENDED: it commits
nothing and asks the witness to go on alone (Arbitrate), after recording
durably that it asked (`asked_epoch`): a grant whose answer it does not live
to see must still be found again (a Query when back in SYNC, an Arbitrate at
restart). GRANTED(e+1) starts a takeover (`takeover.py`). DENIED fences the
site, or, when the witness says the pair went SYNC(e+1) after a resync this
site took part in but did not live to record, adopts that epoch. A site that
never met its peer (no `peer_generation`) never asks: it may be a wiped site
whose peer holds everything.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core import resync_source, takeover
from replicator.core.effects import Meta
from replicator.core.errors import ProtocolError, ProtocolErrorKind
from replicator.core.messages import Role
from replicator.core.plants import Plant
from replicator.core.standing import Standing

if TYPE_CHECKING:
    from replicator.core.site import SiteCore


def suspend(core: SiteCore, reason: str) -> None:
    core.drop_session(reason)
    core.set_role(Role.SUSPENDED, reason)
    if not core.peer_generation:
        # We never met the peer: we may be a wiped site whose peer holds
        # everything. Going on alone could lose it all, so wait for the peer.
        return
    if core.plants.on(Plant.NO_WITNESS):
        takeover.grant(core, core.epoch + 1)
        return
    arbitrate(core)


def arbitrate(core: SiteCore, *, force: bool = False, meta: Meta = ()) -> None:
    """Ask to go on alone, after recording durably that we asked."""
    if not force and core.now_ms < core.started_ms + core.config.peer_timeout_ms:
        # Just started: the peer gets a peer timeout to tell us that our disk is older than
        # what we had acknowledged (a restored copy: Goodbye ROLLED_BACK) before we may ask.
        core.witness_next_try_ms = core.started_ms + core.config.peer_timeout_ms
        return
    request = msg.Arbitrate(core.config.pair, core.config.site, core.epoch, force=force)
    if core.asked_epoch == core.epoch and not force and not meta:
        core.ask_witness(request)
        return
    core.asked_epoch = core.epoch
    persist_id = core.persist(meta=(("asked_epoch", core.epoch), *meta))
    core.witness_outstanding = request  # nothing else goes to the witness meanwhile
    core.after(persist_id, functools.partial(_ask_once_recorded, core, request))


def _ask_once_recorded(core: SiteCore, request: msg.WitnessRequest) -> None:
    if core.witness_outstanding == request:
        core.witness_outstanding = None
        core.ask_witness(request)


def on_failover_forced(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.FailoverForced)
    if core.is_target or core.grant_epoch is not None or core.session_up():
        raise ProtocolError(ProtocolErrorKind.FAILOVER_REFUSED)
    # The other site may have served writes we never saw: when it returns it
    # gets a full resync (its data cleared), not just our dirty keys.
    core.resync_full_position = b""
    arbitrate(core, force=True, meta=(("resync_full_active", 1), ("resync_full_position", b"")))


def clear_asked(core: SiteCore) -> None:
    if core.asked_epoch:
        core.asked_epoch = 0
        core.persist(meta=(("asked_epoch", 0),))


def ask_again(core: SiteCore) -> None:
    """The witness timer: repeat the question this sub-state is waiting on."""
    site, pair = core.config.site, core.config.pair
    if core.mark_synced is not None:
        core.ask_witness(msg.MarkSynced(pair, site, core.epoch))
    elif core.role in (Role.SUSPENDED, Role.FENCED) and core.grant_epoch is None and core.peer_generation:
        arbitrate(core)
    elif core.asked_epoch == core.epoch and core.grant_epoch is None and core.role in (Role.SYNC, Role.RECONCILE):
        # Back in SYNC without the answer to our Arbitrate: find out
        # whether the witness granted us the next epoch (without asking again).
        core.ask_witness(msg.Query(pair, site))
    elif core.role is Role.STARTING and core.holds_grant and core.grant_epoch is None:
        core.ask_witness(msg.Arbitrate(pair, site, core.epoch))


def on_witness_failed(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.WitnessFailed)
    if event.request != core.witness_outstanding:
        return
    core.witness_outstanding = None
    core.witness_next_try_ms = core.now_ms + core.config.witness_retry_interval_ms
    if core.witness_unreachable_since_ms is None:
        core.witness_unreachable_since_ms = core.now_ms


def on_witness_answered(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.WitnessAnswered)
    if event.request != core.witness_outstanding:
        return
    core.witness_outstanding = None
    core.witness_unreachable_since_ms = None
    core.witness_next_try_ms = core.now_ms + core.config.witness_retry_interval_ms
    answer = event.answer
    if isinstance(event.request, msg.MarkSynced):
        resync_source.on_mark_synced_answer(core, answer)
    elif isinstance(event.request, msg.Query):
        _query_answered(core, answer)
    elif answer.verdict is msg.Verdict.GRANTED:
        _granted(core, answer)
    else:
        _denied(core, answer)


def _query_answered(core: SiteCore, answer: msg.WitnessAnswer) -> None:
    granted_to_us = answer.mode is msg.WitnessMode.SOLO and answer.holder == core.config.site and answer.epoch > core.epoch
    if granted_to_us and core.role in (Role.SYNC, Role.RECONCILE):
        core.drop_session("the witness granted us an epoch we had not heard of")
        core.set_role(Role.SUSPENDED, "late grant found by query")
        takeover.grant(core, answer.epoch)
    elif not granted_to_us:
        clear_asked(core)


def _granted(core: SiteCore, answer: msg.WitnessAnswer) -> None:
    if core.role in (Role.SOLO, Role.RESYNC_SOURCE) and answer.epoch == core.epoch:
        return
    if answer.epoch == core.epoch and core.holds_grant and core.role is Role.STARTING:
        takeover.grant(core, answer.epoch)  # our grant is confirmed
    elif answer.epoch > core.epoch and core.role in (Role.SUSPENDED, Role.STARTING, Role.FENCED, Role.SYNC, Role.RECONCILE):
        if core.role in (Role.SYNC, Role.RECONCILE):
            core.drop_session("granted while connected")
            core.set_role(Role.SUSPENDED, "late grant")
        takeover.grant(core, answer.epoch)


def _denied(core: SiteCore, answer: msg.WitnessAnswer) -> None:
    """Whatever we asked before, we were not granted."""
    clear_asked(core)
    adoptable = (
        answer.mode is msg.WitnessMode.SYNC
        and answer.epoch == core.epoch + 1
        and (core.is_target or core.holds_grant)
        and core.role in (Role.STARTING, Role.SUSPENDED, Role.FENCED, Role.RESYNC_TARGET)
    )
    if adoptable:
        # The pair went SYNC(e+1) after a completed resync that we took
        # part in but did not live to record: adopt the epoch.
        # As a target, our suspect keys were resynced before MarkSynced went through.
        resolved = tuple(sorted(core.dirty)) if core.is_target else ()
        core.dirty.difference_update(resolved)
        core.epoch = answer.epoch
        core.standing = Standing.PEER
        core.persist(dirty_remove=resolved, meta=(("epoch", core.epoch), ("grant", 0), ("target", 0)))
        core.drop_session("adopted the witness's epoch")
        core.set_role(Role.SUSPENDED, "adopted the witness's SYNC epoch")
        core.witness_next_try_ms = core.now_ms  # ask again at once, in the new epoch
        return
    if core.role in (Role.SUSPENDED, Role.STARTING):
        holder = answer.holder or "-"
        takeover.fence(core, f"witness denied: {answer.mode.name} epoch {answer.epoch} holder {holder}")
