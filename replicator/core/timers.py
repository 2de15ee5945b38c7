"""The timers, run after every event: each a small function, in a fixed order.

Parked reads time out; heartbeats go out within a session; a connection
whose Hello never comes is dropped; a silent peer times out; the witness is
asked again; static priority lets the preferred site go on without the
witness; a granted site takes over once its leases ran out; the dedup table
is pruned. The order is part of the protocol (a peer timeout may grant under
a plant, and the takeover check right after acts on it in the same run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from replicator.core import messages as msg
from replicator.core import reads, takeover, witness_client
from replicator.core.messages import Role

if TYPE_CHECKING:
    from replicator.core.site import SiteCore

# Heartbeats whose answers are still awaited; older ones are forgotten (their answer grants nothing).
HEARTBEATS_REMEMBERED_MAX = 64


def run(core: SiteCore) -> None:
    if core.role is Role.STOPPED:
        return
    reads.time_out(core)
    _heartbeat(core)
    _hello_overdue(core)
    if core.now_ms - core.last_heard_ms > core.config.peer_timeout_ms:
        peer_timed_out(core)
    if core.witness_outstanding is None and core.now_ms >= core.witness_next_try_ms:
        witness_client.ask_again(core)
    _static_priority(core)
    takeover.run_timer(core)
    core.dedup_table.prune(core.wall_ms)


def _heartbeat(core: SiteCore) -> None:
    if not core.session_up() or core.now_ms < core.next_heartbeat_ms:
        return
    assert core.session is not None
    phase = core.session.resync_source
    if phase is not None and not phase.begin_sent:
        return  # the target takes a heartbeat of our new epoch before ResyncBegin for a stale peer
    core.session.heartbeat_nonce += 1
    nonce = core.session.heartbeat_nonce
    core.heartbeats_sent[nonce] = core.now_ms
    if len(core.heartbeats_sent) > HEARTBEATS_REMEMBERED_MAX:
        del core.heartbeats_sent[min(core.heartbeats_sent)]
    core.send(msg.Heartbeat(core.epoch, nonce))
    core.next_heartbeat_ms = core.now_ms + core.config.heartbeat_interval_ms


def _hello_overdue(core: SiteCore) -> None:
    """A connection whose Hello never comes (half-open, or a peer that hangs)."""
    session = core.session
    if core.connected and session is not None and session.peer is None:
        if core.now_ms - session.started_ms > core.config.peer_timeout_ms:
            core.drop_session("no Hello from the peer")


def _static_priority(core: SiteCore) -> None:
    """The preferred site goes on without the witness once it was out of reach long enough."""
    config = core.config
    if (
        config.static_priority
        and config.site == config.preferred
        and core.role is Role.SUSPENDED
        and core.grant_epoch is None
        and core.witness_unreachable_since_ms is not None
        and core.now_ms - core.witness_unreachable_since_ms >= config.static_priority_wait_ms
    ):
        takeover.grant(core, core.epoch + 1)


def peer_timed_out(core: SiteCore) -> None:
    role = core.role
    if role in (Role.SYNC, Role.RECONCILE):
        witness_client.suspend(core, "peer timeout")
    elif role is Role.STARTING:
        core.last_heard_ms = core.now_ms  # do not re-trigger every tick
        if core.witness_outstanding is None and core.grant_epoch is None and not core.holds_grant:
            witness_client.suspend(core, "peer not heard since start-up")
    elif role is Role.RESYNC_SOURCE:
        core.last_heard_ms = core.now_ms
        core.drop_session("peer timeout during resync")
    elif role is Role.RESYNC_TARGET:
        core.last_heard_ms = core.now_ms
        core.drop_session("source timeout during resync")
    else:
        core.last_heard_ms = core.now_ms
