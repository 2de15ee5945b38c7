"""The one driver of the core (replicator/driver.py): its rules, its plants, and that it is the only one."""

from __future__ import annotations

import ast
import pathlib

from chaos.sim.disk import SimDisk
from chaos.sim.manual import ManualSite, connect, settle
from replicator.core import events as ev
from replicator.core.messages import Role
from replicator.core.records import Operation, versioned_wire_bytes
from replicator.driver import SHELL_PLANTS, ShellPlant, load_resync_batch
from replicator.storage.memory import MemoryStore

ROOT = pathlib.Path(__file__).resolve().parent.parent
DRIVER = ROOT / "replicator" / "driver.py"


def test_grep_finds_one_action_executor() -> None:
    """No function outside replicator/driver.py dispatches on the core's actions (Persist and
    SendToPeer together): the daemon, the simulator, the scripts and the tests all use the driver."""
    executors = []
    for folder in ("replicator", "chaos", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                checked = {
                    arg.attr
                    for call in ast.walk(node)
                    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "isinstance"
                    for arg in ast.walk(call)
                    if isinstance(arg, ast.Attribute)
                }
                if {"Persist", "SendToPeer"} <= checked:
                    executors.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert executors == ["replicator/driver.py:" + _executor_line() + " _execute"]


def _executor_line() -> str:
    for node in ast.walk(ast.parse(DRIVER.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == "_execute":
            return str(node.lineno)
    raise AssertionError("SiteDriver._execute is gone")


def test_each_shell_plant_is_checked_at_exactly_one_place() -> None:
    tree = ast.parse(DRIVER.read_text())
    uses = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ShellPlant"
    ]
    assert sorted(uses) == sorted(plant.name for plant in ShellPlant)
    assert set(SHELL_PLANTS) == {plant.name.lower() for plant in ShellPlant}


def test_the_resync_loader_cuts_a_batch_to_the_byte_bound() -> None:
    store = MemoryStore()
    batch = store.batch()
    for number in range(6):
        batch.apply(f"k{number}".encode(), number + 1, b"v" * 300)
    store.write(batch)
    one = versioned_wire_bytes(store.get(b"k0"))  # type: ignore[arg-type]
    keys = tuple(f"k{number}".encode() for number in range(6)) + (b"absent",)
    loaded = load_resync_batch(store, ev.LoadResyncBatch(1, keys=keys), 2 * one)
    assert [entry.key for entry in loaded.entries] == [b"k0", b"k1"] and loaded.next_position is None
    scan = load_resync_batch(store, ev.LoadResyncBatch(2, scan_from=b"k1", limit=5), 3 * one)
    assert [entry.key for entry in scan.entries] == [b"k1", b"k2", b"k3"] and scan.next_position == b"k3\x00"
    whole = load_resync_batch(store, ev.LoadResyncBatch(3, scan_from=b"k4", limit=5), 1 << 30)
    assert [entry.key for entry in whole.entries] == [b"k4", b"k5"] and whole.next_position is None
    tiny = load_resync_batch(store, ev.LoadResyncBatch(4, keys=(b"absent", b"k0")), 1)
    assert [(entry.key, entry.ts, entry.value) for entry in tiny.entries] == [(b"absent", 0, None)]  # at least one


def test_durability_is_reported_once_per_sync_and_a_failed_write_stops_the_site() -> None:
    a, b = ManualSite("a", trace=[]), ManualSite("b")
    a.start()
    b.start()
    connect(a, b)
    assert a.driver is not None and a.core is not None and a.trace is not None
    for number in range(3):
        a.step(ev.WriteRequested(number, f"r{number}".encode(), (Operation(f"k{number}".encode(), b"v"),)))
    assert len(a.driver.unsynced) == 3
    a.trace.clear()
    a.sync()
    assert not a.driver.unsynced
    settle(a, b)
    assert {x.handle for x in a.answers if x.ok} == {0, 1, 2}
    # A full disk: the write fails, the step's other actions still go out, then the site stops.
    a.disk.full = True
    a.step(ev.WriteRequested(9, b"r9", (Operation(b"k9", b"v"),)))
    assert a.core.role is Role.STOPPED and a.core.stopped_reason.startswith("storage")


def test_held_persists_are_one_store_write_and_a_read_sees_them() -> None:
    """With hold_persists (the daemon) the persists of many steps are held and written as one
    batch on flush; a ServeRead flushes first, so a read never misses what was persisted before it."""
    a, b = ManualSite("a", trace=[]), ManualSite("b")
    a.start()
    b.start()
    connect(a, b)
    settle(a, b)
    assert a.driver is not None and a.core is not None
    flushes: list[int] = []
    a.persists_held = lambda driver: flushes.append(1)  # type: ignore[method-assign]
    a.driver.hold_persists = True
    written = a.disk.store.written_sequence
    for number in range(3):
        a.step(ev.WriteRequested(number, f"r{number}".encode(), (Operation(f"k{number}".encode(), b"v"),)))
    assert a.disk.store.written_sequence == written and not a.driver.unsynced and flushes == [1]
    a.driver.flush()
    assert a.disk.store.written_sequence == written + 1  # three persists, one write
    assert [persist_id for _, persist_id in a.driver.unsynced] == sorted(p for _, p in a.driver.unsynced)
    assert len(a.driver.unsynced) == 3
    for _ in range(10):  # commit: the applies are held again until something reads
        a.driver.flush()
        settle(a, b)
    assert {x.handle for x in a.answers if x.ok} == {0, 1, 2}
    a.step(ev.WriteRequested(5, b"r5", (Operation(b"k5", b"new"),)))
    a.driver.flush()
    a.sync()  # a's log entry is durable
    for message in a.outbox:
        b.step(ev.PeerSent(message))
    a.outbox.clear()
    assert b.driver is not None
    b.driver.flush()
    b.sync()  # b prepared it durably and acknowledges
    for message in b.outbox:
        a.step(ev.PeerSent(message))  # the ack: a commits, its apply is held
    b.outbox.clear()
    assert any(x.handle == 5 and x.ok for x in a.answers) and a.driver.held is not None
    assert a.disk.value(b"k5") is None
    # Whatever is still held when a read is served goes to the store first.
    a.core.reads.lease_until_ms = a.now + 1_000_000
    served: list[object] = []
    a.read_served = lambda handle, key, version, error: served.append(version)  # type: ignore[method-assign]
    a.step(ev.ReadRequested(7, b"k5"))
    assert a.driver.held is None and served and getattr(served[0], "value", None) == b"new"


def test_the_simulated_disk_loses_what_was_not_synced() -> None:
    disk = SimDisk()
    batch = disk.store.batch()
    batch.apply(b"k", 5, b"durable")
    disk.store.write(batch)
    disk.sync()
    batch = disk.store.batch()
    batch.apply(b"k", 6, b"lost")
    disk.store.write(batch)
    assert disk.value(b"k") == b"lost"
    image = disk.image()
    disk.crash()
    assert disk.value(b"k") == b"durable"
    disk.fail_next_sync = True
    batch = disk.store.batch()
    batch.apply(b"k", 7, b"x")
    disk.store.write(batch)
    try:
        disk.sync()
    except Exception as error:  # noqa: BLE001 - the store's fail-stop error
        assert "fsync failed" in str(error)
    else:
        raise AssertionError("the sync did not fail")
    disk.crash()
    assert disk.value(b"k") == b"durable"
    disk.wipe()
    assert disk.value(b"k") is None
    disk.restore(image)
    assert disk.value(b"k") == b"durable"


# What a shell (the daemon, the simulator, the scripts) may use of a core: SiteCore's and
# WitnessCore's public surface. Everything else (sub-machines, tables, sessions, private names)
# is the core's own; status and metrics come from `SiteCore.snapshot()`, a frozen CoreStatus.
CORE_PUBLIC = {
    # SiteCore
    "start",
    "step",
    "snapshot",
    "unresolved_keys",
    "config",
    "role",
    "epoch",
    "incarnation",
    "protocol_errors",
    "status",
    # WitnessCore (read only)
    "pairs",
    "states",
    "fresh",
    "declared",
    "learned_pairs",
    "forget_pending",
}


def _is_core(node: ast.AST) -> bool:
    """An expression naming a core: `core`, `x.core`, `something_core`."""
    if isinstance(node, ast.Name):
        return node.id == "core" or node.id.endswith("_core")
    return isinstance(node, ast.Attribute) and (node.attr == "core" or node.attr.endswith("_core"))


def core_misuses(paths: list[pathlib.Path]) -> list[str]:
    found = []
    for path in paths:
        tree = ast.parse(path.read_text())
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_core(node.value) and node.attr not in CORE_PUBLIC:
                found.append(f"{name}:{node.lineno} reads core.{node.attr}")
            targets: list[ast.AST] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            elif isinstance(node, ast.Delete):
                targets = list(node.targets)
            for target in targets:
                while isinstance(target, ast.Subscript):
                    target = target.value
                if isinstance(target, ast.Attribute) and _is_core(target.value):
                    found.append(f"{name}:{node.lineno} writes core.{target.attr}")
    return found


def test_no_shell_touches_a_core_attribute_that_is_not_public() -> None:
    shells = [
        path
        for folder in ("replicator", "chaos")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "core" not in path.relative_to(ROOT / folder).parts[:1]
    ]
    assert len(shells) > 50
    assert core_misuses(shells) == []


def test_the_core_attribute_check_catches_what_the_old_shells_did(tmp_path: pathlib.Path) -> None:
    old = tmp_path / "old_shell.py"
    old.write_text(
        "def f(self, site, core):\n"
        "    up = self.core._session_up()\n"
        "    waiting = core.grant_epoch is None\n"
        "    core.pairs['p'] = 1\n"
        "    site.core.states.setdefault('p', 0)\n"
        "    return self.core.snapshot().peer_connected, core.role\n"
    )
    found = core_misuses([old])
    assert sorted(line.split(" ", 1)[1] for line in found) == [
        "reads core._session_up",
        "reads core.grant_epoch",
        "writes core.pairs",
    ], found
