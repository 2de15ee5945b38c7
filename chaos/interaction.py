"""Interaction scripts: the real cores driven step by step from a text file (docs/interaction.md).

A script (tests/interaction/*.txt) opens with `#` lines stating its goal, then commands, each
followed by `----` and the trace it must produce, up to a blank line::

    # A write at a is replicated to b and acknowledged.
    start
    ----
    a: STARTING e1
    b: STARTING e1

    write a k=v
    ----
    a #1 write k=v
      a sends ShipRecords e1 [a1.1 k=v]

The environment holds two site cores, the witness core, a FIFO queue per direction of the one
connection between the sites, and a disk per site (visible at once, durable on `sync`). It
drives the cores only through their public surface (`start`, `step`, `role`, `epoch`, the
event, message and action dataclasses), and the trace shows only what a refactor of the core
must not change: roles and epochs, the messages sent and delivered, the witness's requests and
answers, the clients' answers and the connection's drops. A step's reactions are printed in a
fixed order of kinds (roles, client answers, messages in the order sent, witness requests,
connection), so that a core that emits the same actions in another order still passes.

    python -m chaos.interaction tests/interaction/*.txt            # run, show the diffs
    python -m chaos.interaction --rewrite tests/interaction/x.txt  # write the actual traces in
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.sim.disk import SimDisk
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.config import CoreConfig
from replicator.core.records import Operation, Record
from replicator.core.site import SiteCore
from replicator.core.witness import (
    PairConfig,
    PairState,
    WitnessCore,
    WitnessPersist,
    WitnessPersisted,
    WitnessReply,
    WitnessRequested,
    WitnessTick,
)
from replicator.driver import Host, SiteDriver, recover

SITES = ("a", "b")
PAIR = "p"
WALL_BASE_MS = 1_700_000_000_000
SHOWN_VALUE_BYTES = 16  # longer values are shown by their size
SHOWN_PAYLOAD_BYTES = 256  # a message carrying more shows its payload's size
STABILIZE_ROUNDS_MAX = 200
# Fields of messages that vary without meaning (nonces, clocks, random generations) or repeat
# what the trace already says (names of the pair and its sites).
HIDDEN_FIELDS = {"epoch", "nonce", "generation", "clock_high", "site", "pair", "message"}


class ScriptError(Exception):
    """A malformed script or a command that cannot run (the message names the line)."""


def other(site: str) -> str:
    return "b" if site == "a" else "a"


# ================================================================ rendering


def show_bytes(data: bytes | None) -> str:
    if data is None:
        return "<none>"  # absent, or deleted
    if len(data) > SHOWN_VALUE_BYTES:
        return f"<{len(data)} B>"
    text = data.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() and c != " " else f"\\x{ord(c):02x}" for c in text)


def show_record(record: Record) -> str:
    operations = " ".join(f"{op.key.decode()}={show_bytes(op.value)}" for op in record.operations)
    if len(record.operations) > 1:
        operations = "{" + operations + "}"
    return f"{record.id.origin}{record.id.incarnation}.{record.id.seq} {operations}"


def payload_bytes(message: Any) -> int:
    total = 0
    for record in getattr(message, "records", ()):
        total += sum(len(op.key) + len(op.value or b"") for op in record.operations)
    for entry in getattr(message, "entries", ()):
        if isinstance(entry, tuple):
            total += len(entry[0])
        else:
            total += len(entry.key) + len(entry.value or b"")
    return total


def show_value(name: str, value: Any) -> str | None:
    if isinstance(value, bool):
        return name if value else None
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, tuple):
        if name == "records":
            return "[" + ", ".join(show_record(record) for record in value) + "]"
        if name == "entries":
            if value and isinstance(value[0], tuple):  # dedup entries (request id, ts): a set, sorted
                return "[" + " ".join(sorted(entry[0].decode() for entry in value)) + "]"
            return "[" + " ".join(f"{entry.key.decode()}={show_bytes(entry.value)}" for entry in value) + "]"
        # Key lists (suspect keys) are sets: sorted, so that a core that collects them otherwise passes.
        shown = sorted(show_bytes(item) if isinstance(item, bytes) else str(item) for item in value)
        return f"{name}=[" + " ".join(shown) + "]"
    if value is None:
        return None
    if isinstance(value, bytes):
        return f"{name}={show_bytes(value)}"
    return f"{name}={value}"


def show_message(message: Any) -> str:
    """`Name e<epoch> field=value ...`: every field but the hidden ones, in declaration order."""
    parts = [type(message).__name__]
    epoch = getattr(message, "epoch", None)
    if epoch is not None and not isinstance(message, msg.SetPreferred):
        parts.append(f"e{epoch}")
    for spec in dataclasses.fields(message):
        if spec.name in HIDDEN_FIELDS:
            continue
        shown = show_value(spec.name, getattr(message, spec.name))
        if shown is not None:
            parts.append(shown)
    size = payload_bytes(message)
    if size > SHOWN_PAYLOAD_BYTES:
        parts.append(f"({size} B)")
    return " ".join(parts)


def show_answer(answer: msg.WitnessAnswer) -> str:
    text = f"{answer.verdict.name} e{answer.epoch} {answer.mode.name}"
    return f"{text} {answer.holder}" if answer.holder else text


# ================================================================ the environment


@dataclass
class Reactions:
    """What one step did, by kind (printed in this order of kinds)."""

    roles: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    sends: list[str] = field(default_factory=list)
    asks: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    loads: list[ev.ResyncBatchLoaded] = field(default_factory=list)
    later: list[ev.Event] = field(default_factory=list)

    def lines(self) -> list[str]:
        return self.roles + self.answers + self.sends + self.asks + self.links


class SiteHost(Host):
    """The driver's ports at one site of the script's environment: they record what the step did."""

    def __init__(self, env: Env, site: Site) -> None:
        self.env = env
        self.site = site
        self.now = Reactions()

    # Clock
    def mono_ms(self) -> float:
        return self.env.now_ms

    def wall_ms(self) -> int:
        return self.env.wall_ms()

    # PeerPort
    def send(self, message: msg.PeerMessage) -> None:
        env, name = self.env, self.site.name
        if env.connected and env.closing is None:
            env.queues[name].append(message)
            if not env.hidden_message(message):
                self.now.sends.append(f"{name} sends {show_message(message)}")
        elif not env.hidden_message(message):
            self.now.sends.append(f"{name} sends {show_message(message)} (no connection: lost)")

    def drop(self, reason: str) -> None:
        env, name = self.env, self.site.name
        self.now.links.append(f"{name} drops the connection")
        if env.connected and env.closing is None:
            env.disconnect_later = name

    # WitnessPort
    def ask(self, request: msg.WitnessRequest) -> None:
        self.site.asks.append(request)
        if not self.env.hidden_message(request):
            self.now.asks.append(f"{self.site.name} asks the witness {show_message(request)}")

    # Host
    def later(self, driver: SiteDriver, event: ev.Event) -> None:
        self.now.later.append(event)

    def resync_loaded(self, driver: SiteDriver, request: ev.LoadResyncBatch, loaded: ev.ResyncBatchLoaded) -> None:
        self.now.loads.append(loaded)

    def role_changed(self, change: ev.RoleChanged) -> None:
        self.now.roles.append(f"{self.site.name}: {change.new.name} e{change.epoch}")

    def write_answered(self, answer: ev.AnswerWrite) -> None:
        name = self.site.name
        self.site.handles.pop(answer.handle, None)
        if answer.ok:
            self.now.answers.append(f"{name} answers #{answer.handle} ok" + (" (duplicate)" if answer.duplicate else ""))
        else:
            self.now.answers.append(f"{name} answers #{answer.handle} {answer.error or 'failed'}")

    def read_served(self, handle: int, key: bytes, version: Any, error: Exception | None) -> None:
        self.site.reads.pop(handle, None)
        value = None if version is None else version.value
        self.now.answers.append(f"{self.site.name} serves #{handle} {key.decode()}={show_bytes(value)}")

    def read_rejected(self, reject: ev.RejectRead) -> None:
        self.site.reads.pop(reject.handle, None)
        self.now.answers.append(f"{self.site.name} rejects read #{reject.handle} {reject.error}")

    def stopping(self, reason: str) -> None:
        self.now.links.append(f"{self.site.name} stops")
        self.env.crash_later = self.site.name


@dataclass
class Site:
    name: str
    disk: SimDisk = field(default_factory=SimDisk)
    core: SiteCore | None = None
    driver: SiteDriver | None = None
    handles: dict[int, str] = field(default_factory=dict)  # handle -> what the client asked
    reads: dict[int, bytes] = field(default_factory=dict)  # handle -> key
    asks: list[msg.WitnessRequest] = field(default_factory=list)  # not yet taken by the witness
    copy: Any = None  # a copy of the durable disk (copy-disk / restore-disk)

    @property
    def alive(self) -> bool:
        return self.core is not None

    def value(self, key: bytes) -> bytes | None:
        return self.disk.value(key)


@dataclass
class Settings:
    plants: frozenset[str] = frozenset()
    message_bytes_max: int = CoreConfig.__dataclass_fields__["message_bytes_max"].default
    lease_ms: int = 1000
    peer_timeout_ms: int = 500
    heartbeat_interval_ms: int = 100
    resync_batch_keys_max: int = 128
    preferred: str = "a"
    witness_preferred: str = "a"
    grace_ms: int = 0


class Env:
    """Two sites, the witness and one connection, driven by script commands."""

    def __init__(self, extra_plants: frozenset[str] = frozenset()) -> None:
        self.extra_plants = extra_plants
        self.settings = Settings()
        self.sites: dict[str, Site] = {}
        self.now_ms = 0.0
        self.handle = 0
        self.connected = False
        self.queues: dict[str, list[msg.PeerMessage]] = {site: [] for site in SITES}  # by sender
        self.held: set[str] = set()  # senders whose direction is held
        self.hidden: set[str] = set()  # message or request types left out of the trace
        self.witness: WitnessCore | None = None
        self.witness_state: dict[str, PairState] = {}
        self.witness_up = True
        self.witness_cut: set[str] = set()  # sites whose requests the witness does not get
        self.witness_waiting: dict[int, tuple[str, msg.WitnessRequest]] = {}
        self.witness_handle = 0
        self.out: list[str] = []
        # Decided by a step, done once its lines are out: a connection drop, a stop.
        self.disconnect_later: str | None = None
        self.crash_later: str | None = None
        self.closing: str | None = None  # the site that closed its end, while its last messages arrive

    # ------------------------------------------------------------ output
    def emit(self, line: str) -> None:
        self.out.append(line)

    def hidden_message(self, message: Any) -> bool:
        return type(message).__name__ in self.hidden

    # ------------------------------------------------------------ driving a core
    def step(self, site: Site, header: str, run: Callable[[SiteDriver], object], quiet: bool = False) -> None:
        """Run one event at `site` (through its driver); print `header` and its reactions (unless
        `quiet` and none), then step the resync batches it loaded."""
        assert site.driver is not None
        host = site.driver.host
        assert isinstance(host, SiteHost)
        host.now = reactions = Reactions()
        run(site.driver)
        lines = reactions.lines()
        if lines or not quiet:
            if header:
                self.emit(header)
            self.out.extend(f"  {line}" for line in lines)
        for event in reactions.later:
            if site.driver is None:
                break
            self.step(site, "", lambda driver, e=event: driver.step(e), quiet=True)
        for loaded in reactions.loads:
            if site.driver is None:
                break
            shown = " ".join(entry.key.decode() for entry in loaded.entries)
            more = f" next={show_bytes(loaded.next_position)}" if loaded.next_position is not None else ""
            self.step(site, f"{site.name} loads [{shown}]{more}", lambda driver, e=loaded: driver.step(e))
        self.after_step()

    def wall_ms(self) -> int:
        return WALL_BASE_MS + int(self.now_ms)

    def event(self, site: Site, header: str, event: ev.Event, quiet: bool = False) -> None:
        self.step(site, header, lambda driver: driver.step(event), quiet=quiet)

    def after_step(self) -> None:
        """Connection drops and stops decided by a step take effect once its lines are out."""
        if self.crash_later is not None:
            name, self.crash_later = self.crash_later, None
            self.crash(self.sites[name], "stopped")
        if self.disconnect_later is not None:
            closer, self.disconnect_later = self.disconnect_later, None
            self.close(closer)

    def close(self, closer: str) -> None:
        """`closer` closes its end: what it sent before still arrives, unless held (its FIN goes
        behind it, as TCP's does); what the peer sends from now on, and had queued, is lost."""
        if not self.connected or self.closing is not None:
            return
        self.closing = closer
        if closer in self.held:
            self.queues[closer].clear()
        while self.queues[closer]:
            self.deliver_one(closer)
        self.closing = None
        self.disconnect()

    # ------------------------------------------------------------ the network
    def connect(self) -> None:
        if self.connected:
            raise ScriptError("already connected")
        if not all(site.alive for site in self.sites.values()):
            raise ScriptError("both sites must run to connect")
        self.connected = True
        self.queues = {site: [] for site in SITES}
        self.emit("connection up")
        for name in SITES:
            self.event(self.sites[name], f"{name} connected", ev.PeerConnected())

    def disconnect(self) -> None:
        if not self.connected:
            return
        self.connected = False
        lost = {name: len(queue) for name, queue in self.queues.items() if queue}
        self.queues = {site: [] for site in SITES}
        self.emit("connection down" + "".join(f", {n} message(s) from {s} lost" for s, n in lost.items()))
        for name in SITES:
            site = self.sites[name]
            if site.alive:
                self.event(site, f"{name} disconnected", ev.PeerDisconnected(), quiet=True)

    def deliver_one(self, sender: str, index: int = 0) -> None:
        message = self.queues[sender].pop(index)
        receiver = self.sites[other(sender)]
        header = f"{sender}->{receiver.name} {show_message(message)}"
        if index:
            header += f" (overtaking {index} earlier)"
        self.event(receiver, header, ev.PeerSent(message), quiet=self.hidden_message(message))

    def deliver(self, sender: str, count: int | None) -> int:
        delivered = 0
        while self.connected and self.closing is None and self.queues[sender] and (count is None or delivered < count):
            self.deliver_one(sender)
            delivered += 1
        return delivered

    # ------------------------------------------------------------ disks
    def sync(self, site: Site) -> bool:
        if site.driver is None or not site.driver.unsynced:
            return False
        durable = site.disk.sync()
        self.step(site, f"{site.name} durable", lambda driver: driver.durable(durable), quiet=True)
        return True

    # ------------------------------------------------------------ processes
    def start_site(self, site: Site) -> None:
        recovered = recover(site.disk.store, lambda: site.name.encode() * 4)
        settings = self.settings
        config = CoreConfig(
            site=site.name,
            peer=other(site.name),
            pair=PAIR,
            preferred=settings.preferred,
            lease_ms=settings.lease_ms,
            peer_timeout_ms=settings.peer_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            resync_batch_keys_max=settings.resync_batch_keys_max,
            message_bytes_max=settings.message_bytes_max,
            plants=settings.plants | self.extra_plants,
        )
        site.core = SiteCore(config, recovered)
        host = SiteHost(self, site)
        site.driver = SiteDriver(site.core, site.disk.store, host, host, host, host)
        site.asks.clear()
        core = site.core
        self.step(site, f"{site.name}: {core.role.name} e{core.epoch}", lambda driver: driver.start())

    def crash(self, site: Site, how: str = "crashes") -> None:
        if not site.alive:
            raise ScriptError(f"{site.name} is not running")
        site.disk.crash()
        if site.driver is not None:
            site.driver.close()
        site.core = None
        site.driver = None
        site.handles.clear()
        site.reads.clear()
        site.asks.clear()
        for handle, (name, _) in list(self.witness_waiting.items()):
            if name == site.name:
                del self.witness_waiting[handle]
        self.emit(f"{site.name} {how}")
        self.disconnect()

    # ------------------------------------------------------------ the witness
    def witness_step(self, actions: list[Any]) -> None:
        persisted = 0
        for action in actions:
            if isinstance(action, WitnessPersist):
                self.witness_state[action.pair] = action.state
                persisted = max(persisted, action.persist_id)
        assert self.witness is not None
        if persisted:
            actions = actions + self.witness.step(WitnessPersisted(persisted), self.now_ms)
        for action in actions:
            if isinstance(action, WitnessReply):
                name, request = self.witness_waiting.pop(action.handle)
                site = self.sites[name]
                if not site.alive:
                    continue
                self.event(
                    site,
                    f"w->{name} {show_answer(action.answer)} (to {type(request).__name__})",
                    ev.WitnessAnswered(request, action.answer),
                    quiet=self.hidden_message(request),
                )

    def witness_take(self, names: tuple[str, ...]) -> int:
        taken = 0
        for name in names:
            site = self.sites[name]
            while site.alive and site.asks and self.witness is not None and name not in self.witness_cut:
                request = site.asks.pop(0)
                taken += 1
                self.witness_handle += 1
                self.witness_waiting[self.witness_handle] = (name, request)
                self.witness_step(self.witness.step(WitnessRequested(self.witness_handle, request), self.now_ms))
        return taken

    def witness_fail(self, names: tuple[str, ...]) -> None:
        for name in names:
            site = self.sites[name]
            asks, site.asks = site.asks, []
            for request in asks:
                if site.alive:
                    self.event(site, f"w-x-{name} {show_message(request)} failed", ev.WitnessFailed(request))

    # ------------------------------------------------------------ time
    def tick(self, ms: float) -> None:
        self.now_ms += ms
        for name in SITES:
            site = self.sites[name]
            if site.alive:
                self.event(site, f"{name} tick", ev.TimePassed(), quiet=True)
        if self.witness is not None:
            self.witness_step(self.witness.step(WitnessTick(), self.now_ms))

    def stabilize(self, names: tuple[str, ...]) -> None:
        """Until nothing moves: disks made durable, messages delivered (not those held), the
        witness answering (when up). No time passes."""
        for _ in range(STABILIZE_ROUNDS_MAX):
            moved = False
            for name in names:
                moved |= self.sync(self.sites[name])
            for name in SITES:
                if self.connected and name not in self.held and other(name) in names:
                    moved |= self.deliver(name, None) > 0
            if self.witness_up:
                moved |= self.witness_take(names) > 0
            if not moved:
                return
        raise ScriptError(f"not stable after {STABILIZE_ROUNDS_MAX} rounds")


# ================================================================ commands


@dataclass
class Command:
    line: int
    text: str
    expected: list[str]

    @property
    def words(self) -> list[str]:
        return self.text.split()


def parse_args(words: list[str]) -> tuple[list[str], dict[str, str]]:
    positional: list[str] = []
    named: dict[str, str] = {}
    for word in words:
        if "=" in word and not word.startswith("="):
            name, _, value = word.partition("=")
            named[name] = value
        else:
            positional.append(word)
    return positional, named


def site_names(env: Env, positional: list[str]) -> tuple[str, ...]:
    names = tuple(positional) or SITES
    for name in names:
        if name not in env.sites:
            raise ScriptError(f"no site {name!r} (sites: a, b)")
    return names


def direction(text: str) -> str:
    """`a->b` -> the sender, a."""
    sender, arrow, receiver = text.partition("->")
    if not arrow or sender not in SITES or receiver != other(sender):
        raise ScriptError(f"a direction is a->b or b->a, got {text!r}")
    return sender


def sized_value(text: str) -> bytes:
    """`v`, or `<1500>` for 1500 bytes (`<1500:x>` for 1500 x's)."""
    if text.startswith("<") and text.endswith(">"):
        size, _, fill = text[1:-1].partition(":")
        return (fill or "v").encode()[:1] * int(size)
    return text.encode()


def run_command(env: Env, command: Command) -> None:
    words = command.words
    name, rest = words[0], words[1:]
    positional, named = parse_args(rest)

    def site_arg() -> Site:
        if not positional or positional[0] not in env.sites:
            raise ScriptError(f"{name}: name a site first (a or b)")
        return env.sites[positional.pop(0)]

    if name == "start":
        if env.sites:
            raise ScriptError("start: already started (use restart SITE)")
        settings = env.settings
        for key, value in named.items():
            if key == "plants":
                settings.plants = frozenset(p for p in value.split(",") if p)
            elif key in ("preferred", "witness_preferred"):
                setattr(settings, key, value)
            elif hasattr(settings, key):
                setattr(settings, key, int(value))
            else:
                raise ScriptError(f"start: unknown setting {key!r}")
        env.sites = {site: Site(site) for site in SITES}
        env.witness = WitnessCore(
            {PAIR: PairConfig(SITES, settings.witness_preferred, preferred_grace_ms=settings.grace_ms)}, {}
        )  # (its persists are durable at once: the witness's own crash safety is tests/test_witness_*)
        for site in SITES:
            env.start_site(env.sites[site])
        return
    if not env.sites:
        raise ScriptError(f"{name}: start first")
    if name == "restart":
        site = site_arg()
        if site.alive:
            raise ScriptError(f"restart: {site.name} is running")
        env.start_site(site)
    elif name == "crash":
        env.crash(site_arg())
    elif name in ("write", "delete"):
        site = site_arg()
        if not site.alive:
            raise ScriptError(f"{name}: {site.name} is not running")
        env.handle += 1
        handle = env.handle
        request_id = named.pop("id", f"req-{handle}").encode()
        if name == "write":
            operations = tuple(Operation(k.encode(), sized_value(v)) for k, v in named.items())
        else:
            operations = tuple(Operation(k.encode(), None) for k in positional)
        if not operations:
            raise ScriptError(f"{name}: no keys")
        shown = " ".join(f"{op.key.decode()}={show_bytes(op.value)}" for op in operations)
        site.handles[handle] = shown
        header = f"{site.name} #{handle} {name} {shown}" + (f" id={request_id.decode()}" if "id" in command.text else "")
        env.event(site, header, ev.WriteRequested(handle, request_id, operations))
    elif name == "read":
        site = site_arg()
        if not site.alive or len(positional) != 1:
            raise ScriptError("read SITE KEY, at a running site")
        env.handle += 1
        key = positional[0].encode()
        site.reads[env.handle] = key
        env.event(site, f"{site.name} #{env.handle} read {positional[0]}", ev.ReadRequested(env.handle, key))
    elif name == "sync":
        # Silent when nothing moves: how many persists a step makes is the core's own business.
        for site_name in site_names(env, positional):
            env.sync(env.sites[site_name])
    elif name == "fsync-fail":
        site = site_arg()
        env.event(site, f"{site.name} fsync failed", ev.PersistFailed("fsync failed (script)"))
    elif name == "connect":
        env.connect()
    elif name == "disconnect":
        if not env.connected:
            raise ScriptError("disconnect: not connected")
        env.disconnect()
    elif name == "deliver":
        senders = [direction(word) for word in positional] or list(SITES)
        count = int(named["n"]) if "n" in named else None
        for sender in senders:
            if env.deliver(sender, count) == 0:
                env.emit(f"{sender}->{other(sender)}: nothing to deliver")
    elif name == "overtake":
        # Not TCP: the last queued message of a direction goes before the others (seed 61196).
        if len(positional) != 1:
            raise ScriptError("overtake a->b")
        sender = direction(positional[0])
        queue = env.queues[sender]
        if len(queue) < 2:
            raise ScriptError("overtake: fewer than two messages queued")
        env.deliver_one(sender, len(queue) - 1)
    elif name == "drop":
        for sender in [direction(word) for word in positional] or list(SITES):
            lost, env.queues[sender] = env.queues[sender], []
            env.emit(f"{sender}->{other(sender)}: {len(lost)} message(s) dropped")
    elif name == "hold":
        for sender in [direction(word) for word in positional] or list(SITES):
            env.held.add(sender)
    elif name == "release":
        for sender in [direction(word) for word in positional] or list(SITES):
            env.held.discard(sender)
    elif name == "partition":
        # `partition`: the site link goes silent both ways (the connection stays open, as TCP's
        # does until a side times out); `partition a w`: a's requests no longer reach the witness.
        if positional in ([], ["a", "b"], ["b", "a"]):
            env.held.update(SITES)
        elif len(positional) == 2 and positional[1] == "w" and positional[0] in SITES:
            env.witness_cut.add(positional[0])
        else:
            raise ScriptError("partition [a b] | partition SITE w")
    elif name == "heal":
        env.held.clear()
        env.witness_cut.clear()
    elif name == "tick":
        if not positional:
            raise ScriptError("tick MS [step=MS]")
        total = float(positional[0])
        each = float(named.get("step", total))
        if each <= 0 or total < 0:
            raise ScriptError("tick: times must be positive")
        elapsed = 0.0
        while elapsed < total:
            amount = min(each, total - elapsed)
            env.tick(amount)
            elapsed += amount
        env.emit(f"time {env.now_ms:g} ms")
    elif name == "stabilize":
        env.stabilize(site_names(env, positional))
    elif name == "witness":
        action = positional.pop(0) if positional else "answer"
        names = site_names(env, positional)
        if action == "answer":
            if env.witness_take(names) == 0:
                env.emit("witness: nothing asked")
        elif action == "fail":
            env.witness_fail(names)
        elif action in ("down", "up"):
            env.witness_up = action == "up"
            env.emit(f"witness {action}")
        elif action == "crash":
            # Its state is durable before it answers (it persists at once here): only the
            # requests it holds are lost; the sites' own timeouts (`witness fail`) follow.
            env.witness = None
            env.witness_waiting.clear()
            env.emit("witness crashes")
        elif action == "restart":
            settings = env.settings
            pairs = {PAIR: PairConfig(SITES, settings.witness_preferred, preferred_grace_ms=settings.grace_ms)}
            env.witness = WitnessCore(pairs, dict(env.witness_state))
            state = env.witness_state.get(PAIR, PairState())
            env.emit(f"witness restarts: {state.mode.name} e{state.epoch}" + (f" {state.holder}" if state.holder else ""))
        else:
            raise ScriptError(f"witness {action}: answer, fail, down, up, crash or restart")
    elif name == "hide":
        env.hidden.update(positional)
    elif name == "show":
        env.hidden.difference_update(positional)
    elif name == "wipe":
        site = site_arg()
        if site.alive:
            raise ScriptError("wipe: crash the site first")
        site.disk.wipe()
        env.emit(f"{site.name}: data directory wiped")
    elif name == "copy-disk":
        site = site_arg()
        site.copy = site.disk.image()
        env.emit(f"{site.name}: disk copied")
    elif name == "restore-disk":
        site = site_arg()
        if site.alive or site.copy is None:
            raise ScriptError("restore-disk: the site must be down and its disk copied before")
        site.disk.restore(site.copy)
        env.emit(f"{site.name}: disk restored from the copy")
    elif name == "state":
        show_state(env)
    elif name == "data":
        for site_name in site_names(env, positional):
            data = env.sites[site_name].disk.data()
            shown = " ".join(f"{k.decode()}={show_bytes(v)}" for k, (_, v) in sorted(data.items()) if v is not None)
            env.emit(f"{site_name}: {shown or '(empty)'}")
    elif name == "agree":
        show_agreement(env)
    elif name == "forge":
        # A message no correct peer sends (a protocol check's test): forge a->b Type field=int ...
        if len(positional) != 2:
            raise ScriptError("forge a->b MessageType field=value ...")
        sender = direction(positional[0])
        kind = getattr(msg, positional[1], None)
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            raise ScriptError(f"forge: no message type {positional[1]!r}")
        message = kind(**{key: int(value) for key, value in named.items()})
        receiver = env.sites[other(sender)]
        env.event(receiver, f"{sender}->{receiver.name} {show_message(message)} (forged)", ev.PeerSent(message))
    else:
        raise ScriptError(f"unknown command {name!r}")


def show_agreement(env: Env) -> None:
    """Whether both sites' stores hold the same visible values (and how many keys)."""
    data = {name: env.sites[name].disk.data() for name in SITES}
    visible = {name: {k: v for k, (_, v) in items.items() if v is not None} for name, items in data.items()}
    differ = sorted(key for key in set(visible["a"]) | set(visible["b"]) if visible["a"].get(key) != visible["b"].get(key))
    if not differ:
        env.emit(f"a and b agree on {len(visible['a'])} key(s)")
    for key in differ:
        env.emit(f"{key.decode()}: a={show_bytes(visible['a'].get(key))} b={show_bytes(visible['b'].get(key))}")


def show_state(env: Env) -> None:
    for name in SITES:
        site = env.sites[name]
        if site.core is None:
            env.emit(f"{name}: down")
        else:
            env.emit(f"{name}: {site.core.role.name} e{site.core.epoch}")
    state = env.witness_state.get(PAIR, PairState())
    env.emit(f"witness: {state.mode.name} e{state.epoch}" + (f" {state.holder}" if state.holder else ""))
    queued = [f"{s}->{other(s)} {len(q)}" + (" held" if s in env.held else "") for s, q in env.queues.items() if q]
    link = "up" if env.connected else "down"
    env.emit(f"connection {link}" + (", queued " + ", ".join(queued) if queued else ""))


# ================================================================ files


@dataclass
class Script:
    path: str
    items: list[str | Command]  # text lines kept as they are, and commands

    @property
    def commands(self) -> list[Command]:
        return [item for item in self.items if isinstance(item, Command)]


def parse_script(path: str, text: str) -> Script:
    lines = text.splitlines()
    items: list[str | Command] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip() or line.startswith("#"):
            items.append(line)
            index += 1
            continue
        if index + 1 >= len(lines) or lines[index + 1] != "----":
            raise ScriptError(f"{path}:{index + 1}: a command must be followed by a line '----'")
        start = index
        index += 2
        expected: list[str] = []
        while index < len(lines) and lines[index].strip():
            expected.append(lines[index])
            index += 1
        items.append(Command(start + 1, line.strip(), expected))
    if not items or not isinstance(items[0], str) or not items[0].startswith("#"):
        raise ScriptError(f"{path}:1: a script opens with '#' lines stating its goal")
    return Script(path, items)


def run_script(script: Script, extra_plants: frozenset[str] = frozenset()) -> list[list[str]]:
    """The actual trace of each command, in order. A command that cannot run ends the script
    with an `error:` line; an exception from a core shows as `panic:`."""
    env = Env(extra_plants)
    traces: list[list[str]] = []
    failed = False
    for command in script.commands:
        if failed:
            traces.append(["(not run)"])
            continue
        env.out = []
        try:
            run_command(env, command)
        except ScriptError as error:
            env.out.append(f"error: {error}")
            failed = True
        except Exception as error:  # a core's assertion or protocol error: the trace says so
            env.out.append(f"panic: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip())
            failed = True
        traces.append(env.out or ["ok"])
    return traces


def render(script: Script, traces: list[list[str]]) -> str:
    lines: list[str] = []
    traces_left = iter(traces)
    for item in script.items:
        if isinstance(item, str):
            lines.append(item)
        else:
            lines.append(item.text)
            lines.append("----")
            lines.extend(next(traces_left))
    return "\n".join(lines) + "\n"


def plants_caught(script: Script) -> list[str]:
    """`# catches: plant_a, plant_b` in the opening comment: the script fails with each on."""
    caught: list[str] = []
    for item in script.items:
        if isinstance(item, str) and item.startswith("# catches:"):
            caught.extend(p.strip() for p in item.split(":", 1)[1].split(",") if p.strip())
    return caught


def check_file(path: str, rewrite: bool = False, extra_plants: frozenset[str] = frozenset()) -> str:
    """'' when the script's traces are as written; else a unified diff (rewritten in place if asked)."""
    with open(path, encoding="utf-8") as stream:
        text = stream.read()
    script = parse_script(path, text)
    actual = render(script, run_script(script, extra_plants))
    if actual == text:
        return ""
    if rewrite:
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(actual)
    return "".join(difflib.unified_diff(text.splitlines(True), actual.splitlines(True), path, f"{path} (actual)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.interaction", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--rewrite", action="store_true", help="write the actual traces into the files (commit the diff only if you understand it)")
    parser.add_argument("--plant", action="append", default=[], help="run with a plant on (to see what a script catches)")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            diff = check_file(path, rewrite=args.rewrite, extra_plants=frozenset(args.plant))
        except ScriptError as error:
            print(f"{error}", file=sys.stderr)
            failed += 1
            continue
        except Exception:
            traceback.print_exc()
            failed += 1
            continue
        if diff:
            failed += 0 if args.rewrite else 1
            print(diff, end="")
            print(f"{path}: {'rewritten' if args.rewrite else 'differs'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
