"""Structured logs: one JSON object a line on stderr.

    from replicator.daemon.logs import configure, log
    configure("witness", site="w1")
    log("granted", pair="pair-1", site="a", epoch=3)
    # {"ts":"2024-05-01T12:00:00.123Z","level":"info","component":"witness",
    #  "site":"w1","event":"granted","pair":"pair-1","site_":"a","epoch":3}

Field values: bytes and bytearray are written as hex, enums by name, paths
and other unknown objects with str(); dataclasses become objects. A field
that collides with the envelope (ts, level, event, and component or site
when configured) is written with a trailing underscore so it never hides it.

The minimum level comes from `configure(level=...)` or the environment
variable REPLICATOR_LOG_LEVEL (debug, info, warning, error, critical).

Repeats do not flood: the events in RATE_LIMITED (witness retries, link
flaps, a fenced site's retries) are written at most REPEATS_MAX times per
REPEAT_WINDOW_S for one (event, level, reason) key; the next line of that key
after the window carries `"suppressed": N`, the number of lines left out.

Listeners (`add_listener`) get every record written, as a dict: the site's
event stream (`replicatorctl events`) is one.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import PurePath
from typing import IO, Any

__all__ = ["LEVELS", "RATE_LIMITED", "add_listener", "configure", "log", "remove_listener", "render"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

_lock = threading.Lock()
_state: dict[str, Any] = {
    "component": "",
    "site": "",
    "stream": None,  # None: sys.stderr at the time of writing (tests may swap it)
    "level": LEVELS.get(os.environ.get("REPLICATOR_LOG_LEVEL", "info").lower(), 20),
}


# Events an unhealthy pair repeats every few ms: at most REPEATS_MAX a window per key.
RATE_LIMITED = frozenset(
    {"witness_failed", "witness_answer", "peer_drop", "link_up", "link_down", "denied", "bad_frame", "link_failed"}
)
REPEATS_MAX = 5
REPEAT_WINDOW_S = 10.0
_KEYS_MAX = 256
_repeats: dict[tuple[str, str, str], list[float]] = {}  # key -> [window start, lines in window, suppressed]
_listeners: list[Callable[[dict[str, Any]], None]] = []


def add_listener(listener: Callable[[dict[str, Any]], None]) -> None:
    """Call `listener(record)` for every record written (under the log's lock: keep it cheap)."""
    with _lock:
        _listeners.append(listener)


def remove_listener(listener: Callable[[dict[str, Any]], None]) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def _repeat_key(event: str, level: str, fields: dict[str, Any]) -> tuple[str, str, str]:
    detail = fields.get("reason", fields.get("request", fields.get("error", "")))
    verdict = fields.get("verdict", "")
    return event, level, f"{str(detail)[:80]}|{verdict}"


def _admit(event: str, level: str, fields: dict[str, Any], now: float) -> int | None:
    """None: leave this line out. Otherwise the count of lines suppressed before it (0: none)."""
    key = _repeat_key(event, level, fields)
    entry = _repeats.get(key)
    if entry is None or now - entry[0] >= REPEAT_WINDOW_S:
        if len(_repeats) >= _KEYS_MAX:
            _repeats.clear()
        suppressed = int(entry[2]) if entry is not None else 0
        _repeats[key] = [now, 1, 0]
        return suppressed
    if entry[1] < REPEATS_MAX:
        entry[1] += 1
        return 0
    entry[2] += 1
    return None


def configure(component: str, site: str = "", *, level: str | None = None, stream: IO[str] | None = None) -> None:
    """Set the component ("witness", "site", "local") and site name every event carries."""
    if level is not None and level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (known: {', '.join(LEVELS)})")
    with _lock:
        _state["component"] = component
        _state["site"] = site
        _state["stream"] = stream
        if level is not None:
            _state["level"] = LEVELS[level.lower()]


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)


def _timestamp(now: float) -> str:
    seconds = int(now)
    millis = int((now - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def render(event: str, /, level: str = "info", **fields: Any) -> str:
    """The JSON line `log` would write (without the newline)."""
    return json.dumps(_record(event, level, fields), separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def _record(event: str, level: str, fields: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"ts": _timestamp(time.time()), "level": level}
    if _state["component"]:
        record["component"] = _state["component"]
    if _state["site"]:
        record["site"] = _state["site"]
    record["event"] = event
    for key, value in fields.items():
        while key in record:
            key = key + "_"
        record[key] = _plain(value)
    return record


def log(event: str, /, level: str = "info", **fields: Any) -> None:
    """Write one event as a JSON line on stderr; never raises on a closed stream."""
    if LEVELS.get(level, 20) < _state["level"]:
        return
    with _lock:
        if event in RATE_LIMITED:
            suppressed = _admit(event, level, fields, time.monotonic())
            if suppressed is None:
                return
            if suppressed:
                fields = {**fields, "suppressed": suppressed}
        record = _record(event, level, fields)
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=True) + "\n"
        stream = _state["stream"] or sys.stderr
        for listener in _listeners:
            try:
                listener(record)
            except Exception:  # noqa: BLE001 - a listener must not stop the log
                pass
        try:
            stream.write(line)
            stream.flush()
        except (OSError, ValueError):  # closed or broken stderr: logging must not kill the daemon
            pass
