"""The NBD server of a site: one export per block volume, a thin shell over the SiteBackend.

Theory of operation. Each accepted connection runs the fixed newstyle
handshake (protocol.py parses and encodes, this module only moves bytes),
then the transmission phase: one reader loop takes request headers (and a
write's payload) off the socket, and every request runs as its own task, so
replies go out in completion order, matched by cookie. A request takes a
permit of its connection (`nbd.inflight_requests_max`) and one of the site
(`nbd.site_inflight_requests_max`) before its payload is even read, so a
client that floods stops being read (TCP back-pressure does the rest).

What a reply means: a write is answered only once backend.write returned,
that is when the record is durable at both sites (or at the survivor holding
the witness's grant). Hence FLUSH and FUA cost nothing and CAN_MULTI_CONN is
honest: every answered write is visible to every connection, at both sites.

Alignment: the export advertises the volume's block size as the minimum
block size (NBD_INFO_BLOCK_SIZE); WRITE, TRIM and WRITE_ZEROES that are not
aligned to it are refused with EINVAL. A sub-block write would need a
read-modify-write, and two sites doing that to two halves of one block would
lose one half under last-writer-wins.

Errors: bad input gets NBD's errno (EINVAL out of range or misaligned,
ENOSPC a write past the end, EOVERFLOW a read over the maximum, EIO a
corrupt block or a deleted volume). Bad magic or a malformed request drops
the connection and changes nothing. When the site cannot serve (the backend
says Unavailable, a write's outcome is unknown, or the site's state is
FENCED, RESYNC_TARGET, STOPPED) the connection is hard-closed instead of
answered: NBD_ESHUTDOWN would make a client give up for good, while a closed
connection makes it reconnect (qemu's reconnect-delay) or, through the
multipath endpoint, resend to the other site.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from replicator.api import errors
from replicator.api.backend import SiteBackend
from replicator.api.keys import VolumeMeta
from replicator.config import ApiConfig, NbdConfig, TlsFiles, parse_address
from replicator.daemon.logs import log
from replicator.nbd import protocol as p
from replicator.nbd.volumes import VolumeGone, Volumes

# States in which the site's exports stay connected (SUSPENDED and RECONCILE are short: a request
# that the backend refuses in them drops its own connection).
CONNECTED_STATES = frozenset({"SYNC", "SOLO", "RESYNC_SOURCE", "SUSPENDED", "RECONCILE", "STARTING"})
# States in which a new connection is not even negotiated.
ACCEPTING_STATES = frozenset({"SYNC", "SOLO", "RESYNC_SOURCE"})
OPTIONS_MAX = 128  # options one handshake may send
PREFERRED_BLOCK_BYTES = 256 * 1024
WRITE_PAYLOAD_DRAIN_MAX = 32 * 1024 * 1024  # a too-large write up to this is read off and refused; above, dropped
KNOWN_FLAGS = p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_DF | p.CMD_FLAG_REQ_ONE | p.CMD_FLAG_FAST_ZERO

TRANSMISSION_FLAGS = (
    p.TFLAG_HAS_FLAGS
    | p.TFLAG_SEND_FLUSH
    | p.TFLAG_SEND_FUA
    | p.TFLAG_SEND_TRIM
    | p.TFLAG_SEND_WRITE_ZEROES
    | p.TFLAG_SEND_DF
    | p.TFLAG_CAN_MULTI_CONN
)


class _Drop(Exception):
    """Close this connection without an answer (protocol error, or the site cannot serve)."""


class _Refuse(Exception):
    """Answer this request with an NBD errno."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


@dataclass
class _Metrics:
    registry: Any = None
    connections: Any = None
    connections_open: Any = None
    requests: Any = None
    bytes: Any = None
    latency: Any = None
    errors: Any = None
    drops: Any = None

    @classmethod
    def create(cls, registry: Any) -> _Metrics:
        if registry is None:
            return cls()
        return cls(
            registry,
            registry.counter("replicator_nbd_connections_total", "NBD connections accepted"),
            registry.gauge("replicator_nbd_connections_open", "NBD connections open"),
            registry.counter("replicator_nbd_requests_total", "NBD requests by command and outcome", ["command", "outcome"]),
            registry.counter("replicator_nbd_bytes_total", "NBD payload bytes by direction", ["direction"]),
            registry.histogram("replicator_nbd_request_seconds", "NBD request latency", ["command"]),
            registry.counter("replicator_nbd_errors_total", "NBD errors answered, by errno", ["errno"]),
            registry.counter("replicator_nbd_drops_total", "NBD connections dropped, by reason", ["reason"]),
        )


@dataclass
class _Negotiated:
    meta: VolumeMeta
    structured: bool
    contexts: dict[int, str] = field(default_factory=dict)


def _server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca_file))
    context.load_cert_chain(str(files.cert_file), str(files.key_file))
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class NbdServer:
    """Serves every block volume of `backend` as an NBD export on `config.listen`."""

    def __init__(
        self,
        backend: SiteBackend,
        config: NbdConfig,
        api: ApiConfig,
        tls: TlsFiles | None = None,
        registry: Any = None,
    ) -> None:
        self.backend = backend
        self.config = config
        self.api = api
        self.volumes = Volumes(backend, api)
        self.ssl_context = _server_ssl_context(tls) if tls is not None else None
        self.metrics = _Metrics.create(registry)
        self.request_bytes_max = min(config.request_bytes_max, api.block_write_bytes_max, api.block_read_bytes_max)
        self.site_permits = asyncio.Semaphore(config.site_inflight_requests_max)
        self.connections: set[_Connection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.address = ""
        self.timeout_s = api.request_timeout_ms / 1000

    async def start(self) -> None:
        host, port = parse_address(self.config.listen)
        # reuse_port stays off: a port belongs to one process (a second one fails at start-up).
        self.server = await asyncio.start_server(self._accept, host, port, reuse_address=True, limit=1 << 16)
        bound = self.server.sockets[0].getsockname()
        self.address = f"{host}:{bound[1]}"
        self.watcher = asyncio.create_task(self._watch(), name="nbd-state-watch")

    async def stop(self) -> None:
        """Stop accepting, then hard-close every connection (in-flight writes still finish in the backend)."""
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        if self.server is not None:
            self.server.close()
        self.drop_all("shutdown")
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)

    def drop_all(self, reason: str) -> None:
        if self.connections:
            log("nbd_drop_all", connections=len(self.connections), reason=reason)
        for connection in list(self.connections):
            connection.drop(reason)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.state_poll_ms / 1000)
            state = self.backend.status().state
            if state not in CONNECTED_STATES and self.connections:
                self.drop_all(f"site is {state}")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, reader, writer)
        if len(self.connections) >= self.config.connections_max:
            self._count_drop("connections_max")
            writer.transport.abort()
            return
        if self.backend.status().state not in ACCEPTING_STATES:
            self._count_drop("not serving")
            writer.transport.abort()
            return
        self.connections.add(connection)
        if self.metrics.connections is not None:
            self.metrics.connections.inc()
            self.metrics.connections_open.inc()
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            if self.metrics.connections_open is not None:
                self.metrics.connections_open.dec()

    def _count_drop(self, reason: str) -> None:
        if self.metrics.drops is not None:
            self.metrics.drops.labels(reason).inc()


class _Connection:
    def __init__(self, server: NbdServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.permits = asyncio.Semaphore(server.config.inflight_requests_max)
        self.write_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()
        self.dropped = False
        self.tls_active = False
        self.peer = writer.get_extra_info("peername")

    # ------------------------------------------------------------ plumbing
    def drop(self, reason: str) -> None:
        """Hard close: no more answers; the client sees the connection end."""
        if self.dropped:
            return
        self.dropped = True
        self.server._count_drop(reason)
        log("nbd_drop", peer=str(self.peer), reason=reason)
        self.writer.transport.abort()

    async def _read(self, count: int) -> bytes:
        try:
            return await self.reader.readexactly(count)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as error:
            raise _Drop(f"connection closed ({type(error).__name__})") from None

    async def _send(self, *pieces: bytes) -> None:
        if self.dropped:
            return
        async with self.write_lock:
            if self.dropped:
                return
            self.writer.writelines(pieces)
            try:
                await self.writer.drain()
            except (ConnectionError, ssl.SSLError) as error:
                raise _Drop(f"send failed ({type(error).__name__})") from None

    async def run(self) -> None:
        try:
            try:
                async with asyncio.timeout(self.server.config.handshake_timeout_ms / 1000):
                    negotiated = await self._handshake()
            except TimeoutError:
                raise _Drop("handshake timed out") from None
            if negotiated is None:
                return
            await self._transmission(negotiated)
        except _Drop as drop:
            self.drop(str(drop))
        except p.ProtocolError as error:
            self.drop(f"protocol error: {error}")
        finally:
            if self.tasks:
                # Requests already in the backend run to completion (their outcome is whatever
                # the backend decided); only their answers are lost with the connection.
                await asyncio.wait(list(self.tasks))
            if not self.dropped:
                self.dropped = True
                with contextlib.suppress(Exception):
                    self.writer.close()

    # ------------------------------------------------------------ handshake
    async def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        await self._send(p.encode_option_reply(option, reply, data))

    async def _option_error(self, option: int, reply: int, message: str) -> None:
        await self._send(p.encode_option_error(option, reply, message))

    async def _open(self, name: str) -> VolumeMeta:
        try:
            return await self.server.volumes.open(name, self.server.timeout_s)
        except (errors.Unavailable, errors.OutcomeUnknown, TimeoutError) as error:
            raise _Drop(f"site cannot serve: {error}") from None

    async def _handshake(self) -> _Negotiated | None:
        await self._send(p.encode_server_greeting())
        flags = p.parse_client_flags(await self._read(p.CLIENT_FLAGS_BYTES))
        no_zeroes = bool(flags & p.CLIENT_FLAG_NO_ZEROES)
        structured = False
        contexts: dict[int, str] = {}
        tls_required = self.server.ssl_context is not None
        for _ in range(OPTIONS_MAX):
            header = p.parse_option_header(await self._read(p.OPTION_HEADER_BYTES))
            data = await self._read(header.length) if header.length else b""
            option = header.option
            if tls_required and not self.tls_active and option not in (p.OPT_STARTTLS, p.OPT_ABORT):
                if option == p.OPT_EXPORT_NAME:
                    raise _Drop("NBD_OPT_EXPORT_NAME before STARTTLS while TLS is required")
                await self._option_error(option, p.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
                continue
            try:
                if option == p.OPT_EXPORT_NAME:
                    name = p.parse_export_name(data)
                    try:
                        meta = await self._open(name)
                    except errors.InvalidRequest as error:
                        raise _Drop(f"NBD_OPT_EXPORT_NAME: {error}") from None
                    await self._send(p.encode_export_name_reply(meta.size_bytes, TRANSMISSION_FLAGS, no_zeroes))
                    return _Negotiated(meta, structured, contexts)
                if option == p.OPT_ABORT:
                    with contextlib.suppress(_Drop):
                        await self._option_reply(option, p.REP_ACK)
                    return None
                if option == p.OPT_LIST:
                    if data:
                        await self._option_error(option, p.REP_ERR_INVALID, "NBD_OPT_LIST carries no data")
                        continue
                    await self._list(option)
                elif option == p.OPT_STARTTLS:
                    await self._starttls(option, data)
                elif option in (p.OPT_INFO, p.OPT_GO):
                    meta_or_none = await self._info(option, p.parse_info_request(data))
                    if option == p.OPT_GO and meta_or_none is not None:
                        return _Negotiated(meta_or_none, structured, contexts)
                elif option == p.OPT_STRUCTURED_REPLY:
                    if data:
                        await self._option_error(option, p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY carries no data")
                    elif structured:
                        await self._option_error(option, p.REP_ERR_INVALID, "structured replies already negotiated")
                    else:
                        structured = True
                        await self._option_reply(option, p.REP_ACK)
                elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                    request = p.parse_meta_context_request(data)
                    setting = option == p.OPT_SET_META_CONTEXT
                    if setting and not structured:
                        await self._option_error(
                            option, p.REP_ERR_INVALID, "NBD_OPT_SET_META_CONTEXT needs structured replies first"
                        )
                        continue
                    try:
                        await self._open(request.name)
                    except errors.InvalidRequest as error:
                        await self._option_error(option, p.REP_ERR_UNKNOWN, str(error))
                        continue
                    found = p.matching_contexts(request.queries, listing=not setting)
                    if setting:
                        contexts = dict(found)
                    for context_id, context_name in found:
                        await self._option_reply(option, p.REP_META_CONTEXT, p.encode_meta_context(context_id, context_name))
                    await self._option_reply(option, p.REP_ACK)
                else:
                    await self._option_error(option, p.REP_ERR_UNSUP, f"option {option} is not supported")
            except p.ProtocolError as error:
                # The option's data was read whole, so the stream is still in step: say so and go on.
                await self._option_error(option, p.REP_ERR_INVALID, str(error))
        raise _Drop(f"more than {OPTIONS_MAX} options in one handshake")

    async def _list(self, option: int) -> None:
        try:
            volumes = await self.server.volumes.list(self.server.config.exports_listed_max, self.server.timeout_s)
        except (errors.Unavailable, errors.OutcomeUnknown, TimeoutError) as error:
            raise _Drop(f"site cannot serve: {error}") from None
        for meta in volumes:
            description = f"{meta.size_bytes} bytes in {meta.block_size}-byte blocks"
            await self._option_reply(option, p.REP_SERVER, p.encode_server_entry(meta.name, description))
        await self._option_reply(option, p.REP_ACK)

    async def _starttls(self, option: int, data: bytes) -> None:
        context = self.server.ssl_context
        if context is None:
            await self._option_error(option, p.REP_ERR_POLICY, "this server is not configured for TLS")
            return
        if data:
            await self._option_error(option, p.REP_ERR_INVALID, "NBD_OPT_STARTTLS carries no data")
            return
        if self.tls_active:
            await self._option_error(option, p.REP_ERR_INVALID, "TLS is already active")
            return
        await self._option_reply(option, p.REP_ACK)
        try:
            await self.writer.start_tls(context)
        except (ssl.SSLError, ConnectionError, OSError) as error:
            raise _Drop(f"TLS handshake failed: {error}") from None
        self.tls_active = True

    async def _info(self, option: int, request: p.InfoRequest) -> VolumeMeta | None:
        try:
            meta = await self._open(request.name)
        except errors.InvalidRequest as error:
            await self._option_error(option, p.REP_ERR_UNKNOWN, str(error))
            return None
        maximum = self.server.request_bytes_max // meta.block_size * meta.block_size
        preferred = max(meta.block_size, min(PREFERRED_BLOCK_BYTES, maximum))
        await self._option_reply(option, p.REP_INFO, p.encode_info_export(meta.size_bytes, TRANSMISSION_FLAGS))
        await self._option_reply(option, p.REP_INFO, p.encode_info_block_size(meta.block_size, preferred, maximum))
        if p.INFO_NAME in request.requests:
            await self._option_reply(option, p.REP_INFO, p.encode_info_name(meta.name))
        if p.INFO_DESCRIPTION in request.requests:
            text = f"replicator volume {meta.name} at site {self.server.backend.site_name}"
            await self._option_reply(option, p.REP_INFO, p.encode_info_description(text))
        await self._option_reply(option, p.REP_ACK)
        return meta

    # ------------------------------------------------------------ transmission
    async def _transmission(self, negotiated: _Negotiated) -> None:
        server = self.server
        while not self.dropped:
            request = p.parse_request(await self._read(p.REQUEST_BYTES))
            if request.command == p.CMD_DISC:
                if self.tasks:
                    await asyncio.wait(list(self.tasks))
                return
            await self.permits.acquire()
            await server.site_permits.acquire()
            payload = b""
            if request.command == p.CMD_WRITE:
                try:
                    if request.length > WRITE_PAYLOAD_DRAIN_MAX:
                        raise _Drop(f"a write of {request.length} bytes")
                    payload = await self._read(request.length)
                except BaseException:
                    self.permits.release()
                    server.site_permits.release()
                    raise
            task = asyncio.create_task(self._serve(negotiated, request, payload))
            self.tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.permits.release()
        self.server.site_permits.release()
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            if not isinstance(error, _Drop):
                trace = "".join(traceback.format_exception(error))
                log("nbd_request_failed", level="error", error=repr(error), traceback=trace)
            self.drop(str(error) or type(error).__name__)

    async def _serve(self, negotiated: _Negotiated, request: p.Request, payload: bytes) -> None:
        metrics = self.server.metrics
        command = p.COMMAND_NAMES.get(request.command, "unknown")
        started = time.perf_counter()
        try:
            pieces = await self._execute(negotiated, request, payload)
            outcome = "ok"
        except _Refuse as refusal:
            outcome = "error"
            if metrics.errors is not None:
                metrics.errors.labels(str(refusal.errno)).inc()
            if negotiated.structured and request.command in (p.CMD_READ, p.CMD_BLOCK_STATUS):
                pieces = [p.encode_error_chunk(request.cookie, refusal.errno, refusal.message)]
            else:
                pieces = [p.encode_simple_reply(request.cookie, refusal.errno)]
        except (errors.Unavailable, errors.OutcomeUnknown, TimeoutError) as error:
            if metrics.requests is not None:
                metrics.requests.labels(command, "dropped").inc()
            raise _Drop(f"site cannot serve: {error}") from None
        if metrics.requests is not None:
            metrics.requests.labels(command, outcome).inc()
            metrics.latency.labels(command).observe(time.perf_counter() - started)
            if request.command == p.CMD_WRITE and outcome == "ok":
                metrics.bytes.labels("write").inc(len(payload))
            elif request.command == p.CMD_READ and outcome == "ok":
                metrics.bytes.labels("read").inc(request.length)
        await self._send(*pieces)

    def _check_range(self, meta: VolumeMeta, request: p.Request, past_end_errno: int) -> None:
        if request.length == 0:
            raise _Refuse(p.EINVAL, "zero-length request")
        if request.offset + request.length > meta.size_bytes:
            raise _Refuse(
                past_end_errno,
                f"bytes {request.offset}..{request.offset + request.length} are outside the "
                f"{meta.size_bytes}-byte export",
            )

    def _check_aligned(self, meta: VolumeMeta, request: p.Request) -> None:
        if request.offset % meta.block_size or request.length % meta.block_size:
            raise _Refuse(
                p.EINVAL,
                f"offset {request.offset} and length {request.length} must be multiples of the "
                f"{meta.block_size}-byte block size (NBD_INFO_BLOCK_SIZE minimum)",
            )

    async def _execute(self, negotiated: _Negotiated, request: p.Request, payload: bytes) -> list[bytes]:
        meta = negotiated.meta
        volumes = self.server.volumes
        timeout = self.server.timeout_s
        cookie = request.cookie
        if request.flags & ~KNOWN_FLAGS:
            raise _Refuse(p.EINVAL, f"unknown command flags 0x{request.flags:04x}")
        try:
            if request.command == p.CMD_READ:
                self._check_range(meta, request, p.EINVAL)
                if request.length > self.server.request_bytes_max:
                    raise _Refuse(p.EOVERFLOW, f"a read of {request.length} bytes, the maximum is {self.server.request_bytes_max}")
                data = await volumes.read(meta, request.offset, request.length, timeout)
                if negotiated.structured:
                    return p.encode_read_chunk(cookie, request.offset, data)
                return [p.encode_simple_reply(cookie), data]
            if request.command == p.CMD_WRITE:
                self._check_range(meta, request, p.ENOSPC)
                if request.length > self.server.request_bytes_max:
                    raise _Refuse(p.EINVAL, f"a write of {request.length} bytes, the maximum is {self.server.request_bytes_max}")
                self._check_aligned(meta, request)
                # Answered once durable at both sites: FUA needs nothing more.
                await volumes.write(meta, request.offset, payload, timeout)
                return [p.encode_simple_reply(cookie)]
            if request.command == p.CMD_FLUSH:
                # Every answered write is already durable at both sites.
                return [p.encode_simple_reply(cookie)]
            if request.command in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
                self._check_range(meta, request, p.ENOSPC if request.command == p.CMD_WRITE_ZEROES else p.EINVAL)
                self._check_aligned(meta, request)
                if request.command == p.CMD_TRIM:
                    await volumes.trim(meta, request.offset, request.length, timeout)
                else:
                    if request.flags & p.CMD_FLAG_FAST_ZERO and request.flags & p.CMD_FLAG_NO_HOLE:
                        # Writing zeros block by block is not fast: the spec wants ENOTSUP then.
                        raise _Refuse(p.ENOTSUP, "a fast zero that must allocate is not supported")
                    allocate = bool(request.flags & p.CMD_FLAG_NO_HOLE)
                    await volumes.write_zeroes(meta, request.offset, request.length, allocate, timeout)
                return [p.encode_simple_reply(cookie)]
            if request.command == p.CMD_BLOCK_STATUS:
                if not negotiated.structured or p.BASE_ALLOCATION_ID not in negotiated.contexts:
                    raise _Refuse(p.EINVAL, "NBD_CMD_BLOCK_STATUS needs structured replies and base:allocation")
                self._check_range(meta, request, p.EINVAL)
                bound = self.server.config.block_status_blocks_max * meta.block_size
                end = min(request.offset + request.length, (request.offset // meta.block_size) * meta.block_size + bound)
                allocated = await volumes.allocation(meta, request.offset, end - request.offset, timeout)
                extents = p.extents_from_allocation(allocated, meta.block_size, request.offset, end)
                if request.flags & p.CMD_FLAG_REQ_ONE:
                    extents = extents[:1]
                return [p.encode_block_status_chunk(cookie, p.BASE_ALLOCATION_ID, extents)]
            if request.command == p.CMD_CACHE:
                raise _Refuse(p.EINVAL, "NBD_CMD_CACHE is not advertised")
            raise _Refuse(p.EINVAL, f"unknown command {request.command}")
        except errors.InvalidRequest as error:
            raise _Refuse(p.EINVAL, error.message) from None
        except (VolumeGone, errors.Corrupt, errors.NotFound) as error:
            raise _Refuse(p.EIO, error.message) from None


async def start_nbd_server(
    backend: SiteBackend, config: NbdConfig, api: ApiConfig, tls: TlsFiles | None = None, registry: Any = None
) -> NbdServer:
    server = NbdServer(backend, config, api, tls, registry)
    await server.start()
    return server
