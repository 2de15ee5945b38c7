"""`replicator-nbd-multipath`: one NBD device for a host out of the two sites' exports.

    replicator-nbd-multipath --sites 127.0.0.1:10809 127.0.0.1:10810 --listen 127.0.0.1:10900
    replicator-nbd-multipath --sites A B --unix /run/replicator/nbd.sock --policy round-robin

Theory of operation. The endpoint is an NBD server for the host (loopback
or a unix socket) and an NBD client of each site (client.py). For every host
connection it keeps one connection per site to the same export, opened on
demand. Each host request becomes a `_Pending` entry that is sent to a site
(`local-preferred`: the first of --sites while it answers, the way ALUA
routes to the optimised path; `round-robin`: alternately) under a cookie of
the endpoint's own. A site's reply is forwarded to the host under the host's
cookie.

Failover: a site that fails drops its connections (that is how a site that
stops serving says so, never ESHUTDOWN). Every request still unanswered on
that connection goes back into the queue and is sent again to the other
site (or the same one once it accepts again), with backoff, until
`--retry-timeout-s` has passed; only then does the host get EIO. The host's
client sees a pause, not an error.

Why a resend never turns into a wrong result: a reply from a site means the
write is durable at both sites; no reply means the write either committed
(atomically, as one record) or not at all, and the same bytes written again
to the same blocks give the same contents. The host has no answer for it
yet, so by NBD's rules it has no ordering claim against any other write in
flight, and a write it sends after this one is answered is ordered after
the resend, which the surviving site serves only after it committed every
record it held prepared (docs/design.md, "Failure detection and
arbitration"). A reply with an NBD error (EINVAL, ENOSPC, EIO) is an answer
and is forwarded, not retried. Reads are idempotent.

Limits: simple replies only towards the host (no structured replies, hence
no BLOCK_STATUS and no DF through the endpoint); at most
`--inflight-max` requests in flight per host connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import ssl
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from replicator import __version__
from replicator.nbd import protocol as p
from replicator.nbd.client import ExportInfo, NbdClientError, SiteConnection, client_ssl_context, list_exports

__all__ = ["POLICIES", "MultipathConfig", "MultipathEndpoint", "Stats", "main"]

log = logging.getLogger("replicator.nbd.multipath")

POLICIES = ("local-preferred", "round-robin")
HOST_FLAGS = (
    p.TFLAG_HAS_FLAGS
    | p.TFLAG_SEND_FLUSH
    | p.TFLAG_SEND_FUA
    | p.TFLAG_SEND_TRIM
    | p.TFLAG_SEND_WRITE_ZEROES
    | p.TFLAG_CAN_MULTI_CONN
)
BACKOFF_S = (0.02, 0.05, 0.1, 0.2, 0.5)
OPTIONS_MAX = 64


@dataclass(frozen=True, slots=True)
class MultipathConfig:
    sites: tuple[str, ...]
    policy: str = "local-preferred"
    retry_timeout_s: float = 120.0
    connect_timeout_s: float = 2.0
    inflight_max: int = 64
    ssl_context: ssl.SSLContext | None = None


@dataclass
class _Pending:
    host_cookie: int
    request: p.Request
    payload: bytes
    deadline: float
    attempts: int = 0
    site: int = -1
    started: float = field(default_factory=time.monotonic)


@dataclass
class Stats:
    """What the endpoint did, for its log and for tests."""

    requests: int = 0
    resent: int = 0
    failovers: int = 0
    site_errors: int = 0
    gave_up: int = 0
    answered_by_site: dict[str, int] = field(default_factory=dict)


class _Session:
    """One host connection after negotiation: its site connections and its requests in flight."""

    def __init__(self, endpoint: MultipathEndpoint, export: str, writer: asyncio.StreamWriter) -> None:
        self.endpoint = endpoint
        self.config = endpoint.config
        self.export = export
        self.host_writer = writer
        self.sites: list[SiteConnection | None] = [None] * len(self.config.sites)
        self.inflight: dict[tuple[int, int], _Pending] = {}  # (site index, site cookie) -> pending
        self.queue: deque[_Pending] = deque()
        self.wakeup = asyncio.Event()
        self.cookies = itertools.count(1)
        self.permits = asyncio.Semaphore(self.config.inflight_max)
        self.turn = 0
        self.closed = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.down_until = [0.0] * len(self.config.sites)
        self.unusable = [False] * len(self.config.sites)
        self.dispatcher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ host side
    def submit(self, pending: _Pending) -> None:
        self.endpoint.stats.requests += 1
        self.idle.clear()
        self.queue.append(pending)
        self.wakeup.set()

    def _answer(self, pending: _Pending, error: int, data: bytes = b"") -> None:
        if not self.closed:
            self.host_writer.writelines([p.encode_simple_reply(pending.host_cookie, error), data] if data else [p.encode_simple_reply(pending.host_cookie, error)])
        self.permits.release()
        if not self.inflight and not self.queue:
            self.idle.set()

    # ------------------------------------------------------------ site side
    async def _site(self, index: int) -> SiteConnection | None:
        connection = self.sites[index]
        if connection is not None and not connection.lost:
            return connection
        if time.monotonic() < self.down_until[index]:
            return None
        address = self.config.sites[index]
        connection = SiteConnection(
            address,
            self.export,
            on_reply=lambda cookie, error, data, i=index: self._on_reply(i, cookie, error, data),
            on_lost=lambda reason, i=index: self._on_lost(i, reason),
            ssl_context=self.config.ssl_context,
        )
        try:
            await connection.connect(self.config.connect_timeout_s)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, NbdClientError, p.ProtocolError, ssl.SSLError) as error:
            if not self.unusable[index]:  # say it once per outage, not at every retry
                log.warning("multipath: site %s not usable for %r: %s", address, self.export, error)
            self.unusable[index] = True
            self.down_until[index] = time.monotonic() + 0.2
            return None
        if self.unusable[index]:
            log.warning("multipath: site %s takes requests for %r again", address, self.export)
        self.unusable[index] = False
        self.sites[index] = connection
        return connection

    async def _usable(self) -> list[tuple[int, SiteConnection]]:
        """The site connections to send to now: the first that works (local-preferred), or all (round-robin)."""
        usable: list[tuple[int, SiteConnection]] = []
        for index in range(len(self.config.sites)):
            connection = await self._site(index)
            if connection is not None:
                usable.append((index, connection))
                if self.config.policy == "local-preferred":
                    break
        return usable

    async def run_dispatcher(self) -> None:
        backoff = 0
        while not self.closed:
            if not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            usable = await self._usable()
            if not usable:
                # No site takes requests now: give up on those past their deadline, wait, try again.
                now = time.monotonic()
                for pending in [q for q in self.queue if q.deadline <= now]:
                    self.queue.remove(pending)
                    self.endpoint.stats.gave_up += 1
                    self._answer(pending, p.EIO)
                await asyncio.sleep(BACKOFF_S[min(backoff, len(BACKOFF_S) - 1)])
                backoff += 1
                continue
            backoff = 0
            used: dict[int, SiteConnection] = {}
            while self.queue:
                live = [(index, connection) for index, connection in usable if not connection.lost]
                if not live:
                    break
                # Round-robin alternates request by request; local-preferred has one connection here.
                index, connection = live[self.turn % len(live)]
                self.turn += 1
                pending = self.queue.popleft()
                if pending.attempts and pending.site != index:
                    self.endpoint.stats.resent += 1
                pending.attempts += 1
                pending.site = index
                cookie = next(self.cookies)
                self.inflight[(index, cookie)] = pending
                request = pending.request
                connection.send(p.Request(request.flags, request.command, cookie, request.offset, request.length), pending.payload)
                used[index] = connection
            for connection in used.values():
                await connection.drain()

    def _on_reply(self, index: int, cookie: int, error: int, data: bytes) -> None:
        pending = self.inflight.pop((index, cookie), None)
        if pending is None:
            return
        if error:
            self.endpoint.stats.site_errors += 1
        name = self.config.sites[index]
        self.endpoint.stats.answered_by_site[name] = self.endpoint.stats.answered_by_site.get(name, 0) + 1
        self._answer(pending, error, data)

    def _on_lost(self, index: int, reason: str) -> None:
        lost = [key for key in self.inflight if key[0] == index]
        if lost or not self.closed:
            log.warning("multipath: %s (%d request(s) to resend)", reason, len(lost))
        if lost:
            self.endpoint.stats.failovers += 1
        # Resent first, in the order they were first sent (site cookies grow).
        for key in sorted(lost, key=lambda k: k[1], reverse=True):
            self.queue.appendleft(self.inflight.pop(key))
        self.sites[index] = None
        self.down_until[index] = time.monotonic() + 0.05
        self.wakeup.set()

    async def close(self) -> None:
        self.closed = True
        self.wakeup.set()
        if self.dispatcher is not None:
            self.dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.dispatcher
        for connection in self.sites:
            if connection is not None:
                await connection.close()


class MultipathEndpoint:
    def __init__(self, config: MultipathConfig) -> None:
        if not config.sites:
            raise ValueError("at least one site is needed")
        if config.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {config.policy!r}")
        self.config = config
        self.stats = Stats()
        self.server: asyncio.AbstractServer | None = None
        self.address = ""
        self.sessions: set[_Session] = set()

    async def start(self, listen: str = "", unix: str = "") -> None:
        if unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix)
            self.server = await asyncio.start_unix_server(self._accept, unix)
            self.address = f"nbd+unix:///?socket={unix}"
            return
        host, _, port = listen.rpartition(":")
        self.server = await asyncio.start_server(self._accept, host.strip("[]"), int(port), reuse_address=True)
        self.address = f"{host}:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions):
            session.host_writer.transport.abort()
            await session.close()

    # ------------------------------------------------------------ host handshake
    async def _info(self, export: str) -> ExportInfo | None:
        for address in self.config.sites:
            connection = SiteConnection(address, export, lambda *a: None, lambda r: None, self.config.ssl_context)
            try:
                info = await connection.connect(self.config.connect_timeout_s)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, NbdClientError, p.ProtocolError, ssl.SSLError):
                continue
            await connection.close()
            return info
        return None

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> ExportInfo | None:
        writer.write(p.encode_server_greeting())
        flags = p.parse_client_flags(await reader.readexactly(p.CLIENT_FLAGS_BYTES))
        no_zeroes = bool(flags & p.CLIENT_FLAG_NO_ZEROES)
        for _ in range(OPTIONS_MAX):
            header = p.parse_option_header(await reader.readexactly(p.OPTION_HEADER_BYTES))
            data = await reader.readexactly(header.length) if header.length else b""
            option = header.option
            try:
                if option == p.OPT_EXPORT_NAME:
                    info = await self._info(p.parse_export_name(data))
                    if info is None:
                        return None
                    writer.write(p.encode_export_name_reply(info.size, HOST_FLAGS, no_zeroes))
                    return info
                if option == p.OPT_ABORT:
                    writer.write(p.encode_option_reply(option, p.REP_ACK))
                    return None
                if option == p.OPT_LIST:
                    names: list[str] | None = None
                    for address in self.config.sites:
                        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError, NbdClientError):
                            names = await list_exports(address, self.config.ssl_context, self.config.connect_timeout_s)
                            break
                    if names is None:
                        writer.write(p.encode_option_error(option, p.REP_ERR_SHUTDOWN, "no site answers now"))
                        continue
                    for name in names:
                        writer.write(p.encode_option_reply(option, p.REP_SERVER, p.encode_server_entry(name)))
                    writer.write(p.encode_option_reply(option, p.REP_ACK))
                elif option in (p.OPT_INFO, p.OPT_GO):
                    request = p.parse_info_request(data)
                    info = await self._info(request.name)
                    if info is None:
                        writer.write(p.encode_option_error(option, p.REP_ERR_UNKNOWN, f"no site serves export {request.name!r} now"))
                        continue
                    writer.write(p.encode_option_reply(option, p.REP_INFO, p.encode_info_export(info.size, HOST_FLAGS)))
                    writer.write(p.encode_option_reply(option, p.REP_INFO, p.encode_info_block_size(info.block_minimum, info.block_preferred, info.block_maximum)))
                    writer.write(p.encode_option_reply(option, p.REP_ACK))
                    if option == p.OPT_GO:
                        return info
                else:
                    writer.write(p.encode_option_error(option, p.REP_ERR_UNSUP, f"option {option} is not supported by the multipath endpoint"))
            except p.ProtocolError as error:
                writer.write(p.encode_option_error(option, p.REP_ERR_INVALID, str(error)))
            await writer.drain()
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            info = await asyncio.wait_for(self._handshake(reader, writer), 30)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, p.ProtocolError):
            writer.transport.abort()
            return
        if info is None:
            writer.transport.abort()
            return
        session = _Session(self, info.name, writer)
        self.sessions.add(session)
        session.dispatcher = asyncio.create_task(session.run_dispatcher())
        try:
            await self._transmission(session, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, p.ProtocolError) as error:
            log.info("multipath: host connection ended: %s", error)
        finally:
            self.sessions.discard(session)
            await session.close()
            writer.transport.abort()

    async def _transmission(self, session: _Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = p.parse_request(await reader.readexactly(p.REQUEST_BYTES))
            if request.command == p.CMD_DISC:
                await session.idle.wait()
                await writer.drain()
                return
            payload = b""
            if request.command == p.CMD_WRITE:
                if request.length > 64 * 1024 * 1024:
                    raise p.ProtocolError(f"a write of {request.length} bytes")
                payload = await reader.readexactly(request.length)
            await session.permits.acquire()
            session.submit(_Pending(request.cookie, request, payload, time.monotonic() + self.config.retry_timeout_s))
            await writer.drain()


async def _main(args: argparse.Namespace) -> int:
    ssl_context = None
    if args.ca:
        ssl_context = client_ssl_context(args.ca, args.cert, args.key)
    config = MultipathConfig(
        sites=tuple(args.sites),
        policy=args.policy,
        retry_timeout_s=args.retry_timeout_s,
        inflight_max=args.inflight_max,
        ssl_context=ssl_context,
    )
    endpoint = MultipathEndpoint(config)
    await endpoint.start(args.listen, args.unix)
    print(f"replicator-nbd-multipath: serving {endpoint.address} over {', '.join(config.sites)} ({config.policy})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await endpoint.stop()
    stats = endpoint.stats
    print(
        f"replicator-nbd-multipath: stopped; requests {stats.requests}, resent {stats.resent}, "
        f"failovers {stats.failovers}, site errors {stats.site_errors}, gave up {stats.gave_up}",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="replicator-nbd-multipath",
        description="One NBD device over both sites' exports: local-preferred or round-robin, resending on failover.",
    )
    parser.add_argument("--version", action="version", version=f"replicator-nbd-multipath {__version__}")
    parser.add_argument("--sites", nargs="+", required=True, metavar="HOST:PORT", help="the sites' NBD addresses, preferred first")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--listen", default="127.0.0.1:10809", help="loopback HOST:PORT to serve the host on")
    where.add_argument("--unix", default="", help="serve on this unix socket instead")
    parser.add_argument("--policy", choices=POLICIES, default="local-preferred")
    parser.add_argument("--retry-timeout-s", type=float, default=120.0, help="how long a request is resent before EIO")
    parser.add_argument("--inflight-max", type=int, default=64, help="requests in flight per host connection")
    parser.add_argument("--ca", default="", help="CA that signs the sites' certificates (enables STARTTLS)")
    parser.add_argument("--cert", default="", help="this host's client certificate (mutual TLS)")
    parser.add_argument("--key", default="", help="this host's client key")
    args = parser.parse_args(argv)
    if args.unix:
        args.listen = ""
    else:
        host = args.listen.rpartition(":")[0].strip("[]")
        if host not in ("127.0.0.1", "::1", "localhost"):
            parser.error(f"--listen must be a loopback address (the endpoint is for this host), got {args.listen!r}")
    for site in args.sites:
        if ":" not in site or not site.rpartition(":")[2].isdigit():
            parser.error(f"--sites: HOST:PORT expected, got {site!r}")
    if args.retry_timeout_s <= 0 or args.inflight_max <= 0:
        parser.error("--retry-timeout-s and --inflight-max must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
