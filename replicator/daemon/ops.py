"""What a site keeps for its operator: resync progress, and the event stream.

`ResyncProgress` follows one resync as the shell sees it (the core keeps the
dirty set and the scan cursor; the shell counts what it loads and sends), so
`status` can show done/total keys with a rate and an estimated end.

`EventBus` keeps the recent operator events (role changes, failovers, resync
start/progress/end, verify results, witness answers, admin actions) and hands
new ones to every follower of `replicatorctl events`. It listens to the JSON
log (replicator.daemon.logs.add_listener), so an event is in the stream
exactly when it is in the log, with the same fields. Followers that do not
keep up lose events (each follower's queue is bounded) and are told how many.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["EVENTS", "EventBus", "ResyncProgress"]

# The log events an operator follows (the rest stay in the log only).
EVENTS = frozenset(
    {
        "started",
        "stopping",
        "signal",
        "role",
        "failover_forced",
        "switchover",
        "verify",
        "witness_answer",
        "witness_failed",
        "witness_behind",
        "witness_mismatch",
        "link_up",
        "link_down",
        "link_refused",
        "generation",
        "resync_started",
        "resync_progress",
        "resync_done",
        "resync_cleared",
        "admin",
        "drain",
        "start_failed",
    }
)
HISTORY_MAX = 1000
FOLLOWER_QUEUE_MAX = 10_000


class ResyncProgress:
    """One resync: kind ("incremental" or "full"), keys done of total, rate and ETA."""

    def __init__(self) -> None:
        self.kind = ""
        self.done = 0
        self.total = 0
        self.started = 0.0
        self.last_logged = 0.0

    def begin(self, kind: str, total: int, now: float | None = None) -> None:
        self.kind, self.done, self.total = kind, 0, max(total, 0)
        self.started = self.last_logged = time.monotonic() if now is None else now

    def end(self) -> None:
        self.kind, self.done, self.total = "", 0, 0

    @property
    def active(self) -> bool:
        return bool(self.kind)

    def advance(self, keys: int) -> None:
        self.done += keys
        self.total = max(self.total, self.done)

    def set_remaining(self, remaining: int) -> None:
        """Incremental: what is left is the dirty set; keys that joined it count to the total."""
        self.total = max(self.total, self.done + remaining)
        self.done = max(self.total - remaining, 0)

    def rate(self, now: float | None = None) -> float:
        elapsed = (time.monotonic() if now is None else now) - self.started
        return self.done / elapsed if self.active and elapsed > 0 else 0.0

    def eta_s(self, now: float | None = None) -> float:
        rate = self.rate(now)
        return (self.total - self.done) / rate if rate > 0 else 0.0

    def fields(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "done": self.done,
            "total": self.total,
            "rate_keys_per_s": round(self.rate(), 1),
            "eta_s": round(self.eta_s(), 1),
        }


class EventBus:
    """The recent operator events, and their followers."""

    def __init__(self, history_max: int = HISTORY_MAX, queue_max: int = FOLLOWER_QUEUE_MAX) -> None:
        self.history: deque[str] = deque(maxlen=history_max)
        self.queue_max = queue_max
        self.followers: set[asyncio.Queue[str]] = set()
        self.lost: dict[asyncio.Queue[str], int] = {}
        self.sequence = itertools.count(1)

    def on_log(self, record: dict[str, Any]) -> None:
        """A listener of the JSON log: keep and pass on the events in EVENTS."""
        if record.get("event") not in EVENTS:
            return
        line = json.dumps({**record, "seq": next(self.sequence)}, separators=(",", ":"), ensure_ascii=False)
        self.history.append(line)
        for queue in list(self.followers):
            if queue.full():
                self.lost[queue] = self.lost.get(queue, 0) + 1
            else:
                queue.put_nowait(line)

    async def follow(self, history: bool, follow: bool = True) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(self.queue_max)
        kept = list(self.history) if history else []
        if follow:
            self.followers.add(queue)
        try:
            for line in kept:
                yield line
            while follow:
                yield await queue.get()
                # What was lost came after everything queued: say so once the queue is drained.
                lost = self.lost.pop(queue, 0) if queue.empty() else 0
                if lost:
                    yield json.dumps({"event": "events_lost", "count": lost, "reason": "the follower fell behind"})
        finally:
            self.followers.discard(queue)
            self.lost.pop(queue, None)
