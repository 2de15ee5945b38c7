"""Configuration of the site-to-site link: limits and mutual TLS.

Both are validated when built: a bad value is refused with its key and the reason.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, fields
from pathlib import Path

from replicator.framing import FRAME_SIZE_BYTES_LIMIT, HEADER_BYTES


@dataclass(frozen=True, slots=True)
class LinkLimits:
    """Every bound of the link, with its unit last."""

    frame_size_bytes_max: int = 4 * 1024 * 1024
    # Sequenced frames sent and not yet acknowledged by the peer's link: `send` waits above this.
    inflight_bytes_max: int = 8 * 1024 * 1024
    # A LINK_ACK goes out when nothing else was sent for this long; it keeps the connection alive.
    heartbeat_interval_ms: int = 200
    # Nothing received for this long: the connection is dead (a black hole), drop it.
    heartbeat_timeout_ms: int = 2000
    # From TCP (and TLS) connect to the peer's HELLO.
    handshake_timeout_ms: int = 2000
    reconnect_backoff_ms_min: int = 20
    reconnect_backoff_ms_max: int = 2000
    # Size of each receive buffer the decoder reads the socket into.
    receive_buffer_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field.name}: must be a positive integer, got {value!r}")
        if not HEADER_BYTES < self.frame_size_bytes_max <= FRAME_SIZE_BYTES_LIMIT:
            raise ValueError(f"frame_size_bytes_max: must be in {HEADER_BYTES + 1}..{FRAME_SIZE_BYTES_LIMIT}")
        if self.inflight_bytes_max < self.frame_size_bytes_max:
            raise ValueError(
                "inflight_bytes_max: must be at least frame_size_bytes_max, or a frame could never be sent"
            )
        if self.heartbeat_timeout_ms <= 2 * self.heartbeat_interval_ms:
            raise ValueError("heartbeat_timeout_ms: must exceed twice heartbeat_interval_ms")
        if self.reconnect_backoff_ms_max < self.reconnect_backoff_ms_min:
            raise ValueError("reconnect_backoff_ms_max: must be at least reconnect_backoff_ms_min")
        if self.receive_buffer_bytes < 16 * 1024:
            raise ValueError("receive_buffer_bytes: must be at least 16384")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Mutual TLS: both ends present a certificate signed by `ca_path`.

    With `verify_peer_name`, the peer's certificate must also name the peer
    site (subjectAltName DNS entry or common name): the dialing end checks it
    as the server host name, the accepting end after the handshake.
    """

    ca_path: str
    cert_path: str
    key_path: str
    verify_peer_name: bool = True

    def __post_init__(self) -> None:
        for name in ("ca_path", "cert_path", "key_path"):
            path = getattr(self, name)
            if not isinstance(path, str | Path) or not Path(path).is_file():
                raise ValueError(f"{name}: no such file {path!r}")

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = ssl.create_default_context(purpose, cafile=str(self.ca_path))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert_path), str(self.key_path))
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        context = self._context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = self.verify_peer_name
        return context


def certificate_names(certificate: dict[str, object] | None) -> set[str]:
    """DNS names and common names in a certificate as returned by SSLSocket.getpeercert()."""
    names: set[str] = set()
    if not certificate:
        return names
    for kind, value in certificate.get("subjectAltName", ()):  # type: ignore[attr-defined]
        if kind in ("DNS", "IP Address"):
            names.add(value)
    for rdn in certificate.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    return names
