"""Start and stop the gRPC servers of a site (data, admin, health) and of the witness.

The daemon calls `start_site_server(backend, config.listen.grpc, config.api,
config.tls.grpc)` after its backend is ready, and `await server.stop()` as
the first stage of shutdown (stop accepting; in-flight calls get `grace_s`).

Health (grpc.health.v1): the overall service "" is SERVING while the process
runs (liveness); "replicator.v1.ObjectService" and "replicator.v1.BlockService"
are SERVING only while the site's state lets it serve (SYNC or SOLO,
SiteStatus.serving), refreshed every api.health_refresh_ms; the admin service
is always SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from replicator.api.admin import AdminServicer
from replicator.api.backend import SiteBackend
from replicator.api.blocks import BlockServicer
from replicator.api.objects import ObjectServicer
from replicator.api.pieces import PieceStore, sweep_forever
from replicator.api.witness import WitnessBackend, WitnessServicer
from replicator.config import ApiConfig, S3Config, TlsFiles, parse_address
from replicator.daemon.logs import log
from replicator.v1 import admin_pb2_grpc, blocks_pb2_grpc, objects_pb2_grpc, witness_pb2_grpc

# A port belongs to one process (CONVENTIONS.md, "The daemon"): gRPC turns SO_REUSEPORT on by
# default, which lets a second instance bind the same port and take half of the connections.
EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


class ListenError(Exception):
    """A server cannot listen on its configured address (in use by another process, or not local)."""


DATA_SERVICES = ("replicator.v1.ObjectService", "replicator.v1.BlockService")
ADMIN_SERVICE = "replicator.v1.AdminService"
WITNESS_SERVICE = "replicator.v1.WitnessService"


def _stamp(tls: TlsFiles) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append((-1, -1))
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


def _checked(tls: TlsFiles) -> tuple[bytes, bytes, bytes]:
    """The three files, read and checked to belong together (the key matches the certificate)."""
    ca, cert, key = tls.read()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    context.load_verify_locations(cadata=ca.decode())
    return ca, cert, key


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """mTLS: present our certificate and require one signed by `tls.ca_file` from every client.

    Certificate rotation without a restart: before each new connection's handshake gRPC asks for the
    current configuration, and the files are read again when their modification time or size changed
    (a new certificate, key or CA bundle put in place, ideally by rename). A set that does not load
    together (a key that does not match, a bad file) is refused with `tls_reload_failed` and the
    previous one stays in use; a set taken is logged `tls_reloaded`. Connections already open keep
    the certificate they were made with."""
    ca, cert, key = tls.read()
    seen = {"stamp": _stamp(tls)}

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        stamp = _stamp(tls)
        if stamp == seen["stamp"]:
            return None
        seen["stamp"] = stamp
        try:
            new_ca, new_cert, new_key = _checked(tls)
        except (OSError, ValueError, ssl.SSLError) as error:
            log("tls_reload_failed", level="error", cert_file=tls.cert_file, error=error)
            return None
        log("tls_reloaded", cert_file=tls.cert_file, ca_file=tls.ca_file)
        return grpc.ssl_server_certificate_configuration([(new_key, new_cert)], root_certificates=new_ca)

    initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    address: str  # "host:port" actually bound (port 0 resolved)
    port: int
    health: health.aio.HealthServicer
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stores: list[PieceStore] = field(default_factory=list)
    _objects: list[ObjectServicer] = field(default_factory=list)

    async def stop(self, grace_s: float | None = 1.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.health.enter_graceful_shutdown()
        # Session streams never end on their own: ended here, so that a graceful stop does not wait out its
        # grace for them, and their clients learn at once to go to the other site (nothing unread applied).
        for objects in self._objects:
            objects.end_sessions()
        await self.server.stop(grace_s)
        for store in self._stores:
            for task in list(store.background):  # best-effort frees: the sweep finds what they leave
                task.cancel()


def _bind(server: grpc.aio.Server, listen: str, tls: TlsFiles | None) -> tuple[str, int]:
    host, _ = parse_address(listen)
    try:
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, server_credentials(tls))
    except RuntimeError:
        # grpc says only "Failed to bind"; with SO_REUSEPORT off that is nearly always a taken port.
        raise ListenError(f"cannot listen on {listen}: the address is in use by another process (or not local)") from None
    if port <= 0:  # older grpc versions return 0 instead of raising
        raise ListenError(f"cannot listen on {listen}: the address is in use by another process (or not local)")
    shown_host = f"[{host}]" if ":" in host else host
    return f"{shown_host}:{port}", port


async def start_site_server(
    backend: SiteBackend,
    listen: str = "127.0.0.1:0",
    config: ApiConfig | None = None,
    tls: TlsFiles | None = None,
    s3: S3Config | None = None,
) -> RunningServer:
    """`s3` holds the large objects' limits; when S3 is not enabled, this server sweeps their garbage."""
    config = config or ApiConfig()
    s3 = s3 or S3Config()
    options = [
        EXCLUSIVE_PORT,
        ("grpc.max_receive_message_length", config.message_bytes_max),
        ("grpc.max_send_message_length", config.message_bytes_max),
    ]
    server = grpc.aio.server(options=options)
    objects = ObjectServicer(backend, config, s3)
    objects_pb2_grpc.add_ObjectServiceServicer_to_server(objects, server)
    blocks_pb2_grpc.add_BlockServiceServicer_to_server(BlockServicer(backend, config), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(backend, config), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address, port = _bind(server, listen, tls)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(ADMIN_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await _set_data_health(health_servicer, backend)
    await server.start()
    running = RunningServer(server, address, port, health_servicer)
    running._tasks.append(asyncio.create_task(_follow_health(health_servicer, backend, config.health_refresh_ms)))
    running._stores.append(objects.large)
    running._objects.append(objects)
    if not s3.enabled:  # else the S3 endpoint sweeps the same keys
        sweep = sweep_forever(
            objects.large, s3.garbage_sweep_interval_ms / 1000, lambda: backend.status().serving, _ignore
        )
        running._tasks.append(asyncio.create_task(sweep, name="large-object-garbage-sweep"))
    return running


def _ignore(count: int) -> None:
    return None


async def _set_data_health(health_servicer: health.aio.HealthServicer, backend: SiteBackend) -> None:
    serving = backend.status().serving
    value = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in DATA_SERVICES:
        await health_servicer.set(service, value)


async def _follow_health(health_servicer: health.aio.HealthServicer, backend: SiteBackend, refresh_ms: int) -> None:
    while True:
        await asyncio.sleep(refresh_ms / 1000)
        await _set_data_health(health_servicer, backend)


async def start_witness_server(
    backend: WitnessBackend, listen: str = "127.0.0.1:0", tls: TlsFiles | None = None
) -> RunningServer:
    server = grpc.aio.server(options=[EXCLUSIVE_PORT])
    witness_pb2_grpc.add_WitnessServiceServicer_to_server(WitnessServicer(backend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address, port = _bind(server, listen, tls)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(WITNESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    return RunningServer(server, address, port, health_servicer)
