"""The replicated write and read paths in one process: the core, the driver and the store, no network.

    .venv/bin/python -m benchmarks.bench_core [--rocks] [--seconds S] [--only NAME] [--profile NAME]

Two sites (`chaos.sim.manual.ManualSite`: the real `SiteCore`, `SiteDriver` and `BaseStore`, the
daemon's code paths without its I/O) are joined in SYNC; then each workload drives site a: a turn
is a number of client writes (or reads) stepped one after the other, as the daemon steps the calls
that arrive in one turn of its loop, then the messages and syncs of both sites until every write of
the turn is answered. The figures are CPU microseconds per acknowledged operation spent in each
site's code (`time.process_time` around every call into it), so they stand for the Python work per
operation that levers 2, 4 and 6 of issue 15 aim at (docs/performance.md), apart from gRPC, the
link, the event loop and the disk's fdatasync, which are not here. By default the store is the
simulator's (`MemoryEngine`); `--rocks` puts the real RocksDB store with its journal under both
sites (syncs are real fdatasyncs then, counted in the site that asks for them).

Compare two commits by running this in each checkout, alternated (the machine is shared and noisy);
`--profile NAME` prints the top functions of one workload (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chaos.sim.manual import ManualSite
from replicator.api import keys
from replicator.core import events as ev
from replicator.core.config import CoreConfig
from replicator.core.messages import Role
from replicator.core.records import Operation
from replicator.storage.rocks import Store

BLOCK_BYTES = 4096


class RocksDisk:
    """The real store on a directory, in the shape ManualSite expects of its disk."""

    def __init__(self, path: Path) -> None:
        self.store = Store.open(path)

    def sync(self) -> int:
        return self.store.sync()

    def value(self, key: bytes) -> bytes | None:
        version = self.store.get(key)
        return None if version is None else version.value


@dataclass
class Meter:
    """CPU seconds spent in each site's code."""

    cpu: dict[str, float] = field(default_factory=lambda: {"a": 0.0, "b": 0.0})

    def run(self, site: str, call: Callable[[], object]) -> None:
        started = time.process_time()
        try:
            call()
        finally:
            self.cpu[site] += time.process_time() - started


def config(site: str) -> CoreConfig:
    # Long timeouts: time does not pass in this benchmark, and no heartbeat is needed to keep the lease.
    return CoreConfig(site=site, peer="b" if site == "a" else "a", pair="p", preferred="a",
                      lease_ms=60_000, peer_timeout_ms=60_000, heartbeat_interval_ms=10_000)


class Pair:
    def __init__(self, directory: Path | None, hold: bool = True) -> None:
        self.sites: dict[str, ManualSite] = {}
        for name in "ab":
            site = ManualSite(name, config=config(name), wall=1_000)
            if directory is not None:
                site.disk = RocksDisk(directory / name)  # type: ignore[assignment]
            self.sites[name] = site
            site.start()
        for site in self.sites.values():
            assert site.driver is not None
            # As the daemon: the persists of a turn are one store write, flushed before the syncs.
            site.driver.hold_persists = hold
        self.meter = Meter()
        self.requests = 0
        for site in self.sites.values():
            site.now = 1.0
        for name in "ab":
            self.sites[name].step(ev.PeerConnected())
        self.settle()
        roles = {name: site.core.role for name, site in self.sites.items() if site.core is not None}
        if roles != {"a": Role.SYNC, "b": Role.SYNC}:
            raise SystemExit(f"bench_core: the pair did not reach SYNC: {roles}")
        # The read lease comes with the answer to a heartbeat: let one go and come back.
        for site in self.sites.values():
            site.now = 10_500.0
            site.step(ev.TimePassed())
        self.settle()

    def deliver(self, source: str, target: str) -> bool:
        sender, receiver = self.sites[source], self.sites[target]
        messages, sender.outbox = sender.outbox, []
        for message in messages:
            self.meter.run(target, lambda message=message: receiver.step(ev.PeerSent(message)))
        return bool(messages)

    def settle(self, done: Callable[[], bool] = lambda: False, rounds: int = 50) -> None:
        for _ in range(rounds):
            for name, site in self.sites.items():
                if site.driver is not None:
                    self.meter.run(name, site.driver.flush)
                self.meter.run(name, site.sync)
            moved = self.deliver("a", "b") | self.deliver("b", "a")
            if done() or not moved and not any(site.driver and site.driver.unsynced for site in self.sites.values()):
                return
        raise SystemExit("bench_core: a turn did not settle in 50 rounds")

    def write_turn(self, writes: list[tuple[Operation, ...]]) -> None:
        a = self.sites["a"]
        first = len(a.answers)
        for operations in writes:
            self.requests += 1
            event = ev.WriteRequested(self.requests, b"req-%d" % self.requests, operations)
            self.meter.run("a", lambda event=event: a.step(event))
        self.settle(lambda: len(a.answers) - first >= len(writes))
        answered = a.answers[first:]
        failed = [answer for answer in answered if not answer.ok]
        if failed:
            raise SystemExit(f"bench_core: a write failed: {failed[0]}")
        if len(answered) < len(writes):
            raise SystemExit(f"bench_core: {len(writes) - len(answered)} of {len(writes)} writes were never answered")

    def read_turn(self, read_keys: list[bytes]) -> int:
        a = self.sites["a"]
        assert a.driver is not None
        served: list[int] = []
        host_served = a.read_served

        def count(handle: int, key: bytes, version: object, error: object) -> None:
            served.append(handle)

        a.read_served = count  # type: ignore[method-assign]
        try:
            for key in read_keys:
                self.requests += 1
                event = ev.ReadRequested(self.requests, key)
                self.meter.run("a", lambda event=event: a.step(event))
        finally:
            a.read_served = host_served  # type: ignore[method-assign]
        if len(served) != len(read_keys):
            raise SystemExit(f"bench_core: {len(read_keys) - len(served)} reads were not served at once")
        return len(served)


def puts(per_turn: int, value_bytes: int) -> Callable[[Pair, int], int]:
    value = b"v" * value_bytes

    def run(pair: Pair, turn: int) -> int:
        base = turn * per_turn
        pair.write_turn([(Operation(b"key-%d" % ((base + i) % 4096), value),) for i in range(per_turn)])
        return per_turn

    return run


def block_writes(per_turn: int, write_bytes: int) -> Callable[[Pair, int], int]:
    data = bytes(range(256)) * (write_bytes // 256)
    blocks = write_bytes // BLOCK_BYTES

    def run(pair: Pair, turn: int) -> int:
        writes = []
        for i in range(per_turn):
            first = ((turn * per_turn + i) * blocks) % 8192
            writes.append(tuple(keys.block_puts(b"vol", 1, first, data, BLOCK_BYTES)))
        pair.write_turn(writes)
        return per_turn

    return run


def gets(per_turn: int) -> Callable[[Pair, int], int]:
    def run(pair: Pair, turn: int) -> int:
        if turn == 0:
            pair.write_turn([(Operation(b"read-%d" % i, b"r" * 4096),) for i in range(256)])
            pair.meter.cpu = {"a": 0.0, "b": 0.0}
        return pair.read_turn([b"read-%d" % ((turn * per_turn + i) % 256) for i in range(per_turn)])

    return run


WORKLOADS: dict[str, Callable[[Pair, int], int]] = {
    "put 4 KiB, 1 a turn": puts(1, 4096),
    "put 4 KiB, 8 a turn": puts(8, 4096),
    "put 4 KiB, 32 a turn": puts(32, 4096),
    "put 4 KiB, 256 a turn": puts(256, 4096),
    "block write 1 MiB, 1 a turn": block_writes(1, 1 << 20),
    "block write 1 MiB, 4 a turn": block_writes(4, 1 << 20),
    "get 4 KiB, 32 a turn": gets(32),
}


def measure(name: str, seconds: float, rocks: bool, hold: bool = True) -> tuple[int, dict[str, float]]:
    workload = WORKLOADS[name]
    with tempfile.TemporaryDirectory(prefix="bench-core-") as directory:
        pair = Pair(Path(directory) if rocks else None, hold)
        pair.meter.cpu = {"a": 0.0, "b": 0.0}
        operations = 0
        turn = 0
        deadline = time.process_time() + seconds
        while time.process_time() < deadline:
            operations += workload(pair, turn)
            turn += 1
        for site in pair.sites.values():
            if site.driver is not None:
                site.driver.close()
            if isinstance(site.disk, RocksDisk):
                site.disk.store.close()
        return operations, dict(pair.meter.cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rocks", action="store_true", help="the real RocksDB store under both sites")
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per workload (default 3)")
    parser.add_argument("--only", action="append", choices=sorted(WORKLOADS), help="run only these workloads")
    parser.add_argument("--profile", choices=sorted(WORKLOADS), help="print cProfile's top functions of one workload")
    parser.add_argument("--no-hold", action="store_true",
                        help="write each step's persists at its end, not a turn's at once (SiteDriver.hold_persists)")
    args = parser.parse_args(argv)
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        measure(args.profile, args.seconds, args.rocks, not args.no_hold)
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())
        return 0
    store = "RocksDB" if args.rocks else "memory"
    print(f"| workload ({store} store) | operations | CPU us per op, site a | site b |")
    print("|---|---|---|---|")
    for name in args.only or list(WORKLOADS):
        operations, cpu = measure(name, args.seconds, args.rocks, not args.no_hold)
        print(f"| {name} | {operations:,} | {cpu['a'] / operations * 1e6:,.1f} | {cpu['b'] / operations * 1e6:,.1f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
