"""The daemon's queues between layers, each with its bound and its behaviour at the bound.

- `FrameQueue`: frames the core made for the peer, waiting for the link sender (which waits
  for the link's in-flight window). Counted in bytes. It never refuses a frame: the core's own
  messages (acknowledgements, heartbeats, resync and reconcile parts) are bounded by the core's
  windows and must go out in order. What fills it is client writes, so while it holds
  `bytes_max` or more the daemon refuses new writes (UNAVAILABLE, overloaded) until the link
  has taken the backlog: back-pressure toward the writers, as the link's own window does.
- `Handles`: client requests waiting for the core's answer, at most `count_max`; one more is
  refused at once (UNAVAILABLE, overloaded), before the core sees it. The API's admission control
  (api/admission.py) bounds gRPC and S3 requests before they get here, but a List page reads all
  its keys at once and NBD has its own bounds: this is the bound on what the core is asked.

Both refuse with UNAVAILABLE (errors.Unavailable naming the other site), not RESOURCE_EXHAUSTED:
every front end (gRPC, S3, NBD) handles it, and nothing was applied; the client retries it.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Overloaded(Exception):
    """A bound was reached; the message names the bound and its configuration key."""


class FrameQueue:
    def __init__(self, bytes_max: int) -> None:
        assert bytes_max > 0
        self.bytes_max = bytes_max
        self.bytes = 0  # bytes of the frames queued
        self._queue: asyncio.Queue[tuple[int, bytearray]] = asyncio.Queue()

    def put(self, session: int, frame: bytearray) -> None:
        """Queue `frame`, made for link session `session`."""
        self.bytes += len(frame)
        self._queue.put_nowait((session, frame))

    async def get(self) -> tuple[int, bytearray]:
        session, frame = await self._queue.get()
        self.bytes -= len(frame)
        return session, frame

    def __len__(self) -> int:
        return self._queue.qsize()

    def drop_all(self) -> int:
        """Drop every queued frame (the session they were made for ended); how many were dropped."""
        dropped = 0
        while not self._queue.empty():
            _, frame = self._queue.get_nowait()
            self.bytes -= len(frame)
            dropped += 1
        assert self.bytes == 0, self.bytes
        return dropped

    def check_room(self) -> None:
        """Raise Overloaded while the queue holds `bytes_max` or more (a new write would add to it)."""
        if self.bytes >= self.bytes_max:
            raise Overloaded(
                f"overloaded: {self.bytes} bytes queued for the peer (site.send_queue_bytes_max = {self.bytes_max})"
            )


class Handles(dict[int, "asyncio.Future[Any]"]):
    """Requests waiting for the core, by handle; at most `count_max`."""

    def __init__(self, count_max: int) -> None:
        super().__init__()
        assert count_max > 0
        self.count_max = count_max

    def check_room(self) -> None:
        if len(self) >= self.count_max:
            raise Overloaded(
                f"overloaded: {len(self)} requests waiting for the core (site.requests_inflight_max = {self.count_max})"
            )
