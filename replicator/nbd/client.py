"""A small asyncio NBD client: the multipath endpoint's connection to one site's export.

It negotiates fixed newstyle with NBD_OPT_GO (asking for NBD_INFO_BLOCK_SIZE),
optionally after NBD_OPT_STARTTLS, with simple replies only (no structured
replies: the multipath endpoint forwards simple replies). Requests are
pipelined: `send` writes a request at once, a reader task matches replies
to cookies and calls `on_reply(cookie, error, data)`; when the connection
ends, `on_lost(reason)` is called once and no reply comes after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass

from replicator.nbd import protocol as p

__all__ = ["ExportInfo", "NbdClientError", "SiteConnection", "list_exports"]


class NbdClientError(Exception):
    """The server refused the negotiation (unknown export, TLS required, ...) or broke the protocol."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    size: int
    flags: int
    block_minimum: int = 1
    block_preferred: int = 4096
    block_maximum: int = 32 * 1024 * 1024


def client_ssl_context(ca_file: str, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def _read_option_reply(reader: asyncio.StreamReader, option: int) -> tuple[int, bytes]:
    got, reply, length = p.parse_option_reply(await reader.readexactly(p.OPTION_REPLY_BYTES))
    if got != option:
        raise NbdClientError(f"option reply for {got}, expected {option}")
    if length > p.OPTION_BYTES_MAX:
        raise NbdClientError(f"option reply of {length} bytes")
    return reply, await reader.readexactly(length)


async def _negotiate_start(
    address: str, ssl_context: ssl.SSLContext | None, timeout_s: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = _split(address)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        magic, option_magic, flags = struct.unpack(">QQH", await reader.readexactly(18))
        if (magic, option_magic) != (p.NBDMAGIC, p.IHAVEOPT) or not flags & p.FLAG_FIXED_NEWSTYLE:
            raise NbdClientError(f"{address} does not speak fixed newstyle NBD")
        writer.write(struct.pack(">I", p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES))
        if ssl_context is not None:
            writer.write(p.encode_option(p.OPT_STARTTLS))
            reply, data = await _read_option_reply(reader, p.OPT_STARTTLS)
            if reply != p.REP_ACK:
                raise NbdClientError(f"{address} refused STARTTLS: {data.decode(errors='replace')}")
            await writer.start_tls(ssl_context, server_hostname=host)
        return reader, writer
    except BaseException:
        writer.transport.abort()
        raise


async def list_exports(address: str, ssl_context: ssl.SSLContext | None = None, timeout_s: float = 5.0) -> list[str]:
    reader, writer = await _negotiate_start(address, ssl_context, timeout_s)
    try:
        writer.write(p.encode_option(p.OPT_LIST))
        names = []
        while True:
            reply, data = await asyncio.wait_for(_read_option_reply(reader, p.OPT_LIST), timeout_s)
            if reply == p.REP_ACK:
                return names
            if reply != p.REP_SERVER:
                raise NbdClientError(f"{address} refused NBD_OPT_LIST: {data.decode(errors='replace')}")
            (length,) = struct.unpack(">I", data[:4])
            names.append(data[4 : 4 + length].decode())
    finally:
        writer.transport.abort()


class SiteConnection:
    """One negotiated connection to one export of one site."""

    def __init__(
        self,
        address: str,
        export: str,
        on_reply: Callable[[int, int, bytes], None],
        on_lost: Callable[[str], None],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.export = export
        self.on_reply = on_reply
        self.on_lost = on_lost
        self.ssl_context = ssl_context
        self.info: ExportInfo | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.read_lengths: dict[int, int] = {}  # cookie -> bytes a successful READ reply carries
        self.reader_task: asyncio.Task[None] | None = None
        self.lost = False

    async def connect(self, timeout_s: float = 5.0) -> ExportInfo:
        reader, writer = await _negotiate_start(self.address, self.ssl_context, timeout_s)
        try:
            writer.write(p.encode_option(p.OPT_GO, p.encode_info_request(self.export, (p.INFO_BLOCK_SIZE,))))
            size = flags = -1
            minimum, preferred, maximum = 1, 4096, 32 * 1024 * 1024
            while True:
                reply, data = await asyncio.wait_for(_read_option_reply(reader, p.OPT_GO), timeout_s)
                if reply == p.REP_ACK:
                    break
                if reply != p.REP_INFO:
                    raise NbdClientError(
                        f"{self.address} refused export {self.export!r}: {data.decode(errors='replace')}"
                    )
                kind, body = p.parse_info_reply(data)
                if kind == p.INFO_EXPORT:
                    size, flags = p.parse_export_info(body)
                elif kind == p.INFO_BLOCK_SIZE:
                    minimum, preferred, maximum = p.parse_block_size_info(body)
            if size < 0:
                raise NbdClientError(f"{self.address} sent no NBD_INFO_EXPORT for {self.export!r}")
        except BaseException:
            writer.transport.abort()
            raise
        self.reader, self.writer = reader, writer
        self.info = ExportInfo(self.export, size, flags, minimum, preferred, maximum)
        self.reader_task = asyncio.create_task(self._read_replies(), name=f"nbd-upstream-{self.address}")
        return self.info

    def send(self, request: p.Request, payload: bytes = b"") -> None:
        assert self.writer is not None and not self.lost
        if request.command == p.CMD_READ:
            self.read_lengths[request.cookie] = request.length
        self.writer.writelines([p.encode_request(request), payload] if payload else [p.encode_request(request)])

    async def drain(self) -> None:
        if self.writer is not None and not self.lost:
            try:
                await self.writer.drain()
            except (ConnectionError, ssl.SSLError) as error:
                self._lose(f"send failed: {error}")

    async def _read_replies(self) -> None:
        assert self.reader is not None
        try:
            while True:
                header = p.parse_simple_reply(await self.reader.readexactly(p.SIMPLE_REPLY_BYTES))
                length = self.read_lengths.pop(header.cookie, 0)
                data = await self.reader.readexactly(length) if length and header.error == 0 else b""
                self.on_reply(header.cookie, header.error, data)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as error:
            self._lose(f"connection to {self.address} ended ({type(error).__name__})")
        except (p.ProtocolError, AssertionError, struct.error) as error:
            self._lose(f"{self.address} broke the protocol: {error}")

    def _lose(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = True
        if self.writer is not None:
            self.writer.transport.abort()
        self.on_lost(reason)

    async def close(self, disconnect: bool = True) -> None:
        if self.writer is not None and not self.lost:
            if disconnect:
                with contextlib.suppress(Exception):
                    self.writer.write(p.encode_request(p.Request(0, p.CMD_DISC, 0, 0, 0)))
                    await asyncio.wait_for(self.writer.drain(), 1.0)
            self.lost = True
            self.writer.transport.abort()
        if self.reader_task is not None:
            self.reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader_task
