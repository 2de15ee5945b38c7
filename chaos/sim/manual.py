"""Sites driven by hand, step by step, through the one SiteDriver (tests and scenarios).

A `ManualSite` keeps what its core sends and asks (`outbox`, `asks`) until a test delivers it,
steps a loaded resync batch and a failed write at once, and makes its simulated disk durable on
`sync` (a `crash` loses what was not synced). Every action goes through `replicator.driver`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from chaos.sim.disk import SimDisk
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.config import CoreConfig
from replicator.core.site import SiteCore
from replicator.core.witness import WitnessCore, WitnessPersisted, WitnessReply, WitnessRequested
from replicator.driver import Host, SiteDriver, recover


@dataclass
class ManualSite(Host):
    """One site driven by hand through the one SiteDriver: what it sends and asks is kept in
    `outbox` and `asks` until a test delivers it; its disk is durable on `sync`."""

    name: str
    plants: frozenset[str] = frozenset()
    disk: SimDisk = field(default_factory=SimDisk)
    core: SiteCore | None = None
    driver: SiteDriver | None = None
    outbox: list[msg.PeerMessage] = field(default_factory=list)
    asks: list[msg.WitnessRequest] = field(default_factory=list)
    answers: list[ev.AnswerWrite] = field(default_factory=list)
    now: float = 0.0
    message_bytes_max: int = CoreConfig.__dataclass_fields__["message_bytes_max"].default
    settings: dict[str, Any] = field(default_factory=dict)  # more CoreConfig fields
    wall: int = 0
    trace: list[ev.Action] | None = None  # when a list: every action executed here
    config: CoreConfig | None = None  # instead of the settings above

    def start(self) -> None:
        config = CoreConfig(
            site=self.name,
            peer="b" if self.name == "a" else "a",
            pair="p",
            preferred="a",
            lease_ms=1000,
            peer_timeout_ms=500,
            heartbeat_interval_ms=100,
            message_bytes_max=self.message_bytes_max,
            plants=self.plants,
        )
        if self.settings:
            config = dataclasses.replace(config, **self.settings)
        if self.config is not None:
            config = self.config
        self.core = SiteCore(config, recover(self.disk.store, lambda: self.name.encode() * 4))
        self.driver = SiteDriver(self.core, self.disk.store, self, self, self, self)
        self.driver.trace = self.trace
        self.driver.start()
        self.sync()

    def step(self, event: ev.Event) -> None:
        assert self.driver is not None
        self.driver.step(event)

    # the driver's ports
    def mono_ms(self) -> float:
        return self.now

    def wall_ms(self) -> int:
        return self.wall

    def send(self, message: msg.PeerMessage) -> None:
        self.outbox.append(message)

    def drop(self, reason: str) -> None:
        pass

    def ask(self, request: msg.WitnessRequest) -> None:
        self.asks.append(request)

    def later(self, driver: SiteDriver, event: ev.Event) -> None:
        driver.step(event)

    def resync_loaded(self, driver: SiteDriver, request: ev.LoadResyncBatch, loaded: ev.ResyncBatchLoaded) -> None:
        driver.step(loaded)

    def write_answered(self, answer: ev.AnswerWrite) -> None:
        self.answers.append(answer)

    def sync(self) -> None:
        if self.driver is not None and self.driver.unsynced:
            self.driver.durable(self.disk.sync())

    def crash(self) -> None:
        self.disk.crash()
        if self.driver is not None:
            self.driver.close()
        self.core = None
        self.driver = None
        self.outbox.clear()

    def value(self, key: bytes) -> bytes | None:
        return self.disk.value(key)


def deliver(source: ManualSite, target: ManualSite, keep: type | None = None) -> None:
    """Deliver everything `source` sent, except messages of type `keep` (held back, lost)."""
    messages, source.outbox = source.outbox, []
    for message in messages:
        if keep is not None and isinstance(message, keep):
            continue
        target.step(ev.PeerSent(message))


def settle(a: ManualSite, b: ManualSite, rounds: int = 30) -> None:
    for _ in range(rounds):
        a.sync()
        b.sync()
        deliver(a, b)
        deliver(b, a)


def ask_witness(site: ManualSite, witness: WitnessCore) -> None:
    requests, site.asks = site.asks, []
    for request in requests:
        actions = witness.step(WitnessRequested(1, request), site.now)
        persisted = [x.persist_id for x in actions if hasattr(x, "persist_id")]
        if persisted:
            actions += witness.step(WitnessPersisted(max(persisted)), site.now)
        for action in actions:
            if isinstance(action, WitnessReply):
                site.step(ev.WitnessAnswered(request, action.answer))


def connect(a: ManualSite, b: ManualSite) -> None:
    a.step(ev.PeerConnected())
    b.step(ev.PeerConnected())
    settle(a, b)


