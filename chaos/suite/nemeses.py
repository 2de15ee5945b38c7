"""The nemeses: each episode injects a fault, holds it, then heals it.

A nemesis is made per episode from the run's seeded generator (victim,
direction, duration are drawn then), so a seed replays the same schedule.
`resources` says what an episode touches: episodes run together (the random
mix) only when their resources are disjoint, and an `exclusive` one (wipe,
restore) always runs alone: wiping a site while the other one is also failing
would lose data for a reason no replication could prevent.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from typing import Any

from chaos.suite.harness import LINKS, SITES, WITNESS, Deployment
from replicator.transport.faultproxy import BOTH, DOWN, UP

LEASE_S = 1.0  # the launcher's lease_ms (replicator.local.DEMO_SITE_SETTINGS)


class Nemesis:
    name = "?"
    exclusive = False
    description = ""

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        self.rng = rng
        self.hold_s = hold_s
        self.victim = ""
        self.detail: dict[str, Any] = {}
        self.stop = threading.Event()

    @property
    def resources(self) -> frozenset[str]:
        return frozenset({f"site:{self.victim}"})

    def inject(self, d: Deployment) -> None:
        raise NotImplementedError

    def hold(self, d: Deployment) -> None:
        """Keep the fault for hold_s (an active nemesis does more in the meantime)."""
        self.stop.wait(self.hold_s)

    def heal(self, d: Deployment) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        victim = {"victim": self.victim} if self.victim else {}
        return {"nemesis": self.name, **victim, "hold_s": round(self.hold_s, 2), **self.detail}


def _site(rng: random.Random) -> str:
    return rng.choice(SITES)


class Kill(Nemesis):
    name = "kill"
    description = "SIGKILL one site, restart it after the hold"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.victim = _site(rng)

    def inject(self, d: Deployment) -> None:
        d.kill(self.victim)

    def heal(self, d: Deployment) -> None:
        d.start(self.victim)


class RestartLoop(Kill):
    name = "restart-loop"
    description = "SIGKILL one site again and again, each time soon after it restarted"

    def hold(self, d: Deployment) -> None:
        deadline = time.monotonic() + self.hold_s
        cycles = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.stop.wait(self.rng.uniform(0.2, 1.0))
            d.start(self.victim, wait=self.rng.random() < 0.5)
            self.stop.wait(self.rng.uniform(0.2, 2.0))
            d.kill(self.victim)
            cycles += 1
        self.detail["cycles"] = cycles


class Pause(Nemesis):
    name = "pause"
    description = "SIGSTOP one site for longer than the lease, then SIGCONT"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, max(hold_s, 2.5 * LEASE_S))
        self.victim = _site(rng)

    def inject(self, d: Deployment) -> None:
        d.pause(self.victim)

    def heal(self, d: Deployment) -> None:
        d.resume(self.victim)


class KillBoth(Nemesis):
    name = "kill-both"
    description = "SIGKILL both sites at once, restart both"

    @property
    def resources(self) -> frozenset[str]:
        return frozenset({"site:a", "site:b"})

    def inject(self, d: Deployment) -> None:
        for site in SITES:
            d.expected_down.add(site)
            d.cluster.send_signal(site, signal.SIGKILL)
        for site in SITES:
            d.kill(site)  # waits for the exit

    def heal(self, d: Deployment) -> None:
        for site in SITES:
            d.start(site, wait=False)
        for site in SITES:
            d.cluster.wait_healthy(site)


class _LinkNemesis(Nemesis):
    link = "site"

    @property
    def resources(self) -> frozenset[str]:
        return frozenset({f"link:{self.link}"})

    def heal(self, d: Deployment) -> None:
        # A real partition that lasts kills the TCP connections; bytes swallowed by a black hole
        # would otherwise leave a gap in a live stream. Cut, then let the ends reconnect.
        d.proxy(self.link, lambda p: (p.heal(), p.cut()))


class PartitionClose(_LinkNemesis):
    name = "partition-close"
    description = "cut the site link and refuse new connections (clean close)"

    def inject(self, d: Deployment) -> None:
        d.proxy(self.link, lambda p: (p.set_refuse(True), p.cut()))


class PartitionBlackhole(_LinkNemesis):
    name = "partition-blackhole"
    description = "the site link swallows every byte both ways; connections stay open"

    def inject(self, d: Deployment) -> None:
        d.proxy(self.link, lambda p: p.set_blackhole(True, BOTH))


class PartitionOneWay(_LinkNemesis):
    name = "partition-oneway"
    description = "the site link swallows every byte one way (a->b or b->a)"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.direction = rng.choice((UP, DOWN))
        self.detail["direction"] = "a->b" if self.direction is UP else "b->a"

    def inject(self, d: Deployment) -> None:
        d.proxy(self.link, lambda p: p.set_blackhole(True, self.direction))


class WitnessCut(_LinkNemesis):
    name = "witness-cut"
    description = "one site cut off from the witness (refused, or black hole)"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.victim = _site(rng)
        self.link = f"witness-{self.victim}"
        self.mode = rng.choice(("refuse", "blackhole"))
        self.detail["mode"] = self.mode

    def inject(self, d: Deployment) -> None:
        if self.mode == "refuse":
            d.proxy(self.link, lambda p: (p.set_refuse(True), p.cut()))
        else:
            d.proxy(self.link, lambda p: p.set_blackhole(True, BOTH))


class Isolate(Nemesis):
    name = "isolate"
    description = "one site cut off from its peer and from the witness (black holes), its own clients still reach it"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.victim = _site(rng)
        self.links = ("site", f"witness-{self.victim}")

    @property
    def resources(self) -> frozenset[str]:
        return frozenset({f"link:{link}" for link in self.links})

    def inject(self, d: Deployment) -> None:
        for link in self.links:
            d.proxy(link, lambda p: p.set_blackhole(True, BOTH))

    def heal(self, d: Deployment) -> None:
        for link in self.links:
            d.proxy(link, lambda p: (p.heal(), p.cut()))


class WitnessKill(Nemesis):
    name = "witness-kill"
    description = "SIGKILL the witness, restart it after the hold"

    @property
    def resources(self) -> frozenset[str]:
        return frozenset({"witness"})

    def inject(self, d: Deployment) -> None:
        d.kill(WITNESS)

    def heal(self, d: Deployment) -> None:
        d.start(WITNESS)


class LinkDelay(_LinkNemesis):
    name = "link-delay"
    description = "added latency on one link (site, a or b to the witness, clients to a or b)"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.link = rng.choice(LINKS)
        self.delay_ms = rng.choice((10, 50, 200, 600))
        self.detail.update(link=self.link, delay_ms=self.delay_ms)

    def inject(self, d: Deployment) -> None:
        d.proxy(self.link, lambda p: p.set_delay_ms(self.delay_ms, BOTH))

    def heal(self, d: Deployment) -> None:
        d.proxy(self.link, lambda p: p.heal())


class LinkThrottle(LinkDelay):
    name = "link-throttle"
    description = "bandwidth limit on one link"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.rate = rng.choice((2_000, 20_000, 200_000))
        self.detail = {"link": self.link, "bytes_per_second": self.rate}

    def inject(self, d: Deployment) -> None:
        d.proxy(self.link, lambda p: p.set_throttle(self.rate, BOTH))


class LinkCorrupt(_LinkNemesis):
    name = "link-corrupt"
    description = "bit flips on the site link (CRC32C-framed); gRPC links carry no checksum of their own"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.probability = rng.choice((0.01, 0.05, 0.2))
        self.detail["probability"] = self.probability

    def inject(self, d: Deployment) -> None:
        def corrupt(p: Any) -> None:
            p.corrupt_next(BOTH)
            p.set_corrupt_probability(self.probability, BOTH)

        d.proxy(self.link, corrupt)

    def heal(self, d: Deployment) -> None:
        d.proxy(self.link, lambda p: p.heal())
        self.detail["corruptions"] = d.proxy(self.link, lambda p: p.stats.corruptions)


class StorageFault(Nemesis):
    name = "fsync-fail"
    description = "the next fsync of one site fails (EIO): the site must stop, then it is restarted"
    words = "fail_next_sync"
    exit_wait_s = 15.0

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.victim = _site(rng)

    def inject(self, d: Deployment) -> None:
        d.expected_down.add(self.victim)
        d.storage_fault(self.victim, self.words)

    def hold(self, d: Deployment) -> None:
        started = time.monotonic()
        while d.running(self.victim) and time.monotonic() - started < self.exit_wait_s and not self.stop.is_set():
            time.sleep(0.05)
        stopped = not d.running(self.victim)
        self.detail["fail_stopped"] = stopped
        self.detail["exit_after_s"] = round(time.monotonic() - started, 2) if stopped else None
        if stopped:
            process = d.cluster.processes[self.victim]
            self.detail["exit_code"] = process.popen.poll() if process.popen is not None else None
        self.stop.wait(max(0.0, self.hold_s - (time.monotonic() - started)))

    def heal(self, d: Deployment) -> None:
        d.storage_fault(self.victim, "")
        if d.running(self.victim):
            # It never synced (or ignored the fault): restart it anyway, fault cleared.
            d.kill(self.victim)
        d.start(self.victim)


class DiskFull(StorageFault):
    name = "disk-full"
    description = "one site's disk is full (ENOSPC on every write and sync): it must stop, then restarts"
    words = "disk_full"


class Wipe(Kill):
    name = "wipe"
    exclusive = True
    description = "SIGKILL one site, delete its data directory, restart it (full resync)"

    def inject(self, d: Deployment) -> None:
        d.kill(self.victim)
        d.wipe(self.victim)


class Restore(Kill):
    name = "restore"
    exclusive = True  # the restored site's peer holds what it lacks: nothing else may fail meanwhile
    description = (
        "SIGKILL one site, copy its data directory, restart it; after the hold (writes go on) SIGKILL it, "
        "put the older copy back, restart it (it must be detected and get a full resync)"
    )

    def inject(self, d: Deployment) -> None:
        d.kill(self.victim)
        d.copy_data(self.victim, self._copy(d))
        d.start(self.victim)

    def heal(self, d: Deployment) -> None:
        d.kill(self.victim)
        d.restore_data(self.victim, self._copy(d))
        d.start(self.victim)

    def _copy(self, d: Deployment) -> Any:
        return d.directory / f"restore-copy-{self.victim}"


class DelayKill(Nemesis):
    name = "delay-kill"
    description = "200 ms added on the site link (records and acks in flight for that long), then SIGKILL a site"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.victim = _site(rng)
        self.delay_ms = rng.choice((100, 200))
        self.detail["delay_ms"] = self.delay_ms

    @property
    def resources(self) -> frozenset[str]:
        return frozenset({f"site:{self.victim}", "link:site"})

    def inject(self, d: Deployment) -> None:
        d.proxy("site", lambda p: p.set_delay_ms(self.delay_ms, BOTH))
        time.sleep(1.0)
        d.kill(self.victim)

    def heal(self, d: Deployment) -> None:
        d.proxy("site", lambda p: (p.heal(), p.cut()))
        d.start(self.victim)


class ReconcileCrash(Nemesis):
    name = "reconcile-crash"
    description = (
        "one site's disk turns slow, the site link is cut for a moment (the pair reconciles in the same epoch), "
        "the slow site is SIGKILLed before its reconcile records are durable and restarted"
    )

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, min(hold_s, 1.0))
        self.victim = _site(rng)
        self.slow_ms = rng.choice((300, 600))
        self.kill_after_ms = round(rng.uniform(20, self.slow_ms / 2))
        self.detail.update(slow_sync_ms=self.slow_ms, kill_after_ms=self.kill_after_ms)

    @property
    def resources(self) -> frozenset[str]:
        return frozenset({f"site:{self.victim}", "link:site"})

    def inject(self, d: Deployment) -> None:
        log = d.log_path(self.victim)
        offset = log.stat().st_size if log.exists() else 0
        d.storage_fault(self.victim, f"slow_sync_ms={self.slow_ms}")
        time.sleep(0.2)  # the storage polls its control file at each sync
        d.proxy("site", lambda p: p.cut())
        reconciled = _wait_for_log(log, offset, '"new":"RECONCILE"', timeout_s=3.0)
        self.detail["reconcile_seen"] = reconciled
        time.sleep(self.kill_after_ms / 1000)
        d.kill(self.victim)
        d.storage_fault(self.victim, "")

    def heal(self, d: Deployment) -> None:
        d.storage_fault(self.victim, "")
        d.start(self.victim)


class ResyncCrash(Nemesis):
    name = "resync-crash"
    description = (
        "a site with a slow disk is SIGKILLed (its last commits not yet applied durably), restarted once the "
        "other went on alone, and the resync source is SIGKILLed mid-resync, then restarted"
    )

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.victim = _site(rng)
        self.source = next(s for s in SITES if s != self.victim)
        self.kill_after_ms = round(rng.uniform(0, 200))
        # Kill the source as it starts the resync, or just as the witness moved the pair back to SYNC
        # (the target, on its slow disk, has not made the end of the resync durable yet).
        self.trigger = rng.choice(("RESYNC_SOURCE", "SYNC", "SYNC"))
        if self.trigger == "SYNC":
            self.kill_after_ms = 0
        self.detail.update(source=self.source, trigger=self.trigger, kill_source_after_ms=self.kill_after_ms)

    @property
    def resources(self) -> frozenset[str]:
        return frozenset({"site:a", "site:b"})

    def inject(self, d: Deployment) -> None:
        d.storage_fault(self.victim, "slow_sync_ms=300")
        time.sleep(0.5)
        d.kill(self.victim)
        time.sleep(2.0 * LEASE_S + 0.5)  # the source is granted and goes on alone
        log = d.log_path(self.source)
        offset = log.stat().st_size if log.exists() else 0
        d.start(self.victim, wait=False)
        self.detail["trigger_seen"] = _wait_for_log(log, offset, f'"new":"{self.trigger}"', timeout_s=15.0)
        time.sleep(self.kill_after_ms / 1000)
        d.kill(self.source)

    def heal(self, d: Deployment) -> None:
        d.storage_fault(self.victim, "")
        d.start(self.source)
        d.start(self.victim)


def _wait_for_log(path: Any, offset: int, needle: str, timeout_s: float) -> bool:
    """Poll a process's log from `offset` until a line contains `needle`."""
    deadline = time.monotonic() + timeout_s
    tail = ""
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as stream:
                stream.seek(offset)
                chunk = stream.read()
        except OSError:
            chunk = b""
        offset += len(chunk)
        tail = (tail + chunk.decode("utf-8", errors="replace"))[-4096:]
        if needle in tail:
            return True
        time.sleep(0.002)
    return False


class ClockJump(Nemesis):
    name = "clock-jump"
    description = "one site's wall clock steps forward or back (as a bad NTP step), then steps back to true time"

    def __init__(self, rng: random.Random, hold_s: float) -> None:
        super().__init__(rng, hold_s)
        self.victim = _site(rng)
        self.offset_ms = rng.choice((-120_000, -30_000, -5_000, 5_000, 30_000, 120_000))
        self.detail["offset_ms"] = self.offset_ms

    def inject(self, d: Deployment) -> None:
        d.clock_offset(self.victim, self.offset_ms)

    def heal(self, d: Deployment) -> None:
        d.clock_offset(self.victim, 0)


NEMESES: dict[str, type[Nemesis]] = {
    cls.name: cls
    for cls in (
        Kill,
        RestartLoop,
        Pause,
        PartitionClose,
        PartitionBlackhole,
        PartitionOneWay,
        Isolate,
        WitnessCut,
        WitnessKill,
        KillBoth,
        LinkDelay,
        LinkThrottle,
        LinkCorrupt,
        StorageFault,
        DiskFull,
        Wipe,
        Restore,
        ClockJump,
        DelayKill,
        ReconcileCrash,
        ResyncCrash,
    )
}


def make(name: str, rng: random.Random, hold_s: float) -> Nemesis:
    try:
        return NEMESES[name](rng, hold_s)
    except KeyError:
        raise ValueError(f"unknown nemesis {name!r}; known: {', '.join(NEMESES)}") from None


def compatible(group: list[Nemesis], candidate: Nemesis) -> bool:
    if candidate.exclusive or any(n.exclusive for n in group):
        return not group
    used = frozenset().union(*(n.resources for n in group)) if group else frozenset()
    return not (used & candidate.resources)
