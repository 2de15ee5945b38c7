"""The site daemon's wall clock, with a test hook that makes it jump.

The protocol core takes wall-clock milliseconds for its hybrid logical clock and
for dedup ages; leases use the monotonic clock, which an NTP step does not move.
The chaos suite steps a site's wall clock the way a bad NTP server would: it sets
`REPLICATOR_CLOCK_FAULTS` to a file holding an offset in milliseconds (an integer,
may be negative; empty or missing means 0), and the daemon re-reads it at most
every POLL_S seconds. Without the variable the clock is plain `time.time`.
"""

from __future__ import annotations

import os
import time

CLOCK_ENVIRONMENT_VARIABLE = "REPLICATOR_CLOCK_FAULTS"
POLL_S = 0.05
OFFSET_MS_MAX = 10 * 24 * 3600 * 1000  # refuse absurd offsets (a typo in the control file)


class WallClock:
    def __init__(self, control_path: str | None = None) -> None:
        self.control_path = control_path
        self.offset_ms = 0
        self._next_poll = 0.0

    @classmethod
    def from_environment(cls) -> WallClock:
        return cls(os.environ.get(CLOCK_ENVIRONMENT_VARIABLE) or None)

    def now_ms(self) -> int:
        if self.control_path is not None:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + POLL_S
                self.offset_ms = read_offset(self.control_path)
        return time.time_ns() // 1_000_000 + self.offset_ms


def read_offset(path: str) -> int:
    """The offset in the control file; 0 when it is missing, empty or not a sane integer."""
    try:
        with open(path, encoding="ascii") as stream:
            text = stream.read().strip()
    except (OSError, UnicodeDecodeError):
        return 0
    try:
        offset = int(text) if text else 0
    except ValueError:
        return 0
    return offset if abs(offset) <= OFFSET_MS_MAX else 0
