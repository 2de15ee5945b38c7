"""NBD with mutual TLS (STARTTLS): the launcher's TLS layout, real libnbd clients, refusals.

With [tls.nbd] configured a site requires TLS: a plaintext client gets
NBD_REP_ERR_TLS_REQD for every option, a TLS client without a certificate
(or with one from another CA) fails the TLS handshake, and a client with
the deployment's client certificate reads and writes, across both sites.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_support import STEADY_PEER_TIMEOUT_MS, RawClient, require, run, set_peer_timeout
from support import wait_for

from replicator.client import Client
from replicator.config import load_site_config
from replicator.local import LocalCluster, free_ports
from replicator.nbd import protocol as p
from replicator.tlsutil import make_ca, make_certificate

MIB = 1 << 20


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("nbd-tls") / "deploy", tls=True, health_timeout_s=30) as cluster:
        set_peer_timeout(cluster, STEADY_PEER_TIMEOUT_MS)
        cluster.start(sites=True)
        sites = cluster.cluster["sites"]
        assert cluster.client_tls is not None
        client = Client([sites["a"]["grpc"], sites["b"]["grpc"]], tls=cluster.client_tls)
        client.create_volume("secure", 2 * MIB)
        yield cluster


def certificates(directory: Path, ca: Path, cert: Path | None, key: Path | None) -> Path:
    """A libnbd (GnuTLS) certificate directory: ca-cert.pem, client-cert.pem, client-key.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca, directory / "ca-cert.pem")
    if cert is not None and key is not None:
        shutil.copy(cert, directory / "client-cert.pem")
        shutil.copy(key, directory / "client-key.pem")
    return directory


def test_launcher_configures_nbd_tls(deployment: LocalCluster) -> None:
    for name in ("a", "b"):
        config = load_site_config(deployment.config_path(name))
        assert config.nbd.listen and config.tls.nbd is not None
        assert config.tls.nbd.cert_file == deployment.directory / "tls" / f"{name}.pem"


def test_plaintext_is_refused_with_tls_reqd(deployment: LocalCluster) -> None:
    raw = RawClient(deployment.cluster["sites"]["a"]["nbd"])
    try:
        raw.start()
        assert raw.option(p.OPT_LIST)[-1][0] == p.REP_ERR_TLS_REQD
        assert raw.option(p.OPT_GO, p.encode_info_request("secure"))[-1][0] == p.REP_ERR_TLS_REQD
        raw.sock.sendall(p.encode_option(p.OPT_EXPORT_NAME, b"secure"))
        assert raw.closed_by_server()  # EXPORT_NAME cannot be answered with an error: closed
    finally:
        raw.close()
    require("nbdinfo")
    result = run(["nbdinfo", f"nbd://{deployment.cluster['sites']['a']['nbd']}/secure"], check=False)
    assert result.returncode != 0


def test_tls_clients_with_and_without_a_certificate(deployment: LocalCluster, tmp_path: Path) -> None:
    require("nbdsh", "nbdinfo")
    tls = deployment.client_tls
    assert tls is not None
    sites = deployment.cluster["sites"]
    good = certificates(tmp_path / "good", tls.ca_file, tls.cert_file, tls.key_file)
    anonymous = certificates(tmp_path / "anonymous", tls.ca_file, None, None)
    rogue_ca = make_ca(tmp_path / "rogue", "rogue-ca")
    rogue_cert, rogue_key = make_certificate(tmp_path / "rogue", "client", rogue_ca, server=False)
    rogue = certificates(tmp_path / "rogue-dir", tls.ca_file, rogue_cert, rogue_key)

    def uri(site: str, directory: Path) -> str:
        return f"nbds://{sites[site]['nbd']}/secure?tls-certificates={directory}"

    info = json.loads(run(["nbdinfo", "--json", uri("a", good)]).stdout)["exports"][0]
    assert info["export-size"] == 2 * MIB
    def nbdsh(target: str, script: str) -> None:
        # nbd_connect_uri reads tls-certificates only when local file access is allowed.
        run(["nbdsh", "-c", f"h.set_uri_allow_local_file(True); h.connect_uri({target!r}); {script}"])

    nbdsh(uri("a", good), "h.pwrite(b'T' * 8192, 4096, nbd.CMD_FLAG_FUA)")
    check = "import sys; sys.exit(0 if h.pread(8192, 4096) == b'T' * 8192 else 3)"
    nbdsh(uri("b", good), check)
    for refused in (anonymous, rogue):
        result = run(["nbdinfo", uri("a", refused)], check=False)
        assert result.returncode != 0, refused
    # Refused clients changed nothing and the site still serves.
    nbdsh(uri("a", good), check)


def test_multipath_endpoint_speaks_tls_to_the_sites(deployment: LocalCluster, tmp_path: Path) -> None:
    require("nbdsh")
    tls = deployment.client_tls
    assert tls is not None
    sites = deployment.cluster["sites"]
    (port,) = free_ports(1)
    log = tmp_path / "multipath.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "replicator.nbd.multipath", "--sites", sites["a"]["nbd"], sites["b"]["nbd"],
             "--listen", f"127.0.0.1:{port}", "--ca", str(tls.ca_file), "--cert", str(tls.cert_file),
             "--key", str(tls.key_file)],
            stdout=output, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
    try:
        wait_for(lambda: "serving" in log.read_text(), 20, "the multipath endpoint listening")
        target = f"nbd://127.0.0.1:{port}/secure"
        run(["nbdsh", "-u", target, "-c", "h.pwrite(b'M' * 4096, 65536)"])
        run(["nbdsh", "-u", target, "-c", "import sys; sys.exit(0 if h.pread(4096, 65536) == b'M' * 4096 else 3)"])
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert Client([sites["b"]["grpc"]], tls=tls).read_blocks("secure", 16, 1) == b"M" * 4096
