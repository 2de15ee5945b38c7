"""A TCP proxy that injects faults, for tests and the chaos suite.

    proxy = FaultProxy(target=("127.0.0.1", port), seed=7)
    await proxy.start()                 # listens on proxy.address (127.0.0.1, ephemeral port)
    proxy.set_delay_ms(5)               # added latency, both directions
    proxy.set_throttle(1_000_000, UP)   # bytes per second
    proxy.set_blackhole(True, DOWN)     # swallow bytes one way; the connection stays open
    proxy.corrupt_next(UP)              # flip one bit in the next chunk going up
    proxy.set_corrupt_probability(0.01) # or in chunks at random
    proxy.set_cut_probability(0.001)    # cut the connection at a random chunk
    proxy.cut()                         # cut every connection now
    proxy.set_refuse(True)              # close new connections at once (a partition)
    await proxy.close()

`UP` is the direction client → target (the dialing end towards the
accepting end), `DOWN` the way back. Every random choice comes from one
seeded generator, so a run replays with the same seed (up to the timing of
the reads). Delays keep the order of the bytes: each chunk is delivered at
its arrival time plus the delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
from dataclasses import dataclass


class Direction(enum.Enum):
    UP = "up"
    DOWN = "down"


UP = Direction.UP
DOWN = Direction.DOWN
BOTH = (UP, DOWN)

CHUNK_BYTES_MAX = 64 * 1024


@dataclass(slots=True)
class _DirectionFaults:
    delay_ms: float = 0.0
    throttle_bytes_per_second: float = 0.0  # 0: no throttle
    blackhole: bool = False
    corrupt_probability: float = 0.0
    corrupt_pending: int = 0


@dataclass(slots=True)
class FaultProxyStats:
    connections: int = 0
    refused: int = 0
    cuts: int = 0
    corruptions: int = 0
    bytes_forwarded: int = 0
    bytes_blackholed: int = 0


def _directions(direction: Direction | tuple[Direction, ...]) -> tuple[Direction, ...]:
    return direction if isinstance(direction, tuple) else (direction,)


class _Pipe:
    """One proxied connection: two pumps, each a reader stage and a delayed writer stage."""

    def __init__(self, proxy: FaultProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.client = client
        self.target: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        try:
            self.target = await asyncio.open_connection(*self.proxy.target)
        except OSError:
            self.close()
            return
        up_reader, down_writer = self.client
        down_reader, up_writer = self.target
        for reader, writer, direction in ((up_reader, up_writer, UP), (down_reader, down_writer, DOWN)):
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
            self.tasks.append(asyncio.create_task(self._read(reader, queue, direction)))
            self.tasks.append(asyncio.create_task(self._write(writer, queue, direction)))
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.close()

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None], direction: Direction) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                chunk = await reader.read(CHUNK_BYTES_MAX)
                if not chunk:
                    break
                if self.proxy._cut_probability and self.proxy._rng.random() < self.proxy._cut_probability:
                    self.proxy.stats.cuts += 1
                    self.close()
                    return
                await queue.put((loop.time() + self.proxy._faults[direction].delay_ms / 1000, chunk))
        except (OSError, asyncio.IncompleteReadError):
            pass
        await queue.put(None)

    async def _write(self, writer: asyncio.StreamWriter, queue: asyncio.Queue[tuple[float, bytes] | None], direction: Direction) -> None:
        loop = asyncio.get_running_loop()
        faults = self.proxy._faults[direction]
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                deliver_at, chunk = item
                wait = deliver_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if faults.blackhole:
                    self.proxy.stats.bytes_blackholed += len(chunk)
                    continue
                if faults.corrupt_pending or (
                    faults.corrupt_probability and self.proxy._rng.random() < faults.corrupt_probability
                ):
                    if faults.corrupt_pending:
                        faults.corrupt_pending -= 1
                    damaged = bytearray(chunk)
                    bit = self.proxy._rng.randrange(len(damaged) * 8)
                    damaged[bit // 8] ^= 1 << (bit % 8)
                    chunk = bytes(damaged)
                    self.proxy.stats.corruptions += 1
                if faults.throttle_bytes_per_second:
                    await asyncio.sleep(len(chunk) / faults.throttle_bytes_per_second)
                writer.write(chunk)
                self.proxy.stats.bytes_forwarded += len(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for _, writer in filter(None, (self.client, self.target)):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        self.proxy._pipes.discard(self)


class FaultProxy:
    def __init__(self, target: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0), seed: int = 0) -> None:
        self.target = target
        self.listen = listen
        self.stats = FaultProxyStats()
        self._rng = random.Random(seed)
        self._faults = {UP: _DirectionFaults(), DOWN: _DirectionFaults()}
        self._cut_probability = 0.0
        self._refuse = False
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._pipe_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1], reuse_address=True)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse:
            self.stats.refused += 1
            writer.transport.abort()
            return
        self.stats.connections += 1
        pipe = _Pipe(self, (reader, writer))
        self._pipes.add(pipe)
        task = asyncio.current_task()
        assert task is not None
        self._pipe_tasks.add(task)
        try:
            await pipe.run()
        finally:
            self._pipe_tasks.discard(task)

    # --- controls -------------------------------------------------------------

    def set_delay_ms(self, delay_ms: float, direction: Direction | tuple[Direction, ...] = BOTH) -> None:
        for one in _directions(direction):
            self._faults[one].delay_ms = delay_ms

    def set_throttle(self, bytes_per_second: float, direction: Direction | tuple[Direction, ...] = BOTH) -> None:
        """Limit the rate (0 lifts the limit)."""
        for one in _directions(direction):
            self._faults[one].throttle_bytes_per_second = bytes_per_second

    def set_blackhole(self, on: bool, direction: Direction | tuple[Direction, ...] = BOTH) -> None:
        for one in _directions(direction):
            self._faults[one].blackhole = on

    def set_corrupt_probability(self, probability: float, direction: Direction | tuple[Direction, ...] = BOTH) -> None:
        for one in _directions(direction):
            self._faults[one].corrupt_probability = probability

    def corrupt_next(self, direction: Direction | tuple[Direction, ...] = BOTH, count: int = 1) -> None:
        """Flip one bit in each of the next `count` chunks."""
        for one in _directions(direction):
            self._faults[one].corrupt_pending += count

    def set_cut_probability(self, probability: float) -> None:
        self._cut_probability = probability

    def set_refuse(self, on: bool) -> None:
        self._refuse = on

    def cut(self) -> None:
        """Cut every open connection now (both sides see a reset)."""
        for pipe in list(self._pipes):
            self.stats.cuts += 1
            pipe.close()

    def heal(self) -> None:
        """Lift every fault."""
        for faults in self._faults.values():
            faults.delay_ms = 0.0
            faults.throttle_bytes_per_second = 0.0
            faults.blackhole = False
            faults.corrupt_probability = 0.0
            faults.corrupt_pending = 0
        self._cut_probability = 0.0
        self._refuse = False

    @property
    def open_connections(self) -> int:
        return len(self._pipes)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._pipe_tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
