"""Operations an operator does, replayed with real processes (issue 18, the operator trial of 2026-12).

Each test starts its own deployment with the local launcher (LocalCluster stops what it started,
also on failure) and extra processes of its own, each stopped in a `finally`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import wait_for

from replicator.client import Client
from replicator.config import load_site_config, load_witness_config
from replicator.local import LocalCluster, free_ports

PROCESS_TIMEOUT_S = 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "deploy") as deployment:
        yield deployment


def state(endpoint: str) -> str:
    return Client([endpoint]).status().state


def endpoints(cluster: LocalCluster) -> list[str]:
    sites = cluster.cluster["sites"]
    return [sites["a"]["grpc"], sites["b"]["grpc"]]


def start_synced(cluster: LocalCluster) -> list[str]:
    cluster.start(sites=True)
    found = endpoints(cluster)
    wait_for(lambda: all(state(e) == "SYNC" for e in found), 30, "both sites in SYNC")
    return found


def events(log: Path, name: str) -> list[dict[str, object]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
    return found


class Extra:
    """A daemon process of the test's own (a duplicate), always stopped by the test."""

    def __init__(self, cluster: LocalCluster, module: str, config: Path, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cluster.directory,
                env=cluster._environment(),
                start_new_session=True,
            )

    def wait(self, timeout_s: float = PROCESS_TIMEOUT_S) -> int:
        return self.popen.wait(timeout_s)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def site_copy(cluster: LocalCluster, name: str, new_name: str, **changes: object) -> Path:
    """`name`'s configuration with `changes` to its [site] and [listen] sections, written as new_name.toml."""
    config = load_site_config(cluster.config_path(name))
    site = dataclasses.replace(config.site, **{k: v for k, v in changes.items() if k in ("data_dir",)})
    listen = dataclasses.replace(config.listen, **{k: v for k, v in changes.items() if k in ("grpc", "link", "metrics")})
    copy = dataclasses.replace(config, site=site, listen=listen)
    if getattr(config, "nbd", None) is not None and config.nbd.listen:  # the NBD front-end's port too
        copy = dataclasses.replace(copy, nbd=dataclasses.replace(config.nbd, listen=fresh_ports(1)[0]))
    if getattr(config, "s3", None) is not None and config.s3.enabled:  # and the S3 front-end's
        copy = dataclasses.replace(copy, s3=dataclasses.replace(config.s3, listen=fresh_ports(1)[0]))
    path = cluster.directory / f"{new_name}.toml"
    path.write_text(copy.to_toml())
    return path


def fresh_ports(count: int) -> list[str]:
    return [f"127.0.0.1:{port}" for port in free_ports(count)]


def start_failures(log: Path) -> list[str]:
    return [str(event["error"]) for event in events(log, "start_failed")]


# ---------------------------------------------------------------- finding 2: exclusive listeners


def test_second_site_on_a_taken_grpc_port_fails_with_one_line(cluster: LocalCluster) -> None:
    found = start_synced(cluster)
    taken = found[0]
    grpc_port, link_port, metrics_port = fresh_ports(3)
    config = site_copy(
        cluster, "a", "a-dup", data_dir=cluster.directory / "data" / "a-dup", grpc=taken, link=link_port,
        metrics=metrics_port,
    )
    duplicate = Extra(cluster, "replicator.daemon.site", config, cluster.directory / "a-dup.log")
    try:
        assert duplicate.wait() == 1
    finally:
        duplicate.stop()
    text = duplicate.log.read_text()
    assert "Traceback" not in text
    (error,) = start_failures(duplicate.log)
    assert taken in error and "in use" in error
    # The live site still answers every call: nobody else listens on its port.
    assert all(state(taken) == "SYNC" for _ in range(20))


def test_second_site_on_the_same_data_dir_is_refused(cluster: LocalCluster) -> None:
    start_synced(cluster)
    grpc_port, link_port, metrics_port = fresh_ports(3)
    config = site_copy(cluster, "b", "b-dup", grpc=grpc_port, link=link_port, metrics=metrics_port)
    duplicate = Extra(cluster, "replicator.daemon.site", config, cluster.directory / "b-dup.log")
    try:
        assert duplicate.wait() == 1
    finally:
        duplicate.stop()
    assert "Traceback" not in duplicate.log.read_text()
    (error,) = start_failures(duplicate.log)
    assert "in use by another process" in error and f"pid {cluster.cluster['sites']['b']['pid']}" in error


def test_second_instance_of_a_running_site_is_refused_by_the_peer(cluster: LocalCluster) -> None:
    """Another data directory and other ports, the same site name: the peer keeps the live instance."""
    found = start_synced(cluster)
    grpc_port, link_port, metrics_port = fresh_ports(3)
    config = site_copy(
        cluster, "a", "a-dup", data_dir=cluster.directory / "data" / "a-dup", grpc=grpc_port, link=link_port,
        metrics=metrics_port,
    )
    duplicate = Extra(cluster, "replicator.daemon.site", config, cluster.directory / "a-dup.log")
    try:
        wait_for(lambda: events(duplicate.log, "link_refused"), 20, "the duplicate told it is refused")
        states = set()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            states.update(state(e) for e in found)
            time.sleep(0.1)
        assert states == {"SYNC"}, states  # the pair was never disturbed
        assert state(grpc_port) != "SYNC"
    finally:
        duplicate.stop()
    refused = [str(e["reason"]) for e in events(duplicate.log, "link_refused")]
    assert any("already connected from another live process" in r for r in refused), refused
    assert any("second instance" in str(e["reason"]) for e in events(cluster.processes["b"].log, "link_refused"))


def test_second_witness_on_a_taken_port_fails_with_one_line(cluster: LocalCluster) -> None:
    start_synced(cluster)
    config = load_witness_config(cluster.config_path("witness"))
    (metrics_port,) = fresh_ports(1)
    section = dataclasses.replace(config.witness, data_dir=cluster.directory / "data" / "witness-dup")
    listen = dataclasses.replace(config.listen, metrics=metrics_port)
    path = cluster.directory / "witness-dup.toml"
    path.write_text(dataclasses.replace(config, witness=section, listen=listen).to_toml())
    duplicate = Extra(cluster, "replicator.daemon.witness", path, cluster.directory / "witness-dup.log")
    try:
        assert duplicate.wait() == 1
    finally:
        duplicate.stop()
    assert "Traceback" not in duplicate.log.read_text()
    (error,) = start_failures(duplicate.log)
    assert config.listen.grpc in error and "in use" in error


# ---------------------------------------------------------------- finding 4: bounded reconnects


def test_after_a_witness_outage_the_pair_fails_over_within_2_s_of_its_return(cluster: LocalCluster) -> None:
    """The trial: site a SUSPENDED with a dead peer kept failing to reach the witness ~10 s after it was back
    (gRPC's default reconnect back-off: 1 s growing by 1.6, so after a 20 s outage the next attempt is
    several seconds away; measured 8.6 s with grpcio 1.85). Capped, the site is back within ~0.5 s."""
    found = start_synced(cluster)
    cluster.kill("witness")
    time.sleep(1.0)
    cluster.kill("b")  # a cannot go on alone: the witness is away
    wait_for(lambda: state(found[0]) in ("SUSPENDED", "FENCED"), 10, "a without service")
    time.sleep(19.0)
    assert state(found[0]) in ("SUSPENDED", "FENCED")
    cluster.start_process("witness", wait=True)
    back = time.monotonic()
    wait_for(lambda: state(found[0]) == "SOLO", 10, "a alone after the witness returned")
    elapsed = time.monotonic() - back
    assert elapsed < 2.0, f"a went SOLO {elapsed:.2f} s after the witness was back"


# ---------------------------------------------------------------- finding 5: signals


def test_sighup_reopens_the_log_and_kills_no_daemon(cluster: LocalCluster) -> None:
    found = start_synced(cluster)
    for name in ("b", "witness"):
        log = cluster.processes[name].log
        rotated = log.with_suffix(".log.1")
        log.rename(rotated)  # what logrotate does before its postrotate `kill -HUP`
        assert cluster.send_signal(name, signal.SIGHUP)
        wait_for(lambda log=log: log.exists() and events(log, "signal"), 10, f"{name} logging into a new file")
        (hangup,) = events(log, "signal")
        assert hangup["signal"] == "SIGHUP" and hangup["action"] == "log reopened"
        assert cluster.is_running(name)
    assert all(state(e) == "SYNC" for e in found)
    Client([found[1]]).put("ops", "after-hup", b"v")  # b still serves and replicates
    assert Client([found[0]]).get("ops", "after-hup") == b"v"


@pytest.mark.parametrize("signum", [signal.SIGQUIT, signal.SIGUSR1])
def test_every_stopping_signal_is_logged_and_shuts_down_in_stages(cluster: LocalCluster, signum: int) -> None:
    start_synced(cluster)
    process = cluster.processes["b"]
    assert cluster.send_signal("b", signum)
    assert process.popen is not None and process.popen.wait(15) == 0
    name = signal.Signals(signum).name
    assert [e["signal"] for e in events(process.log, "signal")] == [name]
    stages = [e["stage"] for e in events(process.log, "shutdown_stage")]
    assert "stop accepting requests" in stages and "flush storage" in stages
    (done,) = events(process.log, "shutdown_done")
    assert done["clean"] is True


# ---------------------------------------------------------------- finding 1: a site restored from a backup


def test_a_site_restored_from_an_older_copy_of_its_data_is_fully_resynced(cluster: LocalCluster) -> None:
    """The trial: stop b, copy its data dir, start it, write 20 objects at a, stop b, put the copy back,
    start b. Before: an incremental resync, both SYNC, b missing the 20 objects, verify 20 differ."""
    import shutil

    found = start_synced(cluster)
    a, b = (Client([e]) for e in found)
    for i in range(30):
        a.put("photos", f"before-{i}", f"old-{i}".encode())
    data_b = cluster.directory / "data" / "b"
    backup = cluster.directory / "backup-b"
    cluster.stop_process("b")
    shutil.copytree(data_b, backup, symlinks=True)
    cluster.start_process("b")
    wait_for(lambda: all(state(e) == "SYNC" for e in found), 30, "the pair in SYNC again")
    for i in range(20):
        a.put("photos", f"after-backup-{i}", f"v{i}".encode())
        a.put("photos", f"before-{i}", f"new-{i}".encode())  # overwritten after the copy, too
    assert b.get("photos", "after-backup-7") == b"v7"
    cluster.stop_process("b")
    shutil.rmtree(data_b)
    shutil.copytree(backup, data_b, symlinks=True)
    cluster.start_process("b")
    wait_for(lambda: all(state(e) == "SYNC" for e in found), 60, "the pair in SYNC after the restore")
    for i in range(20):
        assert b.get("photos", f"after-backup-{i}") == f"v{i}".encode()
        assert b.get("photos", f"before-{i}") == f"new-{i}".encode()
    report = a.verify()
    assert report.keys_compared >= 50 and report.differing_count == 0, report
    roles = [(e["old"], e["new"], e["reason"]) for e in events(cluster.processes["a"].log, "role")]
    assert any("older than it had acknowledged" in str(reason) for _, _, reason in roles), roles
    b_roles = [str(e["reason"]) for e in events(cluster.processes["b"].log, "role")]
    assert "resync from a (full=True)" in b_roles, b_roles


# ---------------------------------------------------------------- finding 3: replacing a lost witness


def witness_epoch(cluster: LocalCluster) -> int:
    from replicator.client.witness import witness_status

    states = witness_status(cluster.cluster["witness"]["grpc"], timeout_ms=2000, pair="pair-1")
    return states[0].epoch if states else -1


def epoch_of(endpoint: str) -> int:
    return Client([endpoint]).status().epoch


def advance_epoch(cluster: LocalCluster, found: list[str]) -> int:
    """A failover and a return: the pair is SYNC in epoch 3, the witness knows it."""
    cluster.kill("b")
    wait_for(lambda: state(found[0]) == "SOLO", 20, "a alone")
    cluster.start_process("b")
    wait_for(lambda: all(state(e) == "SYNC" for e in found), 30, "the pair in SYNC")
    epoch = epoch_of(found[0])
    assert epoch >= 3 and witness_epoch(cluster) == epoch
    return epoch


def replace_witness(cluster: LocalCluster) -> None:
    """The lost witness's state is gone: a new witness starts on an empty data directory."""
    import shutil

    cluster.stop_process("witness")
    data = cluster.directory / "data" / "witness"
    shutil.move(data, cluster.directory / "witness-lost")
    cluster.start_process("witness")


def test_a_replaced_witness_learns_the_epoch_and_a_failover_works_through_it(cluster: LocalCluster) -> None:
    """The trial: a fresh witness answered epoch 1 while the sites were at 16; after kill -9 of b, a was
    FENCED and denied every 200 ms, and the witness's later grant of epoch 2 was ignored: a total outage."""
    found = start_synced(cluster)
    epoch = advance_epoch(cluster, found)
    replace_witness(cluster)
    # It learns from the sites' reports (a site SYNC with its peer connected) before granting anything.
    wait_for(lambda: witness_epoch(cluster) == epoch, 10, "the new witness at the sites' epoch")
    # A site that sees a new witness identity drops the link to tell its peer in a new HELLO, so the pair passes
    # through RECONCILE once; the witness may learn the epoch from one site's report before the other is SYNC again.
    # What must not happen is a failover: the pair comes back to SYNC in the same epoch.
    wait_for(lambda: all(state(e) == "SYNC" for e in found), 10, "the pair in SYNC again after the reconnect")
    assert {epoch_of(e) for e in found} == {epoch}
    cluster.kill("b")
    wait_for(lambda: state(found[0]) == "SOLO", 20, "a alone through the new witness")
    assert epoch_of(found[0]) == epoch + 1 == witness_epoch(cluster)
    cluster.start_process("b")
    wait_for(lambda: all(state(e) == "SYNC" for e in found), 30, "b back in SYNC")
    learned = events(cluster.processes["witness"].log, "pair_learned_epoch")
    assert learned and learned[-1]["epoch"] == epoch  # (the log holds both witnesses: the first learned 1)


def test_a_replaced_witness_with_one_site_left_grants_nothing_stale_and_a_forced_failover_works(
    cluster: LocalCluster,
) -> None:
    """b is lost together with the witness: the new witness cannot learn from both sites, so it grants
    nothing (a stays FENCED and warns that the witness is behind); the operator's forced failover
    goes through it, in an epoch above the one a reached."""
    found = start_synced(cluster)
    a = Client([found[0]])
    epoch = advance_epoch(cluster, found)
    a.put("ops", "before-loss", b"v1")
    log_a = cluster.processes["a"].log
    # No false alarm while the witness was the pair's own (a new pair's witness learns epoch 1). Checked
    # before the replacement: once the new witness runs, a's next report (every second) may raise it at once.
    assert not events(log_a, "witness_behind")
    cluster.stop_process("witness")
    cluster.kill("b")
    import shutil

    shutil.move(cluster.directory / "data" / "witness", cluster.directory / "witness-lost")
    cluster.start_process("witness")
    wait_for(lambda: events(log_a, "witness_behind"), 10, "a warning that the witness is behind")
    behind = events(log_a, "witness_behind")[-1]
    assert behind["level"] == "error" and behind["witness_epoch"] == 0 and behind["epoch"] == epoch
    time.sleep(2.0)
    assert state(found[0]) in ("SUSPENDED", "FENCED")  # nothing granted
    assert witness_epoch(cluster) == 0
    a.failover(force=True)
    assert state(found[0]) == "SOLO" and epoch_of(found[0]) == epoch + 1 == witness_epoch(cluster)
    a.put("ops", "after-forced", b"v2")
    cluster.start_process("b")
    wait_for(lambda: all(state(e) == "SYNC" for e in found), 30, "b back in SYNC")
    b = Client([found[1]])
    assert b.get("ops", "before-loss") == b"v1" and b.get("ops", "after-forced") == b"v2"


def test_sites_that_use_different_witnesses_never_go_on_alone(cluster: LocalCluster) -> None:
    """The trial's split brain: two witnesses for one pair, site a asking one and b the other; after a
    link cut both were SOLO in epoch 2. Now the sites compare their witnesses' identities (in the link
    HELLO) and, while they differ, never ask to go on alone: a site left alone waits (and says why)."""
    found = start_synced(cluster)
    config = load_witness_config(cluster.config_path("witness"))
    grpc_port, metrics_port = fresh_ports(2)
    section = dataclasses.replace(config.witness, data_dir=cluster.directory / "data" / "witness-2")
    listen = dataclasses.replace(config.listen, grpc=grpc_port, metrics=metrics_port)
    path = cluster.directory / "witness-2.toml"
    path.write_text(dataclasses.replace(config, witness=section, listen=listen).to_toml())
    second = Extra(cluster, "replicator.daemon.witness", path, cluster.directory / "witness-2.log")
    try:
        wait_for(lambda: events(second.log, "started"), 20, "the second witness")
        site_b = load_site_config(cluster.config_path("b"))
        misconfigured = dataclasses.replace(site_b, witness=dataclasses.replace(site_b.witness, address=grpc_port))
        cluster.stop_process("b")
        cluster.config_path("b").write_text(misconfigured.to_toml())
        cluster.start_process("b")
        log_a, log_b = cluster.processes["a"].log, cluster.processes["b"].log
        wait_for(lambda: events(log_a, "witness_mismatch") and events(log_b, "witness_mismatch"), 20, "both warned")
        wait_for(lambda: all(state(e) == "SYNC" for e in found), 30, "the pair in SYNC")  # replication goes on
        grants = len(events(cluster.processes["witness"].log, "granted"))  # (one when b was stopped above)
        cluster.kill("b")
        time.sleep(5.0)  # beyond the failover time (0.5 s timeout, 1 s lease)
        assert state(found[0]) in ("SUSPENDED", "FENCED")
        assert len(events(cluster.processes["witness"].log, "granted")) == grants
        (mismatch, *_) = events(log_a, "witness_mismatch")
        assert mismatch["level"] == "critical" and mismatch["witness_id"] != mismatch["peer_witness_id"]
    finally:
        second.stop()
