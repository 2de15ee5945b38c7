"""Helpers of the NBD tests: real client tools, a started pair, a raw-socket NBD client for malformed input.

The Debian tools (libnbd-bin, nbdkit, qemu-utils, fio, fuse3, e2fsprogs,
python3-libnbd) are installed by `make tools-nbd` (which `make test` runs).
A missing tool skips its test on a developer machine and FAILS it under
CI=true, so a CI run can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from support import wait_for

from replicator.client import Client
from replicator.local import LocalCluster
from replicator.nbd import protocol as p

# nbdsh and python3-libnbd are built for Debian's python3, not the virtual environment's.
SYSTEM_PATH = "/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", "")
SYSTEM_ENV = {**os.environ, "PATH": SYSTEM_PATH, "LIBNBD_DEBUG": "0"}
SYSTEM_ENV.pop("PYTHONPATH", None)
SYSTEM_ENV.pop("VIRTUAL_ENV", None)


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool, path=SYSTEM_PATH) is None]
    if not missing:
        return
    message = f"missing NBD test tools {', '.join(missing)}: run `make tools-nbd`"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def run(command: list[str], timeout_s: float = 120, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=SYSTEM_ENV, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result  # type: ignore[no-any-return]


def state(endpoint: str) -> str:
    return str(Client([endpoint]).status().state)


# Direct NBD clients (fio, nbdcopy, qemu-img) do not reconnect: a pair that suspends for a moment
# because a loaded 2-core machine stalled the link past the launcher's 500 ms demo peer timeout would
# fail them, correctly but spuriously. Tests that do not test failover use this longer timeout.
STEADY_PEER_TIMEOUT_MS = 3000


def set_peer_timeout(cluster: LocalCluster, peer_timeout_ms: int) -> None:
    """Write the launcher's configuration files with `peer_timeout_ms` in both sites, before start()."""
    cluster.configure()
    for name in ("a", "b"):
        path = cluster.config_path(name)
        text = path.read_text()
        assert "peer_timeout_ms = 500\n" in text, "the launcher's demo settings changed"
        path.write_text(text.replace("peer_timeout_ms = 500\n", f"peer_timeout_ms = {peer_timeout_ms}\n"))
    cluster.processes.clear()  # start() configures again, from the edited files


def start_pair(cluster: LocalCluster, peer_timeout_ms: int | None = STEADY_PEER_TIMEOUT_MS) -> dict[str, str]:
    """Start the pair, wait for SYNC; return the gRPC ("a", "b"), NBD ("nbd_a", ...) and metrics addresses.

    `peer_timeout_ms` replaces the launcher's demo value in both site files (None: keep it)."""
    if peer_timeout_ms is not None:
        set_peer_timeout(cluster, peer_timeout_ms)
    cluster.start(sites=True)
    sites = cluster.cluster["sites"]
    endpoints = [sites["a"]["grpc"], sites["b"]["grpc"]]
    wait_for(lambda: all(state(e) == "SYNC" for e in endpoints), 30, "both sites in SYNC")
    return {
        "a": endpoints[0],
        "b": endpoints[1],
        "nbd_a": sites["a"]["nbd"],
        "nbd_b": sites["b"]["nbd"],
        "metrics_a": sites["a"]["metrics"],
        "metrics_b": sites["b"]["metrics"],
    }


def uri(address: str, volume: str) -> str:
    return f"nbd://{address}/{volume}"


class RawClient:
    """A deliberately low-level NBD client over a plain socket, for handshakes and requests the real
    clients would never send."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)

    def close(self) -> None:
        self.sock.close()

    def recv_exactly(self, count: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < count:
            chunk = self.sock.recv(count - len(chunks))
            if not chunk:
                raise ConnectionError(f"closed after {len(chunks)} of {count} bytes")
            chunks += chunk
        return bytes(chunks)

    def closed_by_server(self) -> bool:
        """True once the server has closed (EOF or reset) without sending anything more."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def greeting(self) -> int:
        magic, option_magic, flags = struct.unpack(">QQH", self.recv_exactly(18))
        assert (magic, option_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        return int(flags)

    def start(self, flags: int = p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES) -> None:
        self.greeting()
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; collect its replies up to the final one (ACK or an error)."""
        self.sock.sendall(p.encode_option(option, data))
        replies = []
        while True:
            got_option, reply, length = p.parse_option_reply(self.recv_exactly(p.OPTION_REPLY_BYTES))
            assert got_option == option, (got_option, option)
            replies.append((reply, self.recv_exactly(length)))
            if reply == p.REP_ACK or reply & (1 << 31):
                return replies

    def go(self, volume: str, structured: bool = False) -> tuple[int, int]:
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
        replies = self.option(p.OPT_GO, p.encode_info_request(volume, (p.INFO_BLOCK_SIZE,)))
        assert replies[-1][0] == p.REP_ACK, replies
        for reply, data in replies:
            kind, body = p.parse_info_reply(data) if reply == p.REP_INFO else (-1, b"")
            if kind == p.INFO_EXPORT:
                return p.parse_export_info(body)
        raise AssertionError(f"no NBD_INFO_EXPORT in {replies}")

    def request(self, command: int, offset: int, length: int, cookie: int = 1, flags: int = 0, data: bytes = b"") -> None:
        self.sock.sendall(p.encode_request(p.Request(flags, command, cookie, offset, length)) + data)

    def simple_reply(self) -> tuple[int, int]:
        """(cookie, error) of a simple reply."""
        header = p.parse_simple_reply(self.recv_exactly(p.SIMPLE_REPLY_BYTES))
        return header.cookie, header.error


def image(path: Path, size: int, seed: int) -> bytes:
    """A file of `size` pseudo-random bytes (with some all-zero stretches, which clients treat specially)."""
    import random

    generator = random.Random(seed)
    data = bytearray(generator.randbytes(size))
    for start in range(0, size, 1 << 20):
        data[start : start + 65536] = bytes(min(65536, size - start))
    path.write_bytes(data)
    return bytes(data)
