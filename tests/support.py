"""Helpers shared by the tests that drive real processes."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `predicate` until it holds; return how long that took, or fail naming `what`."""
    started = time.monotonic()
    last_error: Exception | None = None
    while time.monotonic() - started < timeout_s:
        try:
            if predicate():
                return time.monotonic() - started
        except Exception as error:  # a process that is starting answers nothing yet
            last_error = error
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last error: {last_error})")
