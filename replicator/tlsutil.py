"""A private CA and mutual-TLS certificates for local deployments and tests, made with the `openssl` CLI.

    ca = make_ca(directory)                                   # (ca.pem, ca.key)
    cert, key = make_certificate(directory, "a", ca)          # a.pem, a.key signed by the CA

Keys are P-256 EC keys written with mode 0600 (the files are created under
umask 077, then chmod'ed); certificates are 0644. A certificate carries
`subjectAltName` DNS:<name> plus every entry of `hosts` (IP addresses as IP
entries, the rest as DNS), and the common name <name>:

* the site-to-site link checks the peer's certificate against the peer
  *site name* (`replicator.transport.TlsConfig(verify_peer_name=True)`: the
  dialer as the TLS server name, the acceptor in the certificate's DNS names
  or CN), so a site's certificate must be made with `name` = the site name;
* gRPC clients dial `127.0.0.1:PORT` and check the server's certificate
  against that host, hence IP:127.0.0.1 (and DNS:localhost) by default.

`client` / `server` choose the extendedKeyUsage (clientAuth / serverAuth); a
site uses one certificate for its gRPC server, the link (both ends) and its
witness client, so it needs both. This is for a loopback demo and tests, not
a production PKI: the CA key sits next to the certificates.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["TlsError", "make_ca", "make_certificate", "openssl_available"]

CA_DAYS = 3650
CERT_DAYS = 825
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

# A self-contained `openssl req` configuration: no dependency on the system openssl.cnf.
_REQ_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca

[dn]
CN = {cn}

[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_LEAF_EXTENSIONS = """\
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {usage}
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


class TlsError(Exception):
    """openssl is missing or failed; the message carries its stderr."""


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*arguments: str, cwd: Path) -> None:
    if not openssl_available():
        raise TlsError("the openssl command is not installed (needed to make certificates)")
    result = subprocess.run(["openssl", *arguments], cwd=cwd, capture_output=True, text=True, umask=0o077, check=False)
    if result.returncode != 0:
        raise TlsError(f"openssl {arguments[0]} failed (exit {result.returncode}): {result.stderr.strip()}")


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"certificate name {name!r}: use letters, digits, '.', '_' or '-' (at most 63)")


def _protect(key: Path, cert: Path) -> None:
    os.chmod(key, 0o600)
    os.chmod(cert, 0o644)


def make_ca(
    directory: str | os.PathLike[str], name: str = "ca", *, common_name: str = "Replicator local CA"
) -> tuple[Path, Path]:
    """Make a self-signed CA in `directory`: returns (DIR/<name>.pem, DIR/<name>.key)."""
    _check_name(name)
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    config = directory / f"{name}.cnf"
    config.write_text(_REQ_CONFIG.format(cn=common_name.replace("\n", " ")))
    try:
        _openssl(
            "req", "-x509", "-config", config.name, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key.name, "-out", cert.name, "-days", str(CA_DAYS), "-sha256",
            "-set_serial", str(_serial()),
            cwd=directory,
        )  # fmt: skip
    finally:
        config.unlink(missing_ok=True)
    _protect(key, cert)
    return cert, key


def _serial() -> int:
    return secrets.randbits(127) | 1  # positive, non-zero, unique with overwhelming probability


def _san(name: str, hosts: Sequence[str]) -> str:
    entries: list[str] = []
    for host in (name, *hosts):
        try:
            entry = f"IP:{ipaddress.ip_address(host)}"
        except ValueError:
            entry = f"DNS:{host}"
        if entry not in entries:
            entries.append(entry)
    return ", ".join(entries)


def make_certificate(
    directory: str | os.PathLike[str],
    name: str,
    ca: tuple[str | os.PathLike[str], str | os.PathLike[str]],
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    client: bool = True,
    server: bool = True,
) -> tuple[Path, Path]:
    """Make DIR/<name>.pem and DIR/<name>.key, signed by `ca` = (ca_cert, ca_key).

    subjectAltName: DNS:<name> and `hosts`; CN=<name>; extendedKeyUsage serverAuth and/or clientAuth.
    """
    _check_name(name)
    for host in hosts:
        if not host or any(c in host for c in ", \n\t"):
            raise ValueError(f"host {host!r}: not a host name or IP address")
    if not (client or server):
        raise ValueError("a certificate must be usable as a client, a server or both")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = (Path(p).resolve() for p in ca)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    request, extensions, config = (directory / f"{name}.{suffix}" for suffix in ("csr", "ext", "cnf"))
    usage = ", ".join(u for u, wanted in (("serverAuth", server), ("clientAuth", client)) if wanted)
    config.write_text(_REQ_CONFIG.format(cn=name))
    extensions.write_text(_LEAF_EXTENSIONS.format(usage=usage, san=_san(name, hosts)))
    try:
        _openssl(
            "req", "-new", "-config", config.name, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key.name, "-out", request.name,
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", request.name, "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", str(_serial()), "-days", str(CERT_DAYS), "-sha256",
            "-extfile", extensions.name, "-extensions", "leaf", "-out", cert.name,
            cwd=directory,
        )  # fmt: skip
    finally:
        for temporary in (request, extensions, config):
            temporary.unlink(missing_ok=True)
    _protect(key, cert)
    return cert, key
