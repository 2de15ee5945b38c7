"""The one driver of a site core: `SiteDriver(core, store, peer, witness, clock, host)`.

Every shell drives `SiteCore` through this class: the asyncio daemon
(replicator/daemon/site.py), the deterministic simulator (chaos/sim/world.py),
the interaction scripts (chaos/interaction.py) and the tests. It executes the
core's actions by the rules of replicator/core/events.py, in one place:

1. the actions of a step in the order given;
2. `Persist`: written into the store (atomic batches, the store's own rules:
   last-writer-wins, the dedup bound, checksums), made durable later; the
   shell reports the store's durable sequence (`durable`) and the driver
   steps `Persisted` with the highest persist id it covers, in order. A write
   or a sync that fails steps `PersistFailed` (fail-stop). The persists of
   one step go into one batch, written at the end of the step; with
   `hold_persists` they are held past it, the persists of many steps in one
   batch, until the shell calls `flush` (the daemon: at the end of the event
   loop's turn, so that a turn costs one store write). Whatever reads the
   store (`ServeRead`, a resync load, a full resync's erase, a shell's own
   read) flushes first: a read never misses what the core persisted before it;
3. `SendToPeer` / `DropPeerConnection`: the peer port, in order;
4. `ServeRead`: read from the store before the next event;
5. `AskWitness`: the witness port, answered later by an event;
6. `LoadResyncBatch`: loaded from the store, cut to what fits in one message
   (the core's byte bound), and handed to the host to step later.

It does no I/O of its own: the store (`BaseStore`, on RocksDB or on the
memory engine), the peer, the witness, the clock and the host (clients, logs,
checkers, the event loop) are ports, so the simulator runs the same rules as
the daemon.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Protocol

from replicator import framing
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.errors import ReadError
from replicator.core.messages import Role
from replicator.core.records import Versioned, versioned_wire_bytes
from replicator.core.site import SiteCore
from replicator.storage.base import BaseStore
from replicator.storage.batch import Batch
from replicator.storage.errors import CorruptValue, StorageFailed

CLEAR_PAGE_KEYS = 10_000


# ------------------------------------------------------------------ the store's codec for the core


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


def recover(store: BaseStore, new_generation: Callable[[], bytes]) -> ev.Recovered:
    """What the core finds on the store's disk at start-up; a store without a generation (a new
    or wiped data directory) gets `new_generation()`, durably, first."""
    recovered = store.load()
    meta = {name: decode_meta(raw) for name, raw in recovered.meta.items()}
    if "generation" not in meta:
        generation = new_generation()
        batch = store.batch()
        batch.put_meta("generation", encode_meta(generation))
        store.write(batch)
        store.sync()
        meta["generation"] = generation
    return ev.Recovered(
        meta=meta,
        log=[framing.record_from_log(raw, record_id) for record_id, raw in recovered.log.items()],
        dirty=set(recovered.dirty),
        dedup={request_id: int(entry.outcome) for request_id, entry in recovered.dedup.items()},
    )


def load_resync_batch(store: BaseStore, action: ev.LoadResyncBatch, bytes_max: int) -> ev.ResyncBatchLoaded:
    """The answer to LoadResyncBatch: the versions of the asked keys (absent ones as tombstones at
    ts 0) or a scan of `limit` keys from `scan_from`, cut to a prefix of at most `bytes_max` bytes
    (at least one entry): a site sends only what fits in one link frame."""
    if action.keys:
        entries: list[Versioned] = []
        used = 0
        for key in action.keys:
            version = store.get(key)
            entry = version if version is not None else Versioned(key, 0, None)
            size = versioned_wire_bytes(entry)
            if entries and used + size > bytes_max:
                break
            entries.append(entry)
            used += size
        return ev.ResyncBatchLoaded(action.token, tuple(entries), None)
    versions = store.scan(action.scan_from or b"", None, action.limit)
    next_position = versions[-1].key + b"\x00" if len(versions) == action.limit else None
    used = 0
    for count, version in enumerate(versions):
        used += versioned_wire_bytes(version)
        if count and used > bytes_max:
            versions = versions[:count]
            next_position = versions[-1].key + b"\x00"
            break
    return ev.ResyncBatchLoaded(action.token, tuple(versions), next_position)


# ------------------------------------------------------------------ plants in the shell


class ShellPlant(enum.Enum):
    """Deliberate bugs in the driver, as replicator/core/plants.py has in the core: each is checked
    at exactly one place in this module (a test counts them), to show the simulator catches them."""

    # value: (what the plant does, the rule it breaks)
    RESYNC_UNCUT = (
        "answer a resync load with the whole asked batch, not cut to what fits in one frame",
        "load_resync_batch: a batch is cut to the core's byte bound (one link frame, at least one entry)",
    )

    @property
    def name_in_config(self) -> str:
        return self.name.lower()

    @property
    def description(self) -> str:
        return str(self.value[0])


SHELL_PLANTS = {plant.name_in_config: plant.description for plant in ShellPlant}


def shell_plants_of(names: frozenset[str]) -> frozenset[ShellPlant]:
    """The shell plants among `names` (the others are the core's)."""
    return frozenset(plant for plant in ShellPlant if plant.name_in_config in names)


# ------------------------------------------------------------------ ports


class PeerPort(Protocol):
    def send(self, message: msg.PeerMessage) -> None:
        """Send in order on the current connection (dropped when there is none)."""

    def drop(self, reason: str) -> None:
        """Close the current connection (the core asked for it)."""


class WitnessPort(Protocol):
    def ask(self, request: msg.WitnessRequest) -> None:
        """Ask the witness; the answer comes back later as WitnessAnswered or WitnessFailed."""


class Clock(Protocol):
    def mono_ms(self) -> float: ...

    def wall_ms(self) -> int: ...


class Host:
    """The site's surroundings: clients, logs, checkers and the scheduler. Every method but
    `later` has a default that does nothing; `later` must step the event after the current step's
    actions (asyncio's call_soon, the simulator's queue, a test's list)."""

    def later(self, driver: SiteDriver, event: ev.Event) -> None:
        raise NotImplementedError

    def resync_loaded(self, driver: SiteDriver, request: ev.LoadResyncBatch, loaded: ev.ResyncBatchLoaded) -> None:
        """A loaded resync batch, to step later (a shell may cut it shorter still: a prefix is valid)."""
        self.later(driver, loaded)

    def persists_held(self, driver: SiteDriver) -> None:
        """With `hold_persists`: a persist is held, call `driver.flush()` soon (at the end of the
        event loop's turn)."""

    def write_waits(self, driver: SiteDriver, persist: ev.Persist) -> None:
        """`persist` was written and waits for a sync: call `driver.durable` once one is done (an
        urgent persist asks for its sync; the others may ride on the next one)."""

    def write_answered(self, answer: ev.AnswerWrite) -> None: ...

    def read_rejected(self, reject: ev.RejectRead) -> None: ...

    def read_served(self, handle: int, key: bytes, version: Versioned | None, error: CorruptValue | None) -> None: ...

    def role_changed(self, change: ev.RoleChanged) -> None: ...

    def committed(self, commit: ev.Committed) -> None: ...

    def stopping(self, reason: str) -> None: ...

    def cleared(self, erased: int, dirty: int) -> None:
        """A full resync's target erased its data (`erased` keys)."""


# ------------------------------------------------------------------ the driver


class SiteDriver:
    def __init__(
        self,
        core: SiteCore,
        store: BaseStore,
        peer: PeerPort,
        witness: WitnessPort,
        clock: Clock,
        host: Host,
        write: Callable[[Batch], int] | None = None,
        plants: frozenset[ShellPlant] = frozenset(),
        hold_persists: bool = False,
    ) -> None:
        self.core = core
        self.store = store
        self.peer = peer
        self.witness = witness
        self.clock = clock
        self.host = host
        # How a batch is written (the daemon's group committer; by default the store itself).
        self.write = write if write is not None else store.write
        self.unsynced: deque[tuple[int, int]] = deque()  # (store sequence, persist id), not yet durable
        self.closed = False  # the process is gone: nothing more is executed
        self.trace: list[ev.Action] | None = None  # when a list: every action executed (tests)
        self.resync_bytes_max = core.config.message_bytes_max
        # The persists not yet written: one batch, and the persists it holds (see rule 2).
        self.hold_persists = hold_persists
        self.held: Batch | None = None
        self.held_persists: list[ev.Persist] = []
        if ShellPlant.RESYNC_UNCUT in plants:
            self.resync_bytes_max = 1 << 62  # nothing is ever cut

    # ---------------------------------------------------------- driving
    def start(self) -> list[ev.Action]:
        actions = self.core.start(self.clock.mono_ms(), self.clock.wall_ms())
        self.execute(actions)
        return actions

    def step(self, event: ev.Event) -> list[ev.Action]:
        if self.closed or self.core.role is Role.STOPPED:
            return []
        actions = self.core.step(event, self.clock.mono_ms(), self.clock.wall_ms())
        self.execute(actions)
        return actions

    def close(self) -> None:
        self.closed = True
        self.unsynced.clear()
        self.held = None
        self.held_persists = []

    # ---------------------------------------------------------- durability
    @property
    def first_unsynced_sequence(self) -> int | None:
        return self.unsynced[0][0] if self.unsynced else None

    def durable(self, sequence: int) -> None:
        """The store made every write up to `sequence` durable: one `Persisted` for the highest
        persist id that covers (one step per sync, not one per persist)."""
        unsynced = self.unsynced
        persist_id = 0
        while unsynced and unsynced[0][0] <= sequence:
            persist_id = unsynced.popleft()[1]
        if persist_id:
            self.step(ev.Persisted(persist_id))

    def sync_failed(self, reason: str) -> None:
        self.unsynced.clear()
        self.step(ev.PersistFailed(reason))

    # ---------------------------------------------------------- the executor
    def execute(self, actions: list[ev.Action]) -> None:
        self._execute(actions)
        if not self.hold_persists:
            self.flush()

    def _execute(self, actions: list[ev.Action]) -> None:
        host = self.host
        for action in actions:
            if self.closed:
                return
            if self.trace is not None:
                self.trace.append(action)
            if isinstance(action, ev.Persist):
                self._persist(action)
            elif isinstance(action, ev.SendToPeer):
                self.peer.send(action.message)
            elif isinstance(action, ev.DropPeerConnection):
                self.peer.drop(action.reason)
            elif isinstance(action, ev.AnswerWrite):
                host.write_answered(action)
            elif isinstance(action, ev.RejectRead):
                host.read_rejected(action)
            elif isinstance(action, ev.ServeRead):
                self.flush()
                try:
                    version = self.store.get(action.key)
                except CorruptValue as error:
                    host.read_served(action.handle, action.key, None, error)
                except StorageFailed as error:
                    # The store fail-stopped (a write or sync failed; PersistFailed is on its way):
                    # the read is refused, the rest of the step's actions still go out.
                    host.read_rejected(ev.RejectRead(action.handle, ReadError.STOPPED, str(error)))
                else:
                    host.read_served(action.handle, action.key, version, None)
            elif isinstance(action, ev.AskWitness):
                self.witness.ask(action.request)
            elif isinstance(action, ev.LoadResyncBatch):
                self.flush()
                try:
                    loaded = load_resync_batch(self.store, action, self.resync_bytes_max)
                except StorageFailed:
                    continue  # the store fail-stopped: the site stops (PersistFailed is on its way)
                host.resync_loaded(self, action, loaded)
            elif isinstance(action, ev.RoleChanged):
                host.role_changed(action)
            elif isinstance(action, ev.Committed):
                host.committed(action)
            elif isinstance(action, ev.Stop):
                host.stopping(action.reason)

    def _persist(self, persist: ev.Persist) -> None:
        """The Persist interpreter: its fields in the order events.Persist gives, added to the held
        batch after the persists before it (one atomic write, in order: the same outcome as one
        write each, last-writer-wins and the dedup table resolved operation by operation)."""
        if persist.clear_data:
            self.flush()  # the erase scans the store: what is held must be in it
        if self.held is None:
            self.held = self.store.batch()
            if self.hold_persists:
                self.host.persists_held(self)
        self._add_to(self.held, persist)
        self.held_persists.append(persist)

    def flush(self) -> None:
        """Write the held persists as one batch (nothing to do when none is held)."""
        batch, persists = self.held, self.held_persists
        if batch is None or self.closed:
            return
        self.held, self.held_persists = None, []
        try:
            sequence = self.write(batch)
        except StorageFailed as error:
            # Not from inside a step's actions: the rest of them go out first, in order (a commit
            # decided before the failure is logged before the stop).
            self.host.later(self, ev.PersistFailed(str(error)))
            return
        for persist in persists:
            self.unsynced.append((sequence, persist.persist_id))
            self.host.write_waits(self, persist)

    def _add_to(self, batch: Batch, persist: ev.Persist) -> None:
        store = self.store
        if persist.clear_data:
            # A full resync's target starts empty: erase every key, page by page, in this one batch.
            start = b""
            erased = 0
            while True:
                page = store.scan(start, None, CLEAR_PAGE_KEYS)
                for version in page:
                    batch.erase(version.key)
                erased += len(page)
                if len(page) < CLEAR_PAGE_KEYS:
                    break
                start = page[-1].key + b"\x00"
            self.host.cleared(erased, self.core.snapshot().dirty_keys)
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
        if persist.dedup_put:
            now_ms = self.clock.wall_ms()
            for request_id, ts in persist.dedup_put:
                batch.put_dedup(request_id, str(ts).encode(), now_ms)
        for name, value in persist.meta:
            batch.put_meta(name, encode_meta(value))
