"""The operator's view of a real pair (issue 19, the operator trial of 2026-12, findings 8-11, 16, 34-38).

`replicatorctl status` (both sites and the witness from one endpoint), `health` exit codes, the
`/readyz` readiness endpoint beside `/healthz`, resync progress, the event stream and the audit of
admin actions, against real daemons started by the local launcher (stopped also on failure).
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import wait_for

from replicator import __version__
from replicator.cli import EXIT_DEGRADED, EXIT_NOT_SERVING, EXIT_OK, EXIT_UNREACHABLE, main
from replicator.client import Client, RetryPolicy
from replicator.local import LocalCluster

# A loaded 2-core machine misses the demo's 500 ms of heartbeats now and then.
PEER_TIMEOUT_MS = 2000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "deploy", peer_timeout_ms=PEER_TIMEOUT_MS) as deployment:
        yield deployment


def site(cluster: LocalCluster, name: str) -> dict[str, str]:
    entry: dict[str, str] = cluster.cluster["sites"][name]
    return entry


def state(endpoint: str) -> str:
    with Client([endpoint], retry=RetryPolicy(attempts_max=1, call_timeout_ms=2000)) as client:
        return str(client.status().state)


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def http(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def start_synced(cluster: LocalCluster) -> tuple[str, str]:
    cluster.start(sites=True)
    a, b = site(cluster, "a")["grpc"], site(cluster, "b")["grpc"]
    wait_for(lambda: state(a) == "SYNC" and state(b) == "SYNC", 60, "both sites in SYNC")
    return a, b


def test_status_shows_both_sites_and_the_witness_from_one_endpoint(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = start_synced(cluster)
    code, out, _ = ctl(capsys, "--endpoint", a, "--json", "status")
    assert code == EXIT_OK
    view = json.loads(out)
    sites = {entry["site"]: entry for entry in view["sites"]}
    assert set(sites) == {"a", "b"} and sites["b"]["address"] == b
    for entry in sites.values():
        assert entry["state"] == "SYNC" and entry["health"] == "healthy"
        assert entry["state_reason"] and entry["state_since_ms"] >= entry["started_ms"] > 0
        assert entry["version"] == __version__
        assert entry["witness_preferred"] == "a"  # as the witness holds it (the launcher prefers a)
        assert entry["preferred"] == "a"  # as configured
    witness = view["witness"]
    assert witness["address"] == cluster.cluster["witness"]["grpc"]
    assert (witness["mode"], witness["epoch"], witness["preferred"]) == ("SYNC", sites["a"]["epoch"], "a")
    code, out, _ = ctl(capsys, "--endpoint", b, "status")
    assert code == EXIT_OK
    for fragment in ("site ", "b at " + b, "a at " + a, "why ", "since ", "version ", "witness state", "preferred"):
        assert fragment in out, (fragment, out)

    # A switchover shows at once in status, as the witness now holds it (finding 9).
    assert ctl(capsys, "--endpoint", a, "switchover")[0] == EXIT_OK
    wait_for(
        lambda: all(e["witness_preferred"] == "b" for e in json.loads(ctl(capsys, "--endpoint", a, "--json", "status")[1])["sites"]),
        20,
        "both sites showing b preferred at the witness",
    )
    code, out, _ = ctl(capsys, "--json", "--witness", cluster.cluster["witness"]["grpc"], "witness", "status")
    assert json.loads(out)[0]["preferred"] == "b"
    # An unknown pair is an error (finding 31).
    code, _, err = ctl(capsys, "--witness", cluster.cluster["witness"]["grpc"], "witness", "status", "--pair", "nope")
    assert code == 1 and "does not know pair 'nope'" in err


def test_health_exit_codes_and_readiness_follow_the_pair(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = start_synced(cluster)
    metrics_a = site(cluster, "a")["metrics"]
    assert ctl(capsys, "--endpoint", f"{a},{b}", "health")[0] == EXIT_OK
    status, body = http(metrics_a, "/readyz")
    assert status == 200 and body.startswith("healthy a SYNC")

    cluster.stop_process("b")
    wait_for(lambda: state(a) == "SOLO", 60, "site a SOLO after b stopped")
    code, out, _ = ctl(capsys, "--endpoint", a, "health")
    assert code == EXIT_DEGRADED and "degraded" in out and "peer b unreachable" in out
    code, _, _ = ctl(capsys, "--endpoint", f"{a},{b}", "--timeout-ms", "2000", "health")
    assert code == EXIT_UNREACHABLE  # the worst of the two: b does not answer
    status, body = http(metrics_a, "/readyz")
    assert status == 200 and body.startswith("degraded a SOLO")

    # Writes at a alone, then b returns: an incremental resync of exactly those keys, with progress.
    with Client([a]) as client:
        for i in range(50):
            client.put("bk", f"alone-{i}", b"x")
    cluster.start_process("b")
    wait_for(lambda: state(a) == "SYNC" and state(b) == "SYNC", 60, "the pair in SYNC again")
    code, out, _ = ctl(capsys, "--endpoint", a, "events", "--history", "--no-follow")
    assert code == EXIT_OK
    lines = [json.loads(line) for line in out.splitlines()]
    assert all(line["seq"] > 0 and line["ts"] for line in lines)
    started = [e for e in lines if e["event"] == "resync_started"]
    done = [e for e in lines if e["event"] == "resync_done"]
    assert started and started[-1]["kind"] == "incremental" and started[-1]["keys"] >= 50
    assert done and done[-1]["outcome"] == "done" and done[-1]["done"] == done[-1]["total"] >= 50
    metrics = http(metrics_a, "/metrics")[1]
    values = {
        line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and not line.startswith("#")
    }
    # Up at start, down when b stopped, up when it returned (more if the link flapped on a loaded machine).
    ups, downs = values["replicator_link_up_total"], values["replicator_link_down_total"]
    assert ups >= 2 and downs >= 1 and ups == downs + 1, (ups, downs)
    assert values['replicator_role_changes_total{role="SOLO"}'] >= 1
    roles = [(e["old"], e["new"]) for e in lines if e["event"] == "role"]
    assert ("SYNC", "SUSPENDED") in roles and ("RESYNC_SOURCE", "SYNC") in roles
    # The admin action of the other test shape: a verify is audited with the caller.
    assert ctl(capsys, "--endpoint", a, "verify")[0] == EXIT_OK
    code, out, _ = ctl(capsys, "--endpoint", a, "events", "--history", "--no-follow", "--event", "admin")
    audits = [json.loads(line) for line in out.splitlines()]
    assert audits and audits[-1]["action"] == "verify" and audits[-1]["client"].startswith("ipv4:127.0.0.1")
    code, out, _ = ctl(capsys, "--endpoint", a, "events", "--history", "--no-follow", "--event", "verify")
    assert json.loads(out.splitlines()[-1])["differing"] == 0


def test_a_lone_site_is_not_ready_and_health_says_not_serving(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """A brand-new pair needs both sites once (finding 22): the lone site stays SUSPENDED or STARTING;
    /healthz still answers 200 (liveness), /readyz 503, health exits 6."""
    cluster.start(sites=False)
    cluster.start_process("a", wait=False)
    a, metrics_a = site(cluster, "a")["grpc"], site(cluster, "a")["metrics"]
    wait_for(lambda: state(a) in ("SUSPENDED", "STARTING"), 60, "site a up and waiting for its peer")
    code, out, _ = ctl(capsys, "--endpoint", a, "--json", "health")
    assert code == EXIT_NOT_SERVING and json.loads(out)[0]["health"] == "not_serving"
    assert http(metrics_a, "/healthz")[0] == 200
    status, body = http(metrics_a, "/readyz")
    assert status == 503 and "not_serving" in body
    from replicator.local import main as local_main

    capsys.readouterr()
    local_main(["status", "--dir", str(cluster.directory), "--json"])
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["a"]["health"] == "SERVING" and rows["a"]["ready"] == "not-ready"  # alive, not serving
    cluster.send_signal("a", signal.SIGTERM)


def test_a_full_resync_reports_its_progress(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    """A wiped site gets a full resync; the source counts every key it ships (finding 8)."""
    import shutil

    a, b = start_synced(cluster)
    with Client([a]) as client:
        for batch in range(4):
            client.put_batch("bk", {f"key-{batch}-{i}": b"v" * 100 for i in range(500)})
    cluster.stop_process("b")
    wait_for(lambda: state(a) == "SOLO", 60, "site a SOLO after b stopped")
    shutil.rmtree(cluster.directory / "data" / "b")
    cluster.start_process("b")
    wait_for(lambda: state(a) == "SYNC" and state(b) == "SYNC", 120, "the wiped site back in SYNC")
    code, out, _ = ctl(capsys, "--endpoint", a, "events", "--history", "--no-follow", "--event", "resync_done")
    assert code == EXIT_OK
    done = json.loads(out.splitlines()[-1])
    assert done["kind"] == "full" and done["outcome"] == "done"
    assert done["done"] == done["total"] >= 2000, done
    code, out, _ = ctl(capsys, "--endpoint", b, "events", "--history", "--no-follow", "--event", "resync_started")
    assert json.loads(out.splitlines()[-1])["kind"] == "target"
    code, out, _ = ctl(capsys, "--endpoint", b, "events", "--history", "--no-follow", "--event", "resync_cleared")
    assert json.loads(out.splitlines()[-1])["keys"] == 0  # wiped: nothing of its own was thrown away


def test_daemons_tell_systemd_when_they_are_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Type=notify units (packaging/systemd): READY=1 once serving requests can begin, STOPPING=1 at stop."""
    import socket

    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        with LocalCluster(tmp_path / "deploy", peer_timeout_ms=PEER_TIMEOUT_MS) as deployment:
            deployment.start(sites=True)
            messages = set()
            while len([m for m in messages if m.startswith("READY=1")]) < 3:
                messages.add(receiver.recv(4096).decode())
            assert any("STATUS=witness started" in m for m in messages)
            assert any("STATUS=site a started" in m for m in messages)
            deployment.stop_process("b")
            assert receiver.recv(4096).decode() == "STOPPING=1"
    finally:
        receiver.close()


def test_over_tls_the_logs_stay_json_and_the_cli_hints_at_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Findings 17, 26, 27: a client without a certificate gets a TLS hint; gRPC's C core writes no
    line of its own into the daemons' JSON logs; the witness's port named as a site's is recognised."""
    with LocalCluster(tmp_path / "deploy", tls=True, peer_timeout_ms=PEER_TIMEOUT_MS) as deployment:
        deployment.start(sites=True)
        a, witness = site(deployment, "a")["grpc"], deployment.cluster["witness"]["grpc"]
        code, _, err = ctl(capsys, "--endpoint", a, "--timeout-ms", "2000", "status", "--local")
        assert code == EXIT_UNREACHABLE and "may require mutual TLS" in err and "REPLICATOR_CERT" in err
        files = deployment.tls_files("client")
        tls = ["--ca", str(files.ca_file), "--cert", str(files.cert_file), "--key", str(files.key_file)]
        code, _, err = ctl(capsys, "--endpoint", witness, *tls, "status", "--local")
        assert code == EXIT_UNREACHABLE and "not a Replicator site" in err and "the witness?" in err
        wait_for(
            lambda: {s["state"] for s in json.loads(ctl(capsys, "--endpoint", a, *tls, "--json", "status")[1])["sites"]}
            == {"SYNC"},
            60,
            "both sites SYNC over TLS",
        )
        metrics = http(site(deployment, "a")["metrics"], "/metrics")[1]
        assert f'replicator_build_info{{version="{__version__}"' in metrics
        assert "replicator_start_time_seconds" in metrics and "replicator_role_changes_total" in metrics
        for name in ("witness", "a", "b"):
            lines = deployment.processes[name].log.read_text(errors="replace").splitlines()
            foreign = [line for line in lines if line.strip() and not line.startswith("{")]
            assert not foreign, (name, foreign[:3])


def test_start_up_failures_of_the_data_dir_are_one_line(tmp_path: Path) -> None:
    """Finding 25: a data_dir that is a file, or under a missing parent that cannot be made."""
    import dataclasses
    import subprocess
    import sys

    from replicator.config import load_site_config

    cluster = LocalCluster(tmp_path / "deploy")
    cluster.configure()
    base = load_site_config(cluster.config_path("a"))
    (tmp_path / "a-file").write_text("not a directory")
    for data_dir in (tmp_path / "a-file", Path("/proc/no-such-dir/data")):
        config = dataclasses.replace(base, site=dataclasses.replace(base.site, data_dir=data_dir))
        path = tmp_path / "bad.toml"
        path.write_text(config.to_toml())
        done = subprocess.run(
            [sys.executable, "-m", "replicator.daemon.site", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        (line,) = [json.loads(x) for x in done.stderr.splitlines() if '"start_failed"' in x]
        assert str(data_dir) in line["error"] and line["level"] == "critical"
