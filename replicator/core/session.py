"""The session with the peer: a connection, its Hello exchange, heartbeats and Goodbyes.

Theory of operation. Each new connection starts a `Session`; nothing of it
outlives the connection. Both sides send a Hello (epoch, role, incarnation,
generation, clock high-water) and the peer's Hello decides what the session
is for (`on_hello`): a same-epoch RECONCILE, a resync with us as SOURCE or
TARGET, or nothing (it is dropped, and the role says why). Within a session
each side heartbeats; an answer granted in SYNC is a read lease. The
sequence fields check the peer's cumulative messages (records, acks,
watermarks, confirms): each covers only what arrived in this session.
A session that ends takes its phase with it (`session_lost`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core import reads, reconcile, resync_source, takeover, witness_client
from replicator.core.errors import RemoteErrorKind
from replicator.core.messages import Role
from replicator.core.plants import Plant
from replicator.core.replication import check_epoch

if TYPE_CHECKING:
    from replicator.core.site import SiteCore


@dataclass(slots=True)
class Session:
    """What we know about the current connection; gone with it."""

    started_ms: float = 0.0
    peer: msg.Hello | None = None
    reconcile: reconcile.Reconcile | None = None  # while this session reconciles
    resync_source: resync_source.ResyncSource | None = None  # while we resync the peer in it
    heartbeat_nonce: int = 0
    # Sequence checks of the cumulative messages (see replication.take_in_sequence). The peer's
    # records (of the incarnation in its Hello) must arrive with exactly these seqs, from the seq its
    # ReconcileDone / ResyncBegin / ResyncBeginAck announced; None until announced.
    peer_next_seq: int | None = None
    shipped_last_seq: int = 0  # the highest own seq shipped in this session
    watermark_sent_seq: int = 0  # the highest own seq this session's CommitWatermark covered
    acked_last_seq: int = 0  # the highest PreparedAck the peer sent in this session


def session_lost(core: SiteCore) -> None:
    """Whatever ended the session, some roles cannot go on without one."""
    if core.role is Role.RECONCILE:
        fallback = Role.SUSPENDED if core.reads.lease_until_ms > core.now_ms else Role.STARTING
        core.set_role(fallback, "link lost in reconcile")
    elif core.role is Role.RESYNC_SOURCE and core.mark_synced is None:
        resync_source.lost_peer(core)


def on_connected(core: SiteCore, event: ev.Event) -> None:
    core.connected = True
    core.session = Session(started_ms=core.now_ms)
    core.send(hello_of(core))


def on_disconnected(core: SiteCore, event: ev.Event) -> None:
    core.connected = False
    core.end_session()


def hello_of(core: SiteCore) -> msg.Hello:
    return msg.Hello(
        epoch=core.epoch,
        site=core.config.site,
        pair=core.config.pair,
        role=core.role,
        incarnation=core.incarnation,
        generation=core.generation,
        synced_epoch=core.synced_epoch,
        clock_high=core.hlc.high_water,
    )


def rolled_back(core: SiteCore, hello: msg.Hello) -> bool:
    """The peer's disk is older than what it had acknowledged to us (restored from a copy)."""
    if hello.clock_high is None or core.plants.on(Plant.SKIP_ROLLBACK_CHECK):
        return False
    return hello.generation == core.peer_generation and hello.clock_high < core.peer_clock_floor


def need_full_resync(core: SiteCore) -> None:
    """The peer lost data it had: when we resync it next, it is a full resync."""
    if core.resync_full_position is None:
        core.resync_full_position = b""
        core.persist(meta=(("resync_full_active", 1), ("resync_full_position", b"")))


def on_hello(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.Hello)
    hello = event.message
    session = core.session
    if session is None or session.peer is not None:
        core.protocol_violation(RemoteErrorKind.UNEXPECTED_HELLO, "unexpected Hello")
        return
    if hello.pair != core.config.pair or hello.site != core.config.peer:
        core.send(msg.Goodbye(core.epoch, msg.GoodbyeReason.NOT_PEER, f"expected {core.config.peer}"))
        core.drop_session(f"hello from {hello.site!r} of pair {hello.pair!r}")
        return
    session.peer = hello
    if core.grant_epoch is not None:
        core.drop_session("taking over: not now")
        return
    wiped = bool(core.peer_generation) and hello.generation != core.peer_generation
    peer_rolled_back = rolled_back(core, hello)
    peer_holds = hello.role in (Role.SOLO, Role.RESYNC_SOURCE)
    # We are the source: we hold a confirmed grant and the peer is behind or our target.
    source = core.role in (Role.SOLO, Role.RESYNC_SOURCE) and core.mark_synced is None
    if source and (hello.epoch < core.epoch or (hello.epoch == core.epoch and not peer_holds)):
        core.last_heard_ms = core.now_ms
        full = wiped or peer_rolled_back or not core.peer_generation or core.resync_full_position is not None
        resync_source.begin(core, full=full, rolled_back=peer_rolled_back)
        return
    if hello.epoch > core.epoch or (hello.epoch == core.epoch and peer_holds and not core.holds_grant):
        # The peer is ahead (or holds this epoch's grant): we wait for its ResyncBegin.
        if core.role not in (Role.FENCED, Role.RESYNC_TARGET, Role.STARTING):
            takeover.fence(core, "peer is in a newer epoch")
        return
    if peer_rolled_back:
        _refuse_rolled_back(core, hello)
        return
    if hello.epoch < core.epoch:
        _meet_older(core, hello)
        return
    # Same epoch, nobody holds a grant.
    busy = core.grant_epoch is not None or core.holds_grant or core.is_target
    if wiped or busy or hello.role is Role.RESYNC_TARGET:
        core.drop_session("cannot reconcile now")
        return
    if core.role is Role.FENCED:
        core.drop_session("fenced: waiting for the witness")
        return
    if hello.role is Role.FENCED:
        # The peer was refused by the witness, or waits for it: the witness has moved past this
        # epoch, maybe to a grant of ours that we never learnt of (we crashed before its answer came:
        # simulator seed 54982), and the peer will not reconcile. Reconciling again and again kept us
        # hearing it, so we never asked: only the witness can say who goes on.
        if core.role is Role.SUSPENDED:
            core.drop_session("peer is fenced: waiting for the witness")
        else:
            witness_client.suspend(core, "peer is fenced: asking the witness")
        return
    reconcile.begin(core)


def _refuse_rolled_back(core: SiteCore, hello: msg.Hello) -> None:
    """It lost writes that we committed: no reconcile, and no going on alone for it (it may not
    know it lost them); we resync it in full once we hold the witness's grant."""
    need_full_resync(core)
    core.send(
        msg.Goodbye(
            core.epoch,
            msg.GoodbyeReason.ROLLED_BACK,
            "your data is older than what you had acknowledged (restored from a copy?): wait for a full resync",
        )
    )
    core.drop_session(
        f"peer's data is older than what it had acknowledged (clock {hello.clock_high} < "
        f"{core.peer_clock_floor}; restored from a copy?): it needs a full resync"
    )


def _meet_older(core: SiteCore, hello: msg.Hello) -> None:
    if (
        core.role in (Role.SYNC, Role.SUSPENDED, Role.STARTING)
        and core.grant_epoch is None
        and hello.role is Role.RESYNC_TARGET
        and hello.epoch == core.epoch - 1
        and core.synced_epoch == core.epoch
        and hello.generation == core.peer_generation
    ):
        # Our ResyncSynced was lost with the connection: say it again, then reconcile.
        core.send(msg.ResyncSynced(core.epoch))
        reconcile.begin(core)
        return
    core.send(msg.Goodbye(core.epoch, msg.GoodbyeReason.STALE_EPOCH, "you are behind: wait for resync"))
    core.drop_session("peer in an older epoch")


def on_goodbye(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.Goodbye)
    goodbye = event.message
    if goodbye.reason is msg.GoodbyeReason.STALE_EPOCH and goodbye.epoch > core.epoch:
        if core.role in (Role.SYNC, Role.SUSPENDED, Role.RECONCILE, Role.STARTING):
            takeover.fence(core, "peer says we are behind")
    if goodbye.reason is msg.GoodbyeReason.ROLLED_BACK and core.role is not Role.RESYNC_TARGET:
        # Our disk lost what the peer knows we had. Forgetting the peer's generation makes us
        # wait for it like a wiped site (never ask to go on alone) until it resyncs us.
        if core.peer_generation:
            core.peer_generation = b""
            core.persist(meta=(("peer_generation", b""),))
        if core.role in (Role.SYNC, Role.SUSPENDED, Role.RECONCILE, Role.STARTING):
            takeover.fence(core, "peer says our data is older than we had acknowledged: waiting for a full resync")
    core.drop_session(f"goodbye from peer: {goodbye.reason.name} {goodbye.message}")


def on_heartbeat(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.Heartbeat)
    beat = event.message
    if not core.session_up() or not check_epoch(core, beat.epoch):
        return
    grant = core.role is Role.SYNC and core.grant_epoch is None
    if grant:
        core.reads.lease_granted_until_ms = max(core.reads.lease_granted_until_ms, core.now_ms + core.config.lease_ms)
    core.send(msg.HeartbeatAck(core.epoch, beat.nonce, grant))


def on_heartbeat_ack(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.HeartbeatAck)
    ack = event.message
    if not core.session_up() or not check_epoch(core, ack.epoch):
        return
    sent = core.heartbeats_sent.pop(ack.nonce, None)
    if sent is None:
        return
    core.last_heard_ms = core.now_ms
    if ack.lease_granted and core.role is Role.SYNC:
        core.reads.lease_until_ms = max(core.reads.lease_until_ms, sent + core.config.lease_read_ms)
        reads.wake(core)
