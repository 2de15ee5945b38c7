"""One simulated run: workload, faults, heal, checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chaos.checkers import convergence, linearizability, lost_writes, split_brain
from chaos.sim.world import MS, SITES, SimParams, SiteProcess, World, make_operations, other
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.errors import ProtocolError
from replicator.core.messages import Role

FAULTS = (
    "crash",
    "crash_both",
    "partition",
    "witness_partition",
    "witness_crash",
    "pause",
    "clock_jump",
    "fsync_failure",
    "disk_full",
    "wipe",
    "reset",
    "crash_in_reconcile",
    "crash_in_resync",
    "crash_after_peer_records",
    "restore_old_disk",
)


@dataclass
class RunResult:
    seed: int
    ok: bool
    violations: list[str] = field(default_factory=list)
    converged: bool = True
    operations: int = 0
    acknowledged_writes: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    liveness_ms: float = 0.0
    protocol_errors: int = 0
    reordered_deliveries: int = 0
    trace_tail: list[str] = field(default_factory=list)


class Client:
    def __init__(self, world: World, number: int) -> None:
        self.world = world
        self.number = number
        self.generation = 0
        self.count = 0
        self.home = world.rng.choice(SITES)
        self.stop_us = 0

    @property
    def process(self) -> int:
        return self.number * 1000 + self.generation

    def run(self) -> None:
        if self.world.now_us >= self.stop_us:
            return
        world = self.world
        rng = world.rng
        self.count += 1
        # Hot keys conflict; cold keys are rarely overwritten, so a lost or
        # stale value stays visible long enough for the checkers to see it.
        hot = max(1, world.params.keys // 3)
        key = f"k{rng.randrange(hot) if rng.random() < 0.7 else rng.randrange(hot, world.params.keys)}"
        roll = rng.random()
        f = "read" if roll < 0.5 else "write" if roll < 0.9 else "delete"
        value = f"v{self.number}-{self.count}" if f == "write" else None
        items: list[tuple[str, str | None]] = [(key, value)]
        if value is not None:
            items = self.sized(key, value)
        # A batch is one atomic write of several keys; the checkers see one write per key (each
        # key's register on its own), made by processes of their own with the batch's times.
        handles = [
            world.history.invoke(self.process if len(items) == 1 else f"{self.process}.{index}", f, k, v, time=world.now_us * 1000)
            for index, (k, v) in enumerate(items)
        ]
        if len(items) > 1:
            value = f"batch of {len(items)}: " + " ".join(k for k, _ in items)
        world.operations += 1
        request_id = f"c{self.number}-{self.count}".encode()
        state: dict[str, Any] = {"unknown": False, "done": False, "attempt": 0}
        site = self.home if rng.random() < 0.8 else other(self.home)

        def finish(status: str, read_value: Any = None) -> None:
            state["done"] = True
            if world.verbose:
                world.trace(
                    f"client p{self.process} {f} {key} {value or ''} -> {status} {read_value if f == 'read' else ''}"
                    f" (attempts {state['attempt']}, last at {state.get('site')})"
                )
            now_ns = world.now_us * 1000
            for handle in handles:
                if status == "ok":
                    if f == "read":
                        world.history.ok(handle, read_value, time=now_ns)
                    else:
                        world.history.ok(handle, time=now_ns)
                elif status == "fail":
                    world.history.fail(handle, time=now_ns)
                else:
                    world.history.info(handle, time=now_ns)
            if status == "ok" and f != "read":
                world.acknowledged_writes += 1
            elif status == "info":
                self.generation += 1  # the info op stays open: go on as a new process
            world.after(rng.randint(1, 30) * MS, self.run)

        def attempt(target: str) -> None:
            state["attempt"] += 1
            state["site"] = target
            answered = [False]

            def on_answer(answer: Any) -> None:
                if answered[0] or state["done"]:
                    return
                answered[0] = True
                if isinstance(answer, tuple):
                    finish("ok", answer[1].decode() if answer[1] is not None else None)
                    return
                if isinstance(answer, ev.AnswerWrite) and answer.ok:
                    finish("ok")
                    return
                error = answer.error
                if error == "invalid":
                    # Every write of the workload is within the clients' limits, which fit the cores'
                    # byte bound: a core refusing one has its sizes wrong.
                    world.refused_writes.append(f"{f} of {value} at {target}: {answer.message}")
                definite = error in ("unavailable", "overloaded", "connection", "invalid")
                if f != "read" and not definite:
                    state["unknown"] = True
                retry(target, same_site=not definite and f != "read")

            def on_timeout() -> None:
                if answered[0] or state["done"]:
                    return
                answered[0] = True
                if f != "read":
                    state["unknown"] = True
                # A write that timed out may still be on its way to the other
                # site: retry where it was sent (see docs/protocol.md, retries).
                retry(target, same_site=f != "read")

            if f == "read":
                world.submit(target, lambda h: ev.ReadRequested(h, key.encode()), on_answer)
            else:
                ops = make_operations(items)
                world.submit(target, lambda h: ev.WriteRequested(h, request_id, ops), on_answer)
            world.after(world.params.client_timeout_ms * MS, on_timeout)

        def retry(last: str, same_site: bool = False) -> None:
            if state["unknown"] and not world.params.retry_unknown_writes:
                finish("info")
                return
            if state["attempt"] >= 6 or world.now_us >= self.stop_us:
                finish("info" if state["unknown"] else "fail")
                return
            target = last if same_site else other(last)
            world.after(rng.randint(50, 300) * MS, lambda: attempt(target))

        attempt(site)

    def sized(self, key: str, value: str) -> list[tuple[str, str | None]]:
        """A write's keys and values: mostly the one small value, else a large value or a batch,
        up to the clients' limits (SimParams.object_bytes_max, batch_items_max, batch_bytes_max)
        and at times exactly at them. Drawn from the world's size stream only, so that without
        sizes (SMALL_VALUES) a seed keeps the schedule it had before sizes were simulated."""
        params = self.world.params
        sizes = self.world.size_rng
        if params.batch_fraction and sizes.random() < params.batch_fraction:
            at_limit = sizes.random() < params.at_limit_fraction
            count = min(params.batch_items_max if at_limit else sizes.randint(2, params.batch_items_max), params.keys)
            others = sizes.sample([f"k{n}" for n in range(params.keys) if f"k{n}" != key], count - 1)
            keys = [key, *others]
            values = [f"{value}.{index}" for index in range(count)]
            floor = sum(len(k) + len(v) for k, v in zip(keys, values, strict=True))
            total = params.batch_bytes_max if at_limit else sizes.randint(floor, max(floor, params.batch_bytes_max))
            share, rest = divmod(max(0, total - floor), count)
            return [(k, padded(v, share + int(index < rest))) for index, (k, v) in enumerate(zip(keys, values, strict=True))]
        if params.large_value_fraction and sizes.random() < params.large_value_fraction:
            at_limit = sizes.random() < params.at_limit_fraction
            size = params.object_bytes_max if at_limit else sizes.randint(len(value) + 1, params.object_bytes_max)
            return [(key, padded(value, size - len(value)))]
        return [(key, value)]


def padded(value: str, extra: int) -> str:
    """`value` made `extra` characters longer (`v1-7:xxxx`), so it stays unique and readable."""
    return value + (":" + "x" * (extra - 1) if extra > 0 else "")


class FaultInjector:
    def __init__(self, world: World) -> None:
        self.world = world
        self.until_us = 0
        self.held_for: str | None = None  # a restored site that has not met its peer yet
        self.held_until_us = 0

    def count(self, name: str) -> None:
        self.world.faults_injected[name] = self.world.faults_injected.get(name, 0) + 1

    def loop(self) -> None:
        world = self.world
        if world.now_us >= self.until_us:
            return
        rng = world.rng
        weights = world.params.fault_weights
        if weights is None:
            fault = rng.choice(FAULTS)
        else:
            fault = rng.choices([name for name, _ in weights], [weight for _, weight in weights])[0]
        if self.held():
            world.trace(f"FAULT {fault} held: a restored site has not met its peer yet")
        else:
            self.inject(fault)
        world.after(rng.randint(*world.params.fault_interval_ms) * MS, self.loop)

    def restart_later(self, name: str, low_ms: int, high_ms: int, wipe: bool = False) -> None:
        world = self.world
        site = world.sites[name]

        def restart() -> None:
            if not site.alive:
                if wipe:
                    world.trace(f"{name} data directory wiped")
                    site.disk.wipe()
                site.disk.full = False
                site.start()

        world.after(world.rng.randint(low_ms, high_ms) * MS, restart)

    def held(self) -> bool:
        """Whether faults wait for a restored site to meet its peer (see restore_old_disk_later)."""
        if self.held_for is None:
            return False
        core = self.world.sites[self.held_for].core
        met = core is not None and (
            core.snapshot().peer_generation == b"" or core.role in (Role.RESYNC_TARGET, Role.SYNC, Role.RECONCILE)
        )
        if met or self.world.now_us >= self.held_until_us:
            self.held_for = None
            return False
        return True

    def restore_old_disk_later(self, name: str) -> None:
        """An operator's rollback: copy the site's disk now (what it holds durably, as a backup or
        a storage snapshot would), and later stop the site, put the copy back and start it again.

        The copy goes back only while the pair is settled (both SYNC, nothing in flight, the
        witness agrees): the peer then holds every acknowledged write, so none may be lost,
        although the restored site lacks what was written since the copy (it must get a full
        resync, plant skip_rollback_check)."""
        world = self.world
        site = world.sites[name]
        copy = site.disk.image()
        world.trace(f"{name} disk copied (epoch {copy.meta('epoch') or 1})")
        attempts = [0]

        def restore() -> None:
            if self.held_for is None and settled_pair(world) and no_fault_active(world) and site.alive:
                world.trace(f"{name} stopped, its disk restored from the older copy")
                site.crash("stopped to restore an older copy of its disk")
                site.disk.restore(copy)
                # The operator restores a site of a healthy pair: no other fault until the restored
                # site has met its peer (the fact that its disk is old lives at the peer only; the
                # witness does not hold it, docs/design.md "A disk restored from an older copy").
                self.held_for = name
                self.held_until_us = world.now_us + 15_000 * MS
                self.restart_later(name, 50, 1500)
            elif attempts[0] < 20:
                attempts[0] += 1
                world.after(200 * MS, restore)

        world.after(world.rng.randint(500, 4000) * MS, restore)

    def inject(self, fault: str) -> None:
        world = self.world
        rng = world.rng
        name = rng.choice(SITES)
        site = world.sites[name]
        world.trace(f"FAULT {fault} on {name}")
        self.count(fault)
        if fault == "crash" and site.alive:
            site.crash("kill -9")
            self.restart_later(name, 50, 2500)
        elif fault == "crash_both":
            for each in SITES:
                world.sites[each].crash("kill -9 (both)")
                self.restart_later(each, 50, 2500)
        elif fault == "wipe" and settled_pair(world):
            # Only a site whose peer holds everything: wiping both loses data, whatever the protocol.
            site.crash("kill -9 before wipe")
            self.restart_later(name, 200, 2000, wipe=True)
        elif fault == "partition":
            directions = [("a", "b"), ("b", "a")]
            if rng.random() < 0.3:
                directions = [rng.choice(directions)]
            for direction in directions:
                world.links[direction] = "blackhole"
            if rng.random() < 0.5:
                world.reset_connection()
            duration = rng.randint(100, 4000)

            def heal_link(ds: list[tuple[str, str]] = directions) -> None:
                for d in ds:
                    world.links.pop(d, None)

            world.after(duration * MS, heal_link)
        elif fault == "witness_partition":
            for direction in ((name, "w"), ("w", name)):
                world.links[direction] = "blackhole"
            world.after(rng.randint(100, 4000) * MS, lambda: [world.links.pop(d, None) for d in ((name, "w"), ("w", name))])
        elif fault == "witness_crash":
            world.witness.crash()

            def restart_witness() -> None:
                if not world.witness.alive:
                    world.witness.start()

            world.after(rng.randint(100, 4000) * MS, restart_witness)
        elif fault == "pause" and site.alive:
            duration = rng.randint(50, 2500)
            site.paused_until_us = world.now_us + duration * MS
            incarnation = site.incarnation

            def resume() -> None:
                if site.incarnation == incarnation and site.alive:
                    site.paused_until_us = 0
                    site.resume()

            world.after(duration * MS, resume)
        elif fault == "clock_jump":
            site.wall_offset_ms += rng.randint(-5000, 5000)
        elif fault == "fsync_failure" and site.alive:
            site.disk.fail_next_sync = True
            self.restart_later(name, 500, 3000)
        elif fault == "disk_full" and site.alive:
            site.disk.full = True
            self.restart_later(name, 500, 3000)
        elif fault == "reset":
            world.reset_connection()
        elif fault == "restore_old_disk" and site.alive:
            self.restore_old_disk_later(name)
        elif fault == "crash_after_peer_records":
            # Crash a site right after it took the peer's reconcile shipment, before its disk made
            # it durable: the peer must not have counted on it (plant reconcile_early).
            def crash_now(victim: SiteProcess) -> None:
                victim.crash("kill -9 right after the peer's reconcile records")
                self.restart_later(victim.name, 50, 1500)

            world.message_triggers[msg.ReconcileDone] = crash_now
            world.reset_connection()
        elif fault in ("crash_in_reconcile", "crash_in_resync"):
            # The next time a site enters the role, one of the two crashes a moment later.
            role = Role.RECONCILE if fault == "crash_in_reconcile" else Role.RESYNC_TARGET

            def arm(entered: str) -> None:
                victim = world.sites[rng.choice(SITES)]
                incarnation = victim.incarnation

                def crash() -> None:
                    if victim.alive and victim.incarnation == incarnation:
                        victim.crash(f"kill -9 during {role.name}")
                        self.restart_later(victim.name, 50, 1500)

                world.after(rng.randint(0, 4000), crash)

            world.role_triggers[role] = arm
            world.reset_connection()


def settled(world: World) -> bool:
    cores = [site.core for site in world.sites.values()]
    if any(core is None for core in cores):
        return False
    a, b = (core.snapshot() for core in cores if core is not None)
    return (
        a.role is Role.SYNC
        and b.role is Role.SYNC
        and a.epoch == b.epoch
        and a.peer_connected
        and b.peer_connected
        and not a.pending_writes
        and not b.pending_writes
        and not a.log_records
        and not b.log_records
        and not a.dirty_keys
        and not b.dirty_keys
        and not world.sites["a"].unsynced
        and not world.sites["b"].unsynced
    )


def settled_pair(world: World) -> bool:
    """Both sites SYNC in one epoch with nothing in flight, and the witness agrees (SYNC in that
    epoch): either site can be wiped without loss. This is the operator's precondition for
    replacing a site (docs/operations.md): a witness that still names a holder the pair has
    forgotten (a lost grant not yet found again) would wait for the wiped site forever."""
    cores = [site.core for site in world.sites.values()]
    if not all(core is not None for core in cores) or not settled(world):
        return False
    core = world.sites["a"].core
    assert core is not None
    state = world.witness.durable.get("pair-1")
    witness_epoch = state.epoch if state is not None else 1
    witness_sync = state is None or state.mode.name == "SYNC"
    return witness_sync and witness_epoch == core.epoch and not any(c.snapshot().asked_epoch for c in cores if c)


def no_fault_active(world: World) -> bool:
    """No link black-holed, no site paused, no disk fault armed, the witness up: what an operator
    checks before restoring a site (a settled pair whose peer is paused or cut from the witness
    is not healthy: simulator seed 1612 restored b while a was both, and b won the next epoch
    with its old disk). A disk fault armed but not yet hit is a failure already under way: seed
    3257 restored b 4 ms after a's next fsync was set to fail; a lazy sync hit it 450 ms later,
    while b was down, and b won epoch 2 alone with its old copy."""
    return (
        not world.links
        and world.witness.alive
        and all(
            site.alive
            and site.paused_until_us <= world.now_us
            and not site.disk.fail_next_sync
            and not site.disk.full
            for site in world.sites.values()
        )
    )


def visible_state(world: World, name: str) -> dict[str, str]:
    data = world.sites[name].disk.data()
    return {key.decode(): value.decode() for key, (ts, value) in data.items() if value is not None}


def run_seed(seed: int, params: SimParams, verbose: bool = False, check_history: bool = True) -> RunResult:
    world = World(seed, params, verbose=verbose)
    result = RunResult(seed=seed, ok=True)
    world.witness.start()
    for site in world.sites.values():
        site.start()
    world.after(0, world.connect_loop)
    world.after(0, world.tick_loop)
    safety_end = params.safety_ms * MS
    clients = [Client(world, number) for number in range(1, params.clients + 1)]
    for client in clients:
        client.stop_us = safety_end + 3000 * MS
        world.after(world.rng.randint(1, 100) * MS, client.run)
    injector = FaultInjector(world)
    injector.until_us = safety_end - 1000 * MS
    if params.faults:
        world.after(world.rng.randint(*params.fault_interval_ms) * MS, injector.loop)
    try:
        world.run_until(safety_end)
        # Liveness: heal everything; the pair must settle.
        world.trace("HEAL")
        world.heal()
        world.after(300 * MS, world.heal)  # restarts scheduled by faults may still be pending
        world.run_until(safety_end + 3500 * MS)
        liveness_end = safety_end + params.liveness_ms * MS
        done = world.run_until(liveness_end, stop=lambda: settled(world))
        if not done:
            # Let the last writes finish cleanly before judging.
            done = settled(world)
        result.liveness_ms = (world.now_us - safety_end) / MS
        if not done:
            result.converged = False
            roles = {
                name: (s.core.role.name, s.core.epoch, s.core.status()) if s.core else ("DEAD", s.stop_reason)
                for name, s in world.sites.items()
            }
            result.violations.append(f"liveness: not settled {params.liveness_ms} ms after healing: {roles}")
        else:
            world.run_until(world.now_us + 200 * MS)
    except AssertionError as error:
        result.violations.append(f"assertion in core: {error}")
        result.converged = False
    except ProtocolError as error:  # a local protocol error: a shell handed the core something wrong
        result.violations.append(f"protocol error in core: {error}")
        result.converged = False
    result.protocol_errors = world.protocol_errors_of_dead_cores + sum(
        s.core.protocol_errors for s in world.sites.values() if s.core
    )
    result.reordered_deliveries = world.reordered_deliveries
    # Checks.
    state_a = visible_state(world, "a")
    state_b = visible_state(world, "b")
    verdicts = []
    if result.converged:
        verdicts.append(convergence.check(state_a, state_b))
    if check_history:
        verdicts.append(linearizability.check(world.history))
        if result.converged:
            verdicts.append(lost_writes.check(world.history, state_a, site="a"))
            verdicts.append(lost_writes.check(world.history, state_b, site="b"))
    verdicts.append(split_brain.check(world.site_events))
    result.violations.extend(f"convergence at a sync point: {v}" for v in world.sync_violations[:3])
    result.violations.extend(f"a write within the clients' limits refused: {v}" for v in world.refused_writes[:3])
    for verdict in verdicts:
        if not verdict.ok:
            result.violations.append(f"{verdict.checker}: {verdict.status}: {verdict.message}")
    result.operations = world.operations
    result.acknowledged_writes = world.acknowledged_writes
    result.faults = dict(world.faults_injected)
    result.ok = not result.violations
    if not result.ok:
        result.trace_tail = world.lines[-60:]
    return result
