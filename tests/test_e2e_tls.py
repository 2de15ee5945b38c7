"""End to end with mutual TLS on every link: real witness and site processes, certificates made by openssl.

One deployment (`LocalCluster(dir, tls=True)`) is shared by the tests of this
module, in order: it reaches SYNC over TLS, replicates writes made at either
site (the site link is mTLS), refuses every client without a certificate of
its CA (plain channel, TLS without a client certificate, a certificate of
another CA) at both sites, at the witness and on the link, and - last,
because it kills a site - fails over to SOLO, which needs a grant from the
witness over TLS, then resynchronises.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support import wait_for

from replicator.client import Client, ClientError, NotFound, RetryPolicy
from replicator.client.witness import witness_status
from replicator.config import TlsFiles, load_site_config, load_witness_config
from replicator.local import LocalCluster, LocalClusterError, grpc_health, same_process
from replicator.tlsutil import make_ca, make_certificate, openssl_available
from replicator.v1 import admin_pb2, admin_pb2_grpc, witness_pb2, witness_pb2_grpc

pytestmark = pytest.mark.skipif(not openssl_available(), reason="the openssl command is not installed")

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "tls"
REFUSED = {grpc.StatusCode.UNAVAILABLE}




def san(certificate: Path) -> str:
    result = subprocess.run(
        ["openssl", "x509", "-in", str(certificate), "-noout", "-ext", "subjectAltName,extendedKeyUsage"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("e2e-tls") / "deploy", tls=True, stop_timeout_s=5) as cluster:
        cluster.start(sites=True)
        yield cluster


@pytest.fixture(scope="module")
def client_tls(deployment: LocalCluster) -> TlsFiles:
    assert deployment.client_tls is not None
    return deployment.client_tls


@pytest.fixture(scope="module")
def endpoints(deployment: LocalCluster) -> dict[str, str]:
    sites = deployment.cluster["sites"]
    return {"a": sites["a"]["grpc"], "b": sites["b"]["grpc"], "witness": deployment.cluster["witness"]["grpc"]}


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Certificates from another CA: one for a client, one that names site "a" (a would-be link peer)."""
    directory = tmp_path_factory.mktemp("rogue")
    ca = make_ca(directory, "rogue-ca")
    return {
        "client": make_certificate(directory, "client", ca, server=False),
        "a": make_certificate(directory, "a", ca),
    }


def client(endpoint: str, tls: TlsFiles) -> Client:
    return Client([endpoint], tls=tls, retry=RetryPolicy(attempts_max=3, call_timeout_ms=3000))


def state(endpoint: str, tls: TlsFiles) -> str:
    with client(endpoint, tls) as one:
        return str(one.status().state)


# ---------------------------------------------------------------- the launcher's TLS layout


def test_every_link_is_configured_with_tls(deployment: LocalCluster, client_tls: TlsFiles) -> None:
    tls_dir = deployment.directory / "tls"
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    for name in ("ca", "a", "b", "witness", "client"):
        assert stat.S_IMODE((tls_dir / f"{name}.key").stat().st_mode) == 0o600, name
        assert (tls_dir / f"{name}.pem").is_file()
    for name in ("a", "b"):
        config = load_site_config(deployment.config_path(name))
        for channel in (config.tls.grpc, config.tls.link, config.tls.witness):
            assert channel is not None
            assert channel.cert_file == tls_dir / f"{name}.pem" and channel.ca_file == tls_dir / "ca.pem"
        # The link checks the peer's certificate against the site name; gRPC clients check 127.0.0.1.
        names = san(tls_dir / f"{name}.pem")
        assert f"DNS:{name}" in names and "IP Address:127.0.0.1" in names and "DNS:localhost" in names
        assert "TLS Web Server Authentication" in names and "TLS Web Client Authentication" in names
    witness = load_witness_config(deployment.config_path("witness"))
    assert witness.tls.grpc is not None and witness.tls.grpc.cert_file == tls_dir / "witness.pem"
    assert "TLS Web Server Authentication" not in san(tls_dir / "client.pem")
    assert deployment.cluster["tls"] == {
        "ca": str(tls_dir / "ca.pem"),
        "cert": str(tls_dir / "client.pem"),
        "key": str(tls_dir / "client.key"),
    }
    assert client_tls == TlsFiles(tls_dir / "ca.pem", tls_dir / "client.pem", tls_dir / "client.key")


def test_without_tls_nothing_changes(tmp_path: Path) -> None:
    plain = LocalCluster(tmp_path / "plain")
    plain.configure()
    assert plain.tls is False and plain.client_tls is None
    assert not (tmp_path / "plain" / "tls").exists()
    for name in ("a", "b", "witness"):
        assert "[tls." not in plain.config_path(name).read_text()
    plain._write_cluster()
    assert "tls" not in plain.cluster
    with pytest.raises(LocalClusterError, match="configured without TLS"):
        LocalCluster(tmp_path / "plain", tls=True).configure()


# ---------------------------------------------------------------- the deployment works over mTLS


def test_reaches_sync_over_tls(deployment: LocalCluster, endpoints: dict[str, str], client_tls: TlsFiles) -> None:
    for name in ("a", "b", "witness"):
        assert grpc_health(endpoints[name], timeout_s=2.0, tls=client_tls) == "SERVING"
        assert grpc_health(endpoints[name], timeout_s=2.0) == "UNREACHABLE"  # plaintext gets nowhere
    wait_for(lambda: all(state(endpoints[s], client_tls) == "SYNC" for s in "ab"), 30, "both sites in SYNC")
    for name in ("a", "b"):
        with client(endpoints[name], client_tls) as one:
            status = one.status()
        assert status.site == name and status.peer_reachable


def test_writes_at_either_site_are_readable_at_both(endpoints: dict[str, str], client_tls: TlsFiles) -> None:
    written: dict[str, bytes] = {}
    for name in ("a", "b"):
        with client(endpoints[name], client_tls) as one:
            for i in range(5):
                key, value = f"{name}-{i}", f"written at {name} #{i}".encode()
                one.put(BUCKET, key, value)
                written[key] = value
    for name in ("a", "b"):
        with client(endpoints[name], client_tls) as one:
            for key, value in written.items():
                assert one.get(BUCKET, key) == value, f"{key} at {name}"
            assert sorted(one.list(BUCKET)) == sorted(written)


def test_metrics_show_sync_times_disk_use_and_certificate_expiry(deployment: LocalCluster, client_tls: TlsFiles) -> None:
    """Trial finding 42: the sync latency, the data directory's size and free space, and when each
    certificate expires (compared with openssl's reading of the same file)."""
    import datetime
    import urllib.request

    site = load_site_config(deployment.config_path("a"))
    with client(deployment.cluster["sites"]["a"]["grpc"], client_tls) as one:
        one.put(BUCKET, "metrics-probe", b"x" * 4096)
    with urllib.request.urlopen(f"http://{deployment.cluster['sites']['a']['metrics']}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples["replicator_sync_seconds_count"] >= 1 and samples["replicator_sync_seconds_sum"] > 0
    assert samples["replicator_data_dir_bytes"] > 4096 and samples["replicator_data_dir_free_bytes"] > 0
    for channel in ("grpc", "link", "witness"):
        cert_file = getattr(site.tls, channel).cert_file
        end = subprocess.run(
            ["openssl", "x509", "-in", str(cert_file), "-noout", "-enddate"], capture_output=True, text=True, check=True
        ).stdout.strip().split("=", 1)[1]
        not_after = datetime.datetime.strptime(end, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=datetime.UTC)
        shown = samples[f'replicator_certificate_expiry_timestamp_seconds{{channel="{channel}"}}']
        assert shown == not_after.timestamp(), channel
        assert 0 < samples[f'replicator_certificate_expiry_seconds{{channel="{channel}"}}'] <= shown


# ---------------------------------------------------------------- refusals


def _credentials(
    kind: str, client_tls: TlsFiles, rogue: dict[str, tuple[Path, Path]]
) -> grpc.ChannelCredentials | None:
    ca = client_tls.ca_file.read_bytes()
    if kind == "plaintext":
        return None
    if kind == "no client certificate":
        return grpc.ssl_channel_credentials(root_certificates=ca)
    if kind == "certificate of another CA":
        cert, key = rogue["client"]
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
        )
    assert kind == "certificate of our CA"
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=client_tls.key_file.read_bytes(),
        certificate_chain=client_tls.cert_file.read_bytes(),
    )


def _call(target: str, address: str, credentials: grpc.ChannelCredentials | None) -> object:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    try:
        if target == "witness":
            return witness_pb2_grpc.WitnessServiceStub(channel).Status(witness_pb2.WitnessStatusRequest(), timeout=5)
        return admin_pb2_grpc.AdminServiceStub(channel).Status(admin_pb2.StatusRequest(), timeout=5)
    finally:
        channel.close()


@pytest.mark.parametrize("target", ["a", "b", "witness"])
def test_a_client_certificate_of_our_ca_is_accepted(
    endpoints: dict[str, str], client_tls: TlsFiles, rogue: dict[str, tuple[Path, Path]], target: str
) -> None:
    assert _call(target, endpoints[target], _credentials("certificate of our CA", client_tls, rogue))


@pytest.mark.parametrize("kind", ["plaintext", "no client certificate", "certificate of another CA"])
@pytest.mark.parametrize("target", ["a", "b", "witness"])
def test_a_client_without_a_valid_certificate_is_refused(
    endpoints: dict[str, str], client_tls: TlsFiles, rogue: dict[str, tuple[Path, Path]], target: str, kind: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _call(target, endpoints[target], _credentials(kind, client_tls, rogue))
    assert refused.value.code() in REFUSED, refused.value


def test_the_client_library_and_witness_status_need_the_client_certificate(
    endpoints: dict[str, str], client_tls: TlsFiles, rogue: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = rogue["client"]
    for tls in (None, TlsFiles(client_tls.ca_file, cert, key)):
        with pytest.raises(ClientError):
            with Client([endpoints["a"]], tls=tls, retry=RetryPolicy(attempts_max=2, call_timeout_ms=2000)) as one:
                one.status()
        with pytest.raises(ClientError):
            witness_status(endpoints["witness"], tls=tls, timeout_ms=2000)
    assert witness_status(endpoints["witness"], tls=client_tls, timeout_ms=5000)  # the pair is declared


def _link_answer(address: str, cert: Path, key: Path, ca: Path, server_name: str) -> bytes:
    """Dial the acceptor's link with `cert`; return what it sends (its HELLO if it accepted us), b"" if refused."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                return tls.recv(64)
        except (ssl.SSLError, ConnectionError, TimeoutError):
            return b""


def test_the_site_link_refuses_a_foreign_or_misnamed_certificate(
    deployment: LocalCluster, endpoints: dict[str, str], client_tls: TlsFiles, rogue: dict[str, tuple[Path, Path]]
) -> None:
    # b accepts the link (a < b dials). A certificate that names "a" but comes from another CA is refused;
    # so is a certificate of our CA that does not name "a" (the operator's client certificate).
    acceptor = deployment.processes["b"].extra["peer"]
    ca = client_tls.ca_file
    assert _link_answer(acceptor, *rogue["a"], ca, "b") == b""
    assert _link_answer(acceptor, client_tls.cert_file, client_tls.key_file, ca, "b") == b""
    # A plaintext peer gets no HELLO either.
    host, port = acceptor.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"RPLF" + bytes(60))
        try:
            answer = raw.recv(64)
        except (ConnectionError, TimeoutError):
            answer = b""
    assert not answer.startswith(b"RPLF")
    # The real link was not disturbed.
    assert all(state(endpoints[s], client_tls) == "SYNC" for s in "ab")
    with client(endpoints["a"], client_tls) as one:
        one.put(BUCKET, "after-intruders", b"still replicated")
    with client(endpoints["b"], client_tls) as one:
        assert one.get(BUCKET, "after-intruders") == b"still replicated"


def test_replicatorctl_and_local_status_use_the_recorded_client_certificate(
    deployment: LocalCluster, endpoints: dict[str, str]
) -> None:
    tls = deployment.cluster["tls"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}

    def ctl(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "replicator.cli", "--timeout-ms", "2000", *arguments]
        return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=30)

    flags = ["--ca", tls["ca"], "--cert", tls["cert"], "--key", tls["key"]]
    done = ctl("--endpoint", endpoints["a"], *flags, "--json", "status")
    assert done.returncode == 0, done.stderr
    assert {site["state"] for site in json.loads(done.stdout)["sites"]} == {"SYNC"}  # both sites, over TLS
    done = ctl("--witness", endpoints["witness"], *flags, "witness", "status")
    assert done.returncode == 0, done.stderr
    assert ctl("--endpoint", endpoints["a"], "status").returncode != 0  # no certificate: refused
    local = subprocess.run(
        [sys.executable, "-m", "replicator.local", "status", "--dir", str(deployment.directory)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=30,
    )
    assert local.returncode == 0, local.stdout + local.stderr
    assert local.stdout.count("SERVING") == 3


# ---------------------------------------------------------------- failover: the witness over TLS


def test_sigkill_then_failover_needs_the_witness_over_tls(
    deployment: LocalCluster, endpoints: dict[str, str], client_tls: TlsFiles
) -> None:
    with client(endpoints["a"], client_tls) as one:
        one.put(BUCKET, "before-kill", b"acknowledged by both")
    # Kill the preferred site: b is granted SOLO only by the witness (after the preferred grace).
    deployment.kill("a", signal.SIGKILL)
    wait_for(lambda: state(endpoints["b"], client_tls) == "SOLO", 15, "b to be SOLO")
    pairs = witness_status(endpoints["witness"], tls=client_tls, timeout_ms=5000)
    assert [(p.mode.name, p.holder) for p in pairs] == [("SOLO", "b")]
    granted = [
        json.loads(line)
        for line in (deployment.directory / "witness.log").read_text().splitlines()
        if '"event":"granted"' in line
    ]
    assert any(e.get("request") == "arbitrate" and e.get("site_", e.get("site")) == "b" for e in granted), granted
    with client(endpoints["b"], client_tls) as one:
        assert one.status().witness_reachable
        assert one.get(BUCKET, "before-kill") == b"acknowledged by both"
        one.put(BUCKET, "while-solo", b"written at b alone")
    # a comes back, resynchronises over the mTLS link and the pair is SYNC again (MarkSynced over TLS).
    deployment.restart("a")
    wait_for(lambda: all(state(endpoints[s], client_tls) == "SYNC" for s in "ab"), 30, "the pair back in SYNC")
    # Right after SYNC, a serves reads once it holds a read lease from b's frames (a heartbeat or so).
    with client(endpoints["a"], client_tls) as one:
        wait_for(lambda: one.get(BUCKET, "while-solo") == b"written at b alone", 10, "a to read b's SOLO write")
    with pytest.raises(NotFound):
        with client(endpoints["a"], client_tls) as one:
            one.get(BUCKET, "never-written")


# ---------------------------------------------------------------- replicator-local up --tls


def test_command_line_up_with_tls(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = subprocess.Popen(
        [sys.executable, "-m", "replicator.local", "up", "--dir", str(directory), "--tls", "--stop-timeout", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    document: dict[str, object] = {}
    try:
        assert up.stdout is not None
        assert up.stdout.readline().startswith("replicator-local: cluster up in")
        document = json.loads((directory / "cluster.json").read_text())
        assert document["tls"]["cert"] == str(directory / "tls" / "client.pem")  # type: ignore[index]
        status = subprocess.run(
            [sys.executable, "-m", "replicator.local", "status", "--dir", str(directory)],
            capture_output=True,
            text=True,
            env=environment,
            timeout=30,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") == 3
        up.send_signal(signal.SIGTERM)
        _, stderr = up.communicate(timeout=30)
        assert up.returncode == 0, stderr
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        entries = [document.get("witness"), *(document.get("sites") or {}).values()]  # type: ignore[union-attr]
        for entry in entries:
            if entry and same_process(entry["pid"], entry["config"]):  # type: ignore[index]
                os.kill(entry["pid"], signal.SIGKILL)  # type: ignore[index]
    # Started again without --tls, the directory keeps its TLS configuration.
    again = LocalCluster(directory)
    again.configure()
    assert again.tls and again.client_tls is not None
