"""A deterministic world for the real protocol cores.

Two site cores, the witness core and a few client processes run in one thread
on a simulated clock. Everything random comes from one `random.Random(seed)`,
so a seed replays exactly. The world simulates:

- the network: per-direction link state (up, black hole), delays, connection
  resets; messages on one connection arrive in order (as TCP: a black hole
  holds back the whole queue of a direction, and what is sent behind it waits
  its turn); a message is delivered only while its connection is still open
  at the receiver. `SimParams.reorder_within_connection` breaks that order on
  purpose (each held message on its own retransmit timer, as the simulator
  wrongly did before seed 61196 was found), only to show that the cores refuse
  out-of-order records (docs/chaos.md, "Seed 61196");
- disks: each site runs the real store (`BaseStore` on the memory engine,
  chaos/sim/disk.py) through the daemon's driver (replicator/driver.py): a
  persist is visible at once and durable after a simulated fsync; durability
  is in order; a crash loses what was not durable; fsync can fail and the disk
  can be full (fail-stop);
- the wire: every peer message goes through the daemon's encoder, the frame
  codec and the daemon's decoder (replicator/daemon/wire.py), within the
  link's frame limit;
- the witness: the real witness core; in a quarter of the seeds the pair is
  not declared to it and it learns the pair from the sites' requests;
- clocks: each site's monotonic clock runs at its own rate (bounded drift),
  its wall clock can jump; a site can be paused (SIGSTOP) for longer than a
  lease, in which case everything sent to it waits in its socket buffers;
- processes: crash and restart of either site, of both, of the witness; a
  site's data directory wiped before it returns.

A run has a safety phase (random faults) and a liveness phase (everything
healed: the pair must be back in SYNC, idle and identical within a bound).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.checkers.history import History
from chaos.sim.disk import SimDisk
from replicator import framing
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.config import FRAME_SIZE_BYTES_DEFAULT, MESSAGE_HEADROOM_BYTES, CoreConfig
from replicator.core.messages import Role
from replicator.core.records import (
    OPERATION_OVERHEAD_BYTES,
    RECORD_OVERHEAD_BYTES,
    Operation,
    Versioned,
)
from replicator.core.site import SiteCore
from replicator.core.witness import (
    PairConfig,
    PairLearned,
    PairNotLearned,
    PairState,
    SiteSeen,
    WitnessCore,
    WitnessPersist,
    WitnessPersisted,
    WitnessReply,
    WitnessRequested,
    WitnessTick,
)
from replicator.daemon.wire import Decoder, Encoder
from replicator.driver import SHELL_PLANTS, Host, SiteDriver, recover, shell_plants_of
from replicator.storage.errors import StorageFailed

MS = 1000  # the world's time unit is the microsecond
SITES = ("a", "b")
PAIR = "pair-1"


def other(site: str) -> str:
    return "b" if site == "a" else "a"


@dataclass
class SimParams:
    safety_ms: int = 12_000
    liveness_ms: int = 30_000
    clients: int = 4
    keys: int = 12
    faults: bool = True
    fault_interval_ms: tuple[int, int] = (300, 2500)
    net_delay_us: tuple[int, int] = (50, 1500)
    fsync_us: tuple[int, int] = (100, 3000)
    # A persist no acknowledgement waits for (Persist.urgent False) starts no sync: it rides on the
    # next one, started at the latest this long after it (the daemon's GroupCommitter lazy delay,
    # 10 ms). None: every persist starts its sync (the schedules of seeds found before).
    lazy_sync_us: tuple[int, int] | None = (1000, 10_000)
    tick_ms: int = 10
    client_timeout_ms: int = 3000
    lease_ms: int = 1000
    peer_timeout_ms: int = 500
    heartbeat_interval_ms: int = 100
    preferred_grace_ms: int = 300
    clock_drift: float = 0.004
    plants: frozenset[str] = frozenset()
    # A fault no TCP connection makes: messages held by a black hole overtake each other.
    reorder_within_connection: bool = False
    # The cores' byte bound, small so that the workload's sizes make every cut by bytes happen:
    # reconcile shipments, resync batches, dedup entries and suspect keys.
    message_bytes_max: int = 800  # SMALL_VALUES below: the link's own bound, no large values
    # The clients' limits, scaled to the cores' bound as the daemon's api.object_bytes_max,
    # batch_bytes_max and batch_items_max are to its frame: the largest write a client may make
    # is one record that fits in one message (World checks it), and the workload goes up to them.
    object_bytes_max: int = 600  # the longest value
    batch_items_max: int = 8  # the most keys in one atomic write
    batch_bytes_max: int = 540  # keys and values of one batch
    large_value_fraction: float = 0.1  # writes with a value of up to object_bytes_max
    batch_fraction: float = 0.05  # writes of 2 to batch_items_max keys, up to batch_bytes_max
    # Of the large values and batches, those made exactly at their limit (bounds break at the edge).
    at_limit_fraction: float = 0.25
    # Fault kinds and their weights (None: every kind of chaos.sim.run.FAULTS, equally likely).
    fault_weights: tuple[tuple[str, float], ...] | None = None
    # Retry a write whose outcome is unknown with the same request id (at the
    # same site after a timeout, at the other site when this one is gone).
    retry_unknown_writes: bool = True
    # Of the seeds, those whose witness is not told the pair and learns it from the sites' requests.
    witness_learns_pair_fraction: float = 0.25


# The workload before sizes were simulated: tiny values, single-key writes, the link's own byte
# bound (the schedules of seeds run before, and of those the tests pin, replay with it).
SMALL_VALUES: dict[str, Any] = {
    "large_value_fraction": 0.0,
    "batch_fraction": 0.0,
    "message_bytes_max": FRAME_SIZE_BYTES_DEFAULT - MESSAGE_HEADROOM_BYTES,
}


KEY_BYTES_MAX = 4  # the workload's keys: k0 .. k<keys-1>
REQUEST_ID_BYTES_MAX = 16  # c<client>-<count>


def largest_write_bytes(params: SimParams) -> int:
    """The largest record a client of the workload can make (as the link encodes it)."""
    single = OPERATION_OVERHEAD_BYTES + KEY_BYTES_MAX + params.object_bytes_max
    batch = params.batch_items_max * OPERATION_OVERHEAD_BYTES + params.batch_bytes_max
    return RECORD_OVERHEAD_BYTES + len("a") + REQUEST_ID_BYTES_MAX + max(single, batch)


# ===================================================================== the world


@dataclass
class Connection:
    id: int
    open_at: dict[str, bool]
    last_delivery_us: dict[str, int]
    # By sender: messages held back by a black hole, in the order they were sent.
    held: dict[str, list[msg.PeerMessage]] = field(default_factory=lambda: {site: [] for site in SITES})
    # By sender: how many messages were sent / delivered on this connection (the order check).
    sent: dict[str, int] = field(default_factory=lambda: {site: 0 for site in SITES})
    delivered: dict[str, int] = field(default_factory=lambda: {site: 0 for site in SITES})
    # By sender: the daemon's encoder at the sender and decoder at the receiver of this connection.
    wire: dict[str, tuple[Encoder, Decoder]] = field(default_factory=dict)

    def round_trip(self, sender: str, message: msg.PeerMessage, frame_bytes_max: int) -> list[msg.PeerMessage]:
        """`message` as the peer's core gets it: made into frames by the daemon's encoder (within
        the link's frame limit), each frame's bytes decoded by the framing codec and the daemon's
        decoder (frames the core does not see, such as a reconcile's start, give nothing)."""
        codec = self.wire.get(sender)
        if codec is None:
            codec = self.wire[sender] = (Encoder(sender, frame_bytes_max=frame_bytes_max), Decoder(PAIR, sender))
        encoder, decoder = codec
        out = []
        for frame in encoder.encode(message):
            decoded = decoder.decode(framing.decode_frame(frame))  # the views keep the fresh frame alive
            if decoded is not None:
                out.append(decoded)
        return out


class SiteProcess(Host):
    """One site's process: its core driven by the one SiteDriver over the simulated disk, and the
    world's network, witness and clock as the driver's ports."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.disk = SimDisk()
        self.core: SiteCore | None = None
        self.driver: SiteDriver | None = None
        self.alive = False
        self.paused_until_us = 0
        self.deferred: list[Callable[[], None]] = []
        self.incarnation = 0  # process incarnation (for stale callbacks)
        self.rate = 1.0
        self.wall_offset_ms = 0
        self.connection: Connection | None = None
        self.handles: dict[int, Callable[[Any], None]] = {}
        self.sync_scheduled = False
        self.lazy_sync_pending = False
        self.stop_reason = ""

    # clocks (the driver's Clock port)
    def mono_ms(self) -> float:
        return self.world.now_us * self.rate / MS

    def wall_ms(self) -> int:
        return int(self.world.now_us / MS) + 1_700_000_000_000 + self.wall_offset_ms

    def start(self) -> None:
        world = self.world
        self.incarnation += 1
        self.alive = True
        self.stop_reason = ""
        recovered = recover(self.disk.store, lambda: world.rng.randbytes(8))
        config = CoreConfig(
            site=self.name,
            peer=other(self.name),
            pair=PAIR,
            preferred="a",
            lease_ms=world.params.lease_ms,
            peer_timeout_ms=world.params.peer_timeout_ms,
            heartbeat_interval_ms=world.params.heartbeat_interval_ms,
            clock_drift_max=0.01,
            read_wait_ms_max=1000,
            resync_batch_keys_max=3,
            message_bytes_max=world.params.message_bytes_max,
            tick_ms=world.params.tick_ms,
            plants=world.params.plants - set(SHELL_PLANTS),
        )
        self.core = SiteCore(config, recovered)
        shell_plants = shell_plants_of(world.params.plants)
        self.driver = SiteDriver(self.core, self.disk.store, self, self, self, self, plants=shell_plants)
        world.trace(f"{self.name} start incarnation={self.core.incarnation} epoch={self.core.epoch}")
        self.driver.start()
        world.site_event(self.name, Role.STARTING, self.core.epoch)

    def crash(self, reason: str) -> None:
        if not self.alive:
            return
        self.world.trace(f"{self.name} CRASH ({reason})")
        self.alive = False
        if self.core is not None:
            self.world.protocol_errors_of_dead_cores += self.core.protocol_errors
        if self.driver is not None:
            self.driver.close()
        self.core = None
        self.driver = None
        self.incarnation += 1
        self.disk.crash()
        self.deferred.clear()
        self.paused_until_us = 0
        self.sync_scheduled = False
        self.lazy_sync_pending = False
        self.world.close_connection(self, notify_self=False)
        for handle, callback in list(self.handles.items()):
            del self.handles[handle]
            self.world.after(self.world.delay(), lambda cb=callback, h=handle: cb(ev.AnswerWrite(h, False, error="unknown")))
        self.world.site_event(self.name, Role.STOPPED, -1)

    @property
    def unsynced(self) -> bool:
        """Whether persists wait for a sync."""
        return self.driver is not None and bool(self.driver.unsynced)

    # delivering events to the core
    def deliver(self, make_event: Callable[[], ev.Event | None]) -> None:
        if not self.alive:
            return
        if self.world.now_us < self.paused_until_us:
            self.deferred.append(lambda: self.deliver(make_event))
            return
        event = make_event()
        if event is None or self.driver is None:
            return
        self.driver.step(event)

    def _when_running(self, callback: Callable[[SiteDriver], None]) -> None:
        """Run `callback` with the driver now, or once the process is resumed (SIGSTOP)."""
        if not self.alive:
            return
        if self.world.now_us < self.paused_until_us:
            self.deferred.append(lambda: self._when_running(callback))
            return
        if self.driver is not None:
            callback(self.driver)

    def resume(self) -> None:
        deferred, self.deferred = self.deferred, []
        for callback in deferred:
            callback()

    # ---------------------------------------------------------- the driver's ports
    def send(self, message: msg.PeerMessage) -> None:
        self.world.send_peer(self, message)

    def drop(self, reason: str) -> None:
        self.world.trace(f"{self.name} drops the connection: {reason}")
        self.world.close_connection(self, notify_self=False)

    def ask(self, request: msg.WitnessRequest) -> None:
        self.world.ask_witness(self, request)

    def later(self, driver: SiteDriver, event: ev.Event) -> None:
        self.world.after(0, self._guarded(lambda: self.deliver(lambda: event)))

    def write_waits(self, driver: SiteDriver, persist: ev.Persist) -> None:
        lazy = self.world.params.lazy_sync_us
        if persist.urgent or lazy is None:
            self._schedule_sync()
        else:
            self._schedule_lazy_sync(lazy)

    def write_answered(self, answer: ev.AnswerWrite) -> None:
        self._answer(answer.handle, answer)

    def read_rejected(self, reject: ev.RejectRead) -> None:
        self._answer(reject.handle, reject)

    def _answer(self, handle: int, answer: Any) -> None:
        callback = self.handles.pop(handle, None)
        if callback is not None:
            self.world.after(self.world.delay(), lambda: callback(answer))

    def read_served(self, handle: int, key: bytes, version: Versioned | None, error: Exception | None) -> None:
        assert error is None, f"simulated disk: {error}"
        self._answer(handle, ("read", version.value if version is not None else None))

    def role_changed(self, change: ev.RoleChanged) -> None:
        self.world.trace(f"{self.name} {change.old.name} -> {change.new.name} epoch={change.epoch}: {change.reason}")
        self.world.site_event(self.name, change.new, change.epoch)

    def committed(self, commit: ev.Committed) -> None:
        self.world.commit_event(self.name, commit)

    def stopping(self, reason: str) -> None:
        self.stop_reason = reason
        self.world.trace(f"{self.name} STOP: {reason}")
        self.crash(reason)

    def _schedule_sync(self) -> None:
        if self.sync_scheduled:
            return
        self.sync_scheduled = True
        incarnation = self.incarnation

        def done() -> None:
            if self.incarnation != incarnation or not self.alive:
                return
            self.sync_scheduled = False
            try:
                durable = self.disk.sync()
            except StorageFailed as error:
                reason = str(error)
                self._when_running(lambda driver: driver.sync_failed(reason))
                return
            self._when_running(lambda driver: driver.durable(durable))
            if self.unsynced:
                self._schedule_sync()

        self.world.after(self.world.rng.randint(*self.world.params.fsync_us), done)

    def _schedule_lazy_sync(self, lazy_us: tuple[int, int]) -> None:
        """A sync for the persists nothing waits on, unless one is on its way already."""
        if self.sync_scheduled or self.lazy_sync_pending:
            return
        self.lazy_sync_pending = True
        incarnation = self.incarnation

        def due() -> None:
            if self.incarnation != incarnation or not self.alive:
                return
            self.lazy_sync_pending = False
            if self.unsynced:
                self._schedule_sync()

        self.world.after(self.world.rng.randint(*lazy_us), due)

    def resync_loaded(self, driver: SiteDriver, request: ev.LoadResyncBatch, loaded: ev.ResyncBatchLoaded) -> None:
        # A real site sends only what fits in one link frame (the driver cut it to the core's byte
        # bound), and sometimes shorter still: any prefix of at least one entry is valid.
        entries, next_position = loaded.entries, loaded.next_position
        if len(entries) > 1 and self.world.resync_rng.random() < 0.3:
            entries = entries[: self.world.resync_rng.randint(1, len(entries) - 1)]
            if not request.keys:
                next_position = entries[-1].key + b"\x00"
        event = ev.ResyncBatchLoaded(loaded.token, entries, next_position)
        self.world.after(
            self.world.rng.randint(100, 1000),
            self._guarded(lambda: self.deliver(lambda: event)),
        )

    def _guarded(self, callback: Callable[[], None]) -> Callable[[], None]:
        incarnation = self.incarnation

        def run() -> None:
            if self.incarnation == incarnation and self.alive:
                callback()

        return run


class WitnessProcess:
    """The witness: its core, its disk (states durable after a simulated fsync) and, when `learns`,
    the pair not declared but learned from the sites' requests (SiteSeen), as the witness daemon
    does for a pair missing from its configuration: no preferred site, first come first served."""

    def __init__(self, world: World, grace_ms: int, learns: bool = False) -> None:
        self.world = world
        self.learns = learns
        self.durable: dict[str, PairState] = {}
        self.durable_sites: dict[str, tuple[str, ...]] = {}  # of learned pairs, stored with their state
        declared = {PAIR: PairConfig(sites=("a", "b"), preferred="a", preferred_grace_ms=grace_ms)}
        self.config = {} if learns else declared
        self.core: WitnessCore | None = None
        self.alive = False
        self.incarnation = 0
        self.callbacks: dict[int, Callable[[msg.WitnessAnswer], None]] = {}
        self.next_handle = 1
        self.unsynced: list[WitnessPersist] = []

    def start(self) -> None:
        self.alive = True
        self.incarnation += 1
        self.core = WitnessCore(
            self.config, dict(self.durable), learned=dict(self.durable_sites), learned_pairs_max=1 if self.learns else 0
        )
        self.world.trace(f"witness start {self.durable.get(PAIR)}" + (" (learning the pair)" if self.learns else ""))

    def crash(self) -> None:
        if not self.alive:
            return
        self.world.trace("witness CRASH")
        self.alive = False
        self.core = None
        self.unsynced.clear()
        self.callbacks.clear()
        self.incarnation += 1

    def request(self, request: msg.WitnessRequest, reply: Callable[[msg.WitnessAnswer], None]) -> None:
        if not self.alive or self.core is None:
            return
        if self.learns:
            if isinstance(request, msg.Query) and request.pair not in self.core.pairs:
                # The daemon's status of a pair it does not know: SYNC in the first epoch.
                reply(msg.WitnessAnswer(msg.Verdict.STATE, 1, msg.WitnessMode.SYNC, ""))
                return
            if isinstance(request, msg.Arbitrate | msg.MarkSynced | msg.SetPreferred):
                self.execute(self.core.step(SiteSeen(request.pair, request.site), self.world.now_us / MS))
        handle = self.next_handle
        self.next_handle += 1
        self.callbacks[handle] = reply
        self.execute(self.core.step(WitnessRequested(handle, request), self.world.now_us / MS))

    def tick(self) -> None:
        if self.alive and self.core is not None:
            self.execute(self.core.step(WitnessTick(), self.world.now_us / MS))

    def execute(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, WitnessPersist):
                self.unsynced.append(action)
                incarnation = self.incarnation
                persist = action
                assert self.core is not None
                sites = tuple(site for site in self.core.pairs[action.pair].sites if site)

                def synced(p: WitnessPersist = persist, inc: int = incarnation, sites: tuple[str, ...] = sites) -> None:
                    if self.incarnation != inc or not self.alive or self.core is None:
                        return
                    self.durable[p.pair] = p.state
                    if self.learns:
                        self.durable_sites[p.pair] = sites
                    if p.state.mode is msg.WitnessMode.SOLO:
                        self.world.grant_event(p.state.holder, p.state.epoch)
                    self.execute(self.core.step(WitnessPersisted(p.persist_id), self.world.now_us / MS))

                self.world.after(self.world.rng.randint(*self.world.params.fsync_us), synced)
            elif isinstance(action, WitnessReply):
                callback = self.callbacks.pop(action.handle, None)
                if callback is not None:
                    callback(action.answer)
            elif isinstance(action, PairLearned | PairNotLearned):
                self.world.trace(f"witness: {action}")


class World:
    def __init__(self, seed: int, params: SimParams, verbose: bool = False) -> None:
        self.seed = seed
        self.params = params
        self.rng = random.Random(seed)
        # A stream of its own, so the schedules of older seeds stay as they were.
        self.resync_rng = random.Random(seed * 7919 + 1)
        self.size_rng = random.Random(seed * 104729 + 3)
        self.verbose = verbose
        self.now_us = 0
        self.queue: list[tuple[int, int, Callable[[], None]]] = []
        self.counter = 0
        self.lines: list[str] = []
        self.history = History()
        self.site_events: list[dict[str, Any]] = []
        self.sites = {name: SiteProcess(self, name) for name in SITES}
        # A stream of its own: whether this seed's witness learns the pair (not declared to it).
        learns = random.Random(seed * 7727 + 5).random() < params.witness_learns_pair_fraction
        self.witness = WitnessProcess(self, params.preferred_grace_ms, learns=learns)
        # link state per direction: "up" | "blackhole"
        self.links: dict[tuple[str, str], str] = {}
        self.next_connection_id = 1
        self.faults_injected: dict[str, int] = {}
        # Armed by a fault: runs once when some site next enters the role (a crash mid-reconcile...).
        self.role_triggers: dict[Role, Callable[[str], None]] = {}
        # Armed by a fault: runs once right after a site takes a message of this type.
        self.message_triggers: dict[type, Callable[[SiteProcess], None]] = {}
        self.sync_violations: list[str] = []
        self.protocol_errors_of_dead_cores = 0
        self.reordered_deliveries = 0  # messages that arrived after a later one on their connection
        self.acknowledged_writes = 0
        self.operations = 0
        self.refused_writes: list[str] = []  # writes within the clients' limits that a core called invalid
        for site in self.sites.values():
            site.rate = 1.0 + self.rng.uniform(-params.clock_drift, params.clock_drift)
        self.frame_bytes_max = params.message_bytes_max + MESSAGE_HEADROOM_BYTES  # the daemon's link frame
        largest = largest_write_bytes(params)
        if largest > params.message_bytes_max:
            raise ValueError(
                f"the workload's largest write ({largest} bytes as a record) exceeds message_bytes_max "
                f"{params.message_bytes_max}: lower object_bytes_max or batch_bytes_max"
            )

    # ------------------------------------------------------------- scheduling
    def after(self, delay_us: int, callback: Callable[[], None]) -> None:
        self.counter += 1
        heapq.heappush(self.queue, (self.now_us + max(0, int(delay_us)), self.counter, callback))

    def run_until(self, end_us: int, stop: Callable[[], bool] | None = None) -> bool:
        while self.queue and self.queue[0][0] <= end_us:
            when, _, callback = heapq.heappop(self.queue)
            self.now_us = when
            callback()
            if stop is not None and stop():
                return True
        self.now_us = max(self.now_us, end_us)
        return False

    def delay(self) -> int:
        return self.rng.randint(*self.params.net_delay_us)

    def trace(self, line: str) -> None:
        text = f"{self.now_us / MS:10.3f} {line}"
        self.lines.append(text)
        if len(self.lines) > 4000:
            del self.lines[:1000]
        if self.verbose:
            print(text)

    # ------------------------------------------------------------- checker feeds
    def site_event(self, site: str, role: Role, epoch: int) -> None:
        trigger = self.role_triggers.pop(role, None)
        if trigger is not None:
            trigger(site)
        if role is Role.SYNC:
            self.after(0, self.check_sync_point)
        state = "SYNC" if role is Role.RECONCILE else role.name
        process = self.sites[site]
        granted = bool(process.core and process.core.snapshot().holds_grant)
        self.site_events.append(
            {"site": site, "time": self.now_us * 1000, "event": "state", "epoch": epoch, "state": state, "granted": granted}
        )

    def commit_event(self, site: str, committed: ev.Committed) -> None:
        self.site_events.append({"site": site, "time": self.now_us * 1000, "event": "commit", "epoch": committed.epoch})

    def grant_event(self, site: str, epoch: int) -> None:
        self.site_events.append({"site": site, "time": self.now_us * 1000, "event": "grant", "epoch": epoch})

    def check_sync_point(self) -> None:
        """Convergence at every sync point, not only at the end: when both sites are SYNC in one
        epoch, every key that no record at either site still holds (pending, prepared or
        committed-unconfirmed) has the same visible value at both. Later writes would otherwise
        hide a key that a resync or a reconcile failed to carry."""
        a, b = self.sites["a"], self.sites["b"]
        if a.core is None or b.core is None:
            return
        if not (a.core.role is b.core.role is Role.SYNC and a.core.epoch == b.core.epoch):
            return
        if a.core.snapshot().takeover_pending or b.core.snapshot().takeover_pending:
            return
        busy = a.core.unresolved_keys() | b.core.unresolved_keys()
        data_a, data_b = a.disk.data(), b.disk.data()
        for key in set(data_a) | set(data_b):
            if key in busy:
                continue
            value_a = data_a[key][1] if key in data_a else None
            value_b = data_b[key][1] if key in data_b else None
            if value_a != value_b:
                self.sync_violations.append(
                    f"sync point at {self.now_us / MS:.3f} ms, epoch {a.core.epoch}: key {key!r} is {value_a!r} "
                    f"at a and {value_b!r} at b"
                )
                self.trace(f"SYNC POINT DIVERGENCE {key!r}: a={value_a!r} b={value_b!r}")
                return

    # ------------------------------------------------------------- network
    def link_up(self, source: str, target: str) -> bool:
        return self.links.get((source, target), "up") == "up"

    def connect_loop(self) -> None:
        a, b = self.sites["a"], self.sites["b"]
        if (
            a.alive
            and b.alive
            and a.connection is None
            and self.link_up("a", "b")
            and self.link_up("b", "a")
            and self.now_us >= a.paused_until_us
        ):
            # b accepts: an old connection it still holds is closed first (as a server would).
            if b.connection is not None:
                self.close_connection(b, notify_self=True)
            connection = Connection(self.next_connection_id, {"a": True, "b": True}, {"a": 0, "b": 0})
            self.next_connection_id += 1
            a.connection = connection
            b.connection = connection
            self.trace(f"connection {connection.id} up")
            # Both ends learn of the connection before any byte can arrive on it.
            a.deliver(lambda: ev.PeerConnected())
            b.deliver(lambda: ev.PeerConnected() if b.connection is connection else None)
        self.after(self.rng.randint(50, 150) * MS, self.connect_loop)

    def close_connection(self, site: SiteProcess, notify_self: bool) -> None:
        connection = site.connection
        if connection is None:
            return
        site.connection = None
        connection.open_at[site.name] = False
        if notify_self:
            site.deliver(lambda: ev.PeerDisconnected())
        peer = self.sites[other(site.name)]

        def fin() -> None:
            if peer.connection is connection:
                peer.connection = None
                connection.open_at[peer.name] = False
                peer.deliver(lambda: ev.PeerDisconnected())

        def send_fin() -> None:
            if peer.connection is not connection:
                return
            if not self.link_up(site.name, peer.name):
                self.after(20 * MS, send_fin)  # retransmitted, as TCP does, until the path heals
                return
            # The FIN reaches the peer after a delay, behind what was sent before it.
            when = max(self.now_us + self.delay(), connection.last_delivery_us[peer.name] + 1)
            self.after(when - self.now_us, fin)

        send_fin()

    def reset_connection(self) -> None:
        for site in self.sites.values():
            if site.connection is not None:
                self.close_connection(site, notify_self=True)

    def send_peer(self, sender: SiteProcess, message: msg.PeerMessage) -> None:
        connection = sender.connection
        if connection is None:
            return
        for wired in connection.round_trip(sender.name, message, self.frame_bytes_max):
            self._send_one(sender, connection, wired)

    def _send_one(self, sender: SiteProcess, connection: Connection, message: msg.PeerMessage) -> None:
        receiver = self.sites[other(sender.name)]
        connection.sent[sender.name] += 1
        number = connection.sent[sender.name]
        if self.params.reorder_within_connection:
            if not self.link_up(sender.name, receiver.name):
                self.after(20 * MS, lambda: self._retransmit(sender, connection, message, number))
                return
            self._transmit(sender, receiver, connection, message, number)
            return
        held = connection.held[sender.name]
        if held or not self.link_up(sender.name, receiver.name):
            # Black hole: TCP keeps retransmitting, so the bytes arrive (in
            # order) once the path heals, if the connection still exists;
            # what is sent meanwhile queues behind them.
            held.append(message)
            if len(held) == 1:
                self.after(20 * MS, lambda: self._flush_held(sender, connection))
            return
        self._transmit(sender, receiver, connection, message, number)

    def _flush_held(self, sender: SiteProcess, connection: Connection) -> None:
        held = connection.held[sender.name]
        if not connection.open_at[sender.name]:
            held.clear()
            return
        receiver = self.sites[other(sender.name)]
        if not self.link_up(sender.name, receiver.name):
            self.after(20 * MS, lambda: self._flush_held(sender, connection))
            return
        first = connection.sent[sender.name] - len(held) + 1
        for offset, message in enumerate(held):
            self._transmit(sender, receiver, connection, message, first + offset)
        held.clear()

    def _retransmit(self, sender: SiteProcess, connection: Connection, message: msg.PeerMessage, number: int) -> None:
        if not connection.open_at[sender.name]:
            return
        receiver = self.sites[other(sender.name)]
        if not self.link_up(sender.name, receiver.name):
            self.after(20 * MS, lambda: self._retransmit(sender, connection, message, number))
            return
        self._transmit(sender, receiver, connection, message, number)

    def _transmit(
        self, sender: SiteProcess, receiver: SiteProcess, connection: Connection, message: msg.PeerMessage, number: int
    ) -> None:
        when = max(self.now_us + self.delay(), connection.last_delivery_us[receiver.name] + 1)
        connection.last_delivery_us[receiver.name] = when

        def arrive() -> None:
            if receiver.connection is connection and connection.open_at[receiver.name]:
                if number <= connection.delivered[sender.name]:
                    self.reordered_deliveries += 1
                    assert self.params.reorder_within_connection, (
                        f"simulator bug: message {number} on connection {connection.id} from {sender.name} "
                        f"arrived after message {connection.delivered[sender.name]}"
                    )
                connection.delivered[sender.name] = max(connection.delivered[sender.name], number)
                receiver.deliver(lambda: ev.PeerSent(message) if receiver.connection is connection else None)
                trigger = self.message_triggers.pop(type(message), None)
                if trigger is not None:
                    trigger(receiver)

        self.after(when - self.now_us, arrive)

    def ask_witness(self, site: SiteProcess, request: msg.WitnessRequest) -> None:
        incarnation = site.incarnation
        answered = [False]

        def reply(answer: msg.WitnessAnswer) -> None:
            if not self.link_up("w", site.name):
                return
            def arrive() -> None:
                if site.incarnation == incarnation and not answered[0]:
                    answered[0] = True
                    site.deliver(lambda: ev.WitnessAnswered(request, answer))
            self.after(self.delay(), arrive)

        def timeout() -> None:
            if site.incarnation == incarnation and not answered[0]:
                answered[0] = True
                site.deliver(lambda: ev.WitnessFailed(request))

        if self.link_up(site.name, "w"):
            self.after(self.delay(), lambda: self.witness.request(request, reply))
        self.after(400 * MS, timeout)

    # ------------------------------------------------------------- ticks
    def tick_loop(self) -> None:
        for site in self.sites.values():
            if site.alive:
                site.deliver(lambda: ev.TimePassed())
        self.witness.tick()
        self.after(self.params.tick_ms * MS + self.rng.randint(0, 500), self.tick_loop)

    def heal(self) -> None:
        self.links.clear()
        for site in self.sites.values():
            site.disk.full = False
            site.disk.fail_next_sync = False
            if site.paused_until_us > self.now_us:
                site.paused_until_us = self.now_us
                site.resume()
            if not site.alive:
                site.start()
        if not self.witness.alive:
            self.witness.start()

    # ------------------------------------------------------------- client handles
    def submit(self, site_name: str, event_factory: Callable[[int], ev.Event], callback: Callable[[Any], None]) -> None:
        site = self.sites[site_name]
        self.counter += 1
        handle = self.counter

        def arrive() -> None:
            if not site.alive:
                callback(ev.AnswerWrite(handle, False, error="connection"))
                return
            site.handles[handle] = callback
            site.deliver(lambda: event_factory(handle))

        self.after(self.delay(), arrive)


def make_operations(items: list[tuple[str, str | None]]) -> tuple[Operation, ...]:
    return tuple(Operation(key.encode(), value.encode() if value is not None else None) for key, value in items)
