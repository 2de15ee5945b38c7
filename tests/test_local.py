"""The local launcher: configs, cluster.json, process control, the replicator-local command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.client.witness import AsyncWitnessClient
from replicator.config import load_site_config, load_witness_config
from replicator.daemon.witness import STATE_FILE
from replicator.local import (
    DEMO_SITE_SETTINGS,
    PAIR_ID,
    LocalCluster,
    LocalClusterError,
    grpc_health,
    same_process,
    site_daemon_available,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path / "cluster", health_timeout_s=20, stop_timeout_s=5)
    with local:
        yield local


def _arbitrate(address: str, site: str, epoch: int) -> tuple[bool, int]:
    async def call() -> tuple[bool, int]:
        client = AsyncWitnessClient(address, timeout_ms=3000)
        try:
            # As the sites do: a witness with no state for the pair learns its epoch first (SYNC 1 here).
            await client.report(PAIR_ID, "a", 1, holds_grant=False, in_sync=True)
            outcome = await client.arbitrate(PAIR_ID, site, epoch)
            return outcome.granted, outcome.epoch
        finally:
            await client.close()

    return asyncio.run(call())


def test_configs_cluster_json_kill_restart_and_stop(cluster: LocalCluster) -> None:
    cluster.start(sites=False)
    directory = cluster.directory
    witness = load_witness_config(directory / "witness.toml")
    a = load_site_config(directory / "a.toml")
    b = load_site_config(directory / "b.toml")
    assert witness.witness.data_dir == directory / "data" / "witness"
    assert [(p.id, p.sites, p.preferred_site) for p in witness.pairs] == [(PAIR_ID, ("a", "b"), "a")]
    assert (a.site.name, a.site.peer_name, a.site.pair_id, a.site.preferred_site) == ("a", "b", PAIR_ID, "a")
    assert a.site.data_dir == directory / "data" / "a" and b.site.data_dir == directory / "data" / "b"
    assert a.site.peer_address == b.listen.link and b.site.peer_address == a.listen.link
    assert a.site.peer_grpc_address == b.listen.grpc
    assert a.witness.address == witness.listen.grpc == b.witness.address
    for key, value in DEMO_SITE_SETTINGS.items():
        assert getattr(a.site, key) == value
    addresses = [witness.listen.grpc, witness.listen.metrics] + [
        address for s in (a, b) for address in (s.listen.grpc, s.listen.link, s.listen.metrics)
    ]
    assert len(set(addresses)) == 8 and all(x.startswith("127.0.0.1:") for x in addresses)

    recorded = json.loads((directory / "cluster.json").read_text())
    assert recorded == cluster.cluster
    assert set(recorded) == {"witness", "sites"} and recorded["sites"] == {}
    entry = recorded["witness"]
    assert set(entry) == {"pid", "grpc", "config"}
    assert entry["grpc"] == witness.listen.grpc and entry["config"] == str(directory / "witness.toml")
    assert same_process(entry["pid"], entry["config"])
    assert grpc_health(entry["grpc"]) == "SERVING"

    assert _arbitrate(entry["grpc"], "a", 1) == (True, 2)
    cluster.kill("witness")
    assert not cluster.is_running("witness") and not same_process(entry["pid"], entry["config"])
    assert grpc_health(entry["grpc"], timeout_s=0.3) == "UNREACHABLE"
    new_pid = cluster.restart("witness")
    assert new_pid != entry["pid"] and cluster.cluster["witness"]["pid"] == new_pid
    assert _arbitrate(entry["grpc"], "b", 1) == (False, 2)  # the grant survived the SIGKILL
    assert (directory / "witness.log").read_text().count('"event":"started"') == 2

    cluster.stop()
    assert not same_process(new_pid, entry["config"])


def test_rerun_reuses_configs_and_refuses_a_running_directory(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    with LocalCluster(directory) as first:
        first.start(sites=False)
        texts = {name: (directory / f"{name}.toml").read_text() for name in ("witness", "a", "b")}
        _arbitrate(first.cluster["witness"]["grpc"], "a", 1)
        with pytest.raises(LocalClusterError, match="already has running processes"):
            LocalCluster(directory).start(sites=False)
        assert first.is_running("witness")  # the refused start touched nothing
    with LocalCluster(directory) as second:
        second.start(sites=False)
        assert {name: (directory / f"{name}.toml").read_text() for name in texts} == texts
        assert _arbitrate(second.cluster["witness"]["grpc"], "a", 1) == (True, 2)  # state picked up


def test_start_failure_names_the_process_and_shows_its_log(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    with LocalCluster(directory) as local:
        local.start(sites=False)
    (directory / "data" / "witness" / STATE_FILE).write_text("{ torn")
    with LocalCluster(directory) as local, pytest.raises(LocalClusterError) as caught:
        local.start(sites=False)
    message = str(caught.value)
    assert message.startswith("witness (pid ") and "exited with code 1" in message
    assert "corrupt witness state" in message and str(directory / "witness.log") in message


def test_partial_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(LocalClusterError, match="but not"):
        LocalCluster(tmp_path).start(sites=False)


def _wait_for(predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _local(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator.local", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )


def test_command_line_up_status_down(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    up = subprocess.Popen(
        [sys.executable, "-m", "replicator.local", "up", "--dir", str(directory), "--no-sites"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    pid = None
    try:
        assert up.stdout is not None
        assert up.stdout.readline().startswith("replicator-local: cluster up in")
        entry = json.loads((directory / "cluster.json").read_text())["witness"]
        pid = entry["pid"]
        status = _local("status", "--dir", str(directory))
        assert status.returncode == 0, status.stderr
        assert "witness" in status.stdout and "SERVING" in status.stdout
        rows = json.loads(_local("status", "--dir", str(directory), "--json").stdout)
        assert rows[0]["name"] == "witness" and rows[0]["running"] is True

        down = _local("down", "--dir", str(directory))
        assert down.returncode == 0 and f"witness: pid {pid} stopped" in down.stdout
        assert not same_process(pid, entry["config"])
        assert _local("status", "--dir", str(directory)).returncode == 1

        time.sleep(1.0)  # `up` polls its children every 0.5 s
        up.send_signal(signal.SIGTERM)
        _, stderr = up.communicate(timeout=20)
        assert up.returncode == 0
        assert "witness" in stderr and "exited with code 0" in stderr  # `up` noticed the stop
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if pid is not None and same_process(pid, str(directory / "witness.toml")):
            os.kill(pid, signal.SIGKILL)


def test_command_line_up_stops_its_processes_on_sigterm(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    up = subprocess.Popen(
        [sys.executable, "-m", "replicator.local", "up", "--dir", str(directory), "--no-sites"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    entry = None
    try:
        assert up.stdout is not None
        up.stdout.readline()
        entry = json.loads((directory / "cluster.json").read_text())["witness"]
        assert same_process(entry["pid"], entry["config"])
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=20)
        assert up.returncode == 0
        assert not same_process(entry["pid"], entry["config"])
        assert '"event":"stopped"' in (directory / "witness.log").read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if entry is not None and same_process(entry["pid"], entry["config"]):
            os.kill(entry["pid"], signal.SIGKILL)


@pytest.mark.skipif(
    not site_daemon_available(),
    reason="replicator.daemon.site (the site daemon) does not exist yet: the full cluster cannot start",
)
def test_full_cluster_starts_and_a_site_restarts(cluster: LocalCluster) -> None:
    cluster.start(sites=True)
    recorded = cluster.cluster
    assert set(recorded["sites"]) == {"a", "b"}
    for name, entry in recorded["sites"].items():
        assert set(entry) == {"pid", "grpc", "peer", "metrics", "nbd", "config", "s3"}
        assert same_process(entry["pid"], entry["config"]), name
        assert grpc_health(entry["grpc"]) == "SERVING"
    cluster.kill("a")
    assert grpc_health(recorded["sites"]["a"]["grpc"], timeout_s=0.3) == "UNREACHABLE"
    assert grpc_health(recorded["sites"]["b"]["grpc"]) == "SERVING"
    cluster.restart("a")
    assert cluster.cluster["sites"]["a"]["pid"] != recorded["sites"]["a"]["pid"]
    assert grpc_health(recorded["sites"]["a"]["grpc"]) == "SERVING"


def test_the_production_timeout_profile_writes_the_configuration_defaults(tmp_path: Path) -> None:
    """`LocalCluster(timeouts="production")` (and `replicator-local up --timeouts production`): no demo timeout
    is written, so every process runs with the shipped defaults; the demo profile writes the short ones."""
    from replicator.config import SiteSection, WitnessClientConfig, WitnessSection
    from replicator.local import DEMO_SITE_SETTINGS, DEMO_WITNESS_CLIENT, DEMO_WITNESS_SETTINGS, LocalClusterError

    def default(kind: type, name: str) -> object:
        return kind.__dataclass_fields__[name].default  # type: ignore[attr-defined]

    for profile in ("demo", "production"):
        local = LocalCluster(tmp_path / profile, timeouts=profile)
        local.configure()
        site = load_site_config(local.config_path("a"))
        witness = load_witness_config(local.config_path("witness"))
        for name, demo in DEMO_SITE_SETTINGS.items():
            assert getattr(site.site, name) == (demo if profile == "demo" else default(SiteSection, name)), name
        for name, demo in DEMO_WITNESS_CLIENT.items():
            assert getattr(site.witness, name) == (demo if profile == "demo" else default(WitnessClientConfig, name))
        for name, demo in DEMO_WITNESS_SETTINGS.items():
            assert getattr(witness.witness, name) == (demo if profile == "demo" else default(WitnessSection, name))
    assert load_site_config(tmp_path / "production" / "a.toml").site.peer_timeout_ms != DEMO_SITE_SETTINGS[
        "peer_timeout_ms"
    ]
    with pytest.raises(LocalClusterError, match="timeouts must be one of demo, production"):
        LocalCluster(tmp_path / "bad", timeouts="fast")


def test_a_child_just_started_is_running_whatever_its_command_line_reads(tmp_path: Path) -> None:
    """Right after Popen returns, /proc/<pid>/cmdline can read empty while the exec completes (under
    load ~5 % of starts): the resync benchmark took b for exited the moment it started it. A child of
    this launcher is judged by its Popen (alive until reaped); a pid from cluster.json by its command line."""
    cluster = LocalCluster(tmp_path / "c")
    cluster.configure()
    process = cluster.processes["witness"]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # no config in its command line
    try:
        process.popen, process.pid = child, child.pid
        assert not same_process(child.pid, process.config)
        assert cluster.is_running("witness")
    finally:
        child.kill()
        child.wait()
    assert not cluster.is_running("witness")
    process.popen = None  # a pid recorded by another launcher: only its command line says it is ours
    assert not cluster.is_running("witness")
