"""Operation histories: the JSONL event format, parsing, and an in-memory builder.

Event format (one JSON object a line, or a dict per event in memory)::

    {"process": 3, "type": "invoke", "f": "write", "key": "k1", "value": "v7", "time": 123456789}
    {"process": 3, "type": "ok",     "f": "write", "key": "k1", "value": "v7", "time": 123460000}

- ``process``: int or str. A process is sequential: it has at most one
  outstanding operation. After ``info`` it may invoke again (same or new id).
- ``type``: ``invoke`` | ``ok`` | ``fail`` (definitely not applied) |
  ``info`` (outcome unknown: it may take effect at any time after its invoke, or never).
- ``f``: ``read`` | ``write`` | ``delete``.
- ``key``: any JSON scalar.
- ``value``: for a write, the value written (on the invoke; the completion may repeat it or
  carry null); for a read, the completion carries the value read, null for absent; a delete
  carries null. Non-scalar values (lists, objects) are compared by their canonical JSON.
- ``time``: integer nanoseconds from a monotonic clock shared by all processes of the run.
  A completion's time must not be before its invoke's.

An invoke with no completion by the end of the history is treated as ``info``.
The initial state of every key is absent (null).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

EVENT_TYPES = ("invoke", "ok", "fail", "info")
FUNCTIONS = ("read", "write", "delete")
INFINITY = math.inf


class HistoryError(ValueError):
    """A malformed history: the message names the line (or event index) at fault."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


def canonical_value(value: Any) -> Any:
    """Values are compared for equality and hashed; make lists/dicts hashable by canonical JSON."""
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Operation:
    """One completed (or unknown-outcome) operation, paired from its invoke and completion events.

    ``status`` is ``"ok"``, ``"fail"`` or ``"info"``; ``return_time`` is ``math.inf`` for ``info``.
    ``value`` is the value written for a write, the value read for a read, None for a delete.
    ``index`` is the position of the invoke event in the history (0-based), ``line`` its line
    number when the history came from a file (else index + 1).
    """

    process: Any
    f: str
    key: Any
    value: Any
    invoke_time: int
    return_time: float
    status: str
    index: int
    line: int

    @property
    def is_write(self) -> bool:
        """Writes and deletes both set the register (a delete sets it to absent)."""
        return self.f != "read"

    def to_dict(self) -> dict[str, Any]:
        return {
            "process": self.process,
            "f": self.f,
            "key": self.key,
            "value": self.value,
            "status": self.status,
            "invoke_time": self.invoke_time,
            "return_time": None if self.return_time == INFINITY else self.return_time,
            "line": self.line,
        }


def _require(event: Mapping[str, Any], field: str, line: int) -> Any:
    if field not in event:
        raise HistoryError(f"missing field {field!r} in {json.dumps(event, default=str)[:200]}", line)
    return event[field]


def validate_event(event: Any, line: int) -> None:
    """Check one event's shape; raise HistoryError naming ``line``."""
    if not isinstance(event, Mapping):
        raise HistoryError(f"an event must be a JSON object, got {type(event).__name__}", line)
    process = _require(event, "process", line)
    if not isinstance(process, (int, str)) or isinstance(process, bool):
        raise HistoryError(f"'process' must be an int or a string, got {process!r}", line)
    kind = _require(event, "type", line)
    if kind not in EVENT_TYPES:
        raise HistoryError(f"'type' must be one of {', '.join(EVENT_TYPES)}, got {kind!r}", line)
    f = _require(event, "f", line)
    if f not in FUNCTIONS:
        raise HistoryError(f"'f' must be one of {', '.join(FUNCTIONS)}, got {f!r}", line)
    _require(event, "key", line)
    time = _require(event, "time", line)
    if not isinstance(time, int) or isinstance(time, bool) or time < 0:
        raise HistoryError(f"'time' must be a non-negative integer (nanoseconds), got {time!r}", line)
    if kind == "invoke" and f == "write" and "value" not in event:
        raise HistoryError("a write's invoke must carry the value written", line)
    if kind == "ok" and f == "read" and "value" not in event:
        raise HistoryError("a read's ok must carry the value read (null for absent)", line)


def parse_events(events: Iterable[Mapping[str, Any]], line_numbers: Iterable[int] | None = None) -> list[Operation]:
    """Pair invoke and completion events into operations, validating as we go.

    Events are paired per process in the order given (not by time). Returns the operations in
    invoke order (by time, then position). Raises HistoryError naming the line at fault.
    """
    events = list(events)
    lines = list(line_numbers) if line_numbers is not None else list(range(1, len(events) + 1))
    assert len(lines) == len(events), "one line number per event"
    outstanding: dict[Any, tuple[int, Mapping[str, Any]]] = {}
    operations: list[Operation] = []

    def make(index: int, invoke: Mapping[str, Any], completion: Mapping[str, Any] | None, status: str) -> Operation:
        f = invoke["f"]
        if f == "write":
            value = canonical_value(invoke["value"])
        elif f == "read":
            value = canonical_value(completion.get("value")) if completion is not None and status == "ok" else None
        else:
            value = None
        return_time: float = completion["time"] if completion is not None and status != "info" else INFINITY
        return Operation(
            process=invoke["process"],
            f=f,
            key=canonical_value(invoke["key"]),
            value=value,
            invoke_time=invoke["time"],
            return_time=return_time,
            status=status,
            index=index,
            line=lines[index],
        )

    for index, event in enumerate(events):
        line = lines[index]
        validate_event(event, line)
        process = event["process"]
        if event["type"] == "invoke":
            if process in outstanding:
                previous_line = lines[outstanding[process][0]]
                raise HistoryError(
                    f"process {process!r} invoked a new operation while its operation from line "
                    f"{previous_line} is still outstanding (processes must be sequential)",
                    line,
                )
            outstanding[process] = (index, event)
            continue
        if process not in outstanding:
            raise HistoryError(f"{event['type']!r} completion for process {process!r} with no outstanding invoke", line)
        invoke_index, invoke = outstanding.pop(process)
        if event["f"] != invoke["f"] or canonical_value(event["key"]) != canonical_value(invoke["key"]):
            raise HistoryError(
                f"completion ({event['f']} {event['key']!r}) does not match its invoke on line "
                f"{lines[invoke_index]} ({invoke['f']} {invoke['key']!r})",
                line,
            )
        if event["time"] < invoke["time"]:
            raise HistoryError(
                f"completion time {event['time']} is before its invoke's time {invoke['time']} (line "
                f"{lines[invoke_index]})",
                line,
            )
        operations.append(make(invoke_index, invoke, event, event["type"]))
    for invoke_index, invoke in outstanding.values():
        operations.append(make(invoke_index, invoke, None, "info"))
    operations.sort(key=lambda op: (op.invoke_time, op.index))
    return operations


def load_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL history file and validate it completely (shape and pairing).

    Blank lines are skipped. Raises HistoryError naming the line number of the first problem.
    Returns the events as dicts, in file order.
    """
    events: list[dict[str, Any]] = []
    lines: list[int] = []
    with open(path, encoding="utf-8") as stream:
        for number, text in enumerate(stream, start=1):
            if not text.strip():
                continue
            try:
                event = json.loads(text)
            except json.JSONDecodeError as error:
                raise HistoryError(f"not valid JSON: {error.msg} (column {error.colno})", number) from None
            validate_event(event, number)
            events.append(event)
            lines.append(number)
    parse_events(events, lines)
    return events


def load_operations(path: str | os.PathLike[str]) -> list[Operation]:
    """Read a JSONL history file into paired operations (line numbers are the file's)."""
    events: list[dict[str, Any]] = []
    lines: list[int] = []
    with open(path, encoding="utf-8") as stream:
        for number, text in enumerate(stream, start=1):
            if not text.strip():
                continue
            try:
                events.append(json.loads(text))
            except json.JSONDecodeError as error:
                raise HistoryError(f"not valid JSON: {error.msg} (column {error.colno})", number) from None
            lines.append(number)
    return parse_events(events, lines)


@dataclass(frozen=True)
class OpHandle:
    """What ``History.invoke`` returns: pass it to ``ok``/``fail``/``info``."""

    index: int
    process: Any
    f: str
    key: Any
    value: Any


class History:
    """An in-memory history builder for simulators and clients.

    >>> h = History()
    >>> op = h.invoke(1, "write", "k", "v1", time=10)
    >>> h.ok(op, time=20)
    >>> r = h.invoke(2, "read", "k", None, time=30)
    >>> h.ok(r, "v1", time=40)

    If ``clock`` (a callable returning integer nanoseconds) is given, ``time`` may be omitted.
    The builder enforces the same rules as the parser (one outstanding operation per process,
    completions not before invokes), raising HistoryError at the faulty call.
    """

    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self._clock = clock
        self._events: list[dict[str, Any]] = []
        self._outstanding: dict[Any, OpHandle] = {}
        self._invoke_times: dict[int, int] = {}

    def _time(self, time: int | None) -> int:
        if time is None:
            if self._clock is None:
                raise ValueError("no time given and the History has no clock")
            time = self._clock()
        return time

    def invoke(self, process: Any, f: str, key: Any, value: Any = None, time: int | None = None) -> OpHandle:
        time = self._time(time)
        event = {"process": process, "type": "invoke", "f": f, "key": key, "value": value, "time": time}
        line = len(self._events) + 1
        validate_event(event, line)
        if process in self._outstanding:
            raise HistoryError(f"process {process!r} already has an outstanding operation", line)
        handle = OpHandle(len(self._events), process, f, key, value)
        self._events.append(event)
        self._outstanding[process] = handle
        self._invoke_times[handle.index] = time
        return handle

    def _complete(self, handle: OpHandle, kind: str, value: Any, time: int | None) -> None:
        time = self._time(time)
        line = len(self._events) + 1
        if self._outstanding.get(handle.process) != handle:
            raise HistoryError(f"operation {handle} is not outstanding", line)
        if time < self._invoke_times[handle.index]:
            raise HistoryError(f"completion time {time} is before the invoke time", line)
        if handle.f == "write" and value is None:
            value = handle.value
        event = {
            "process": handle.process, "type": kind, "f": handle.f, "key": handle.key, "value": value, "time": time
        }
        validate_event(event, line)
        del self._outstanding[handle.process]
        self._events.append(event)

    def ok(self, handle: OpHandle, value: Any = None, time: int | None = None) -> None:
        """The operation completed; for a read, ``value`` is the value read (None for absent)."""
        self._complete(handle, "ok", value, time)

    def fail(self, handle: OpHandle, time: int | None = None) -> None:
        """The operation definitely did not take effect."""
        self._complete(handle, "fail", None, time)

    def info(self, handle: OpHandle, time: int | None = None) -> None:
        """The outcome is unknown (timeout, lost connection): it may take effect later, or never."""
        self._complete(handle, "info", None, time)

    def events(self) -> list[dict[str, Any]]:
        """A copy of the events so far, in the order they were recorded."""
        return [dict(event) for event in self._events]

    def operations(self) -> list[Operation]:
        return parse_events(self._events)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.events())

    def __len__(self) -> int:
        return len(self._events)

    def dumps(self) -> str:
        """The history as JSONL text."""
        return "".join(json.dumps(event, separators=(",", ":")) + "\n" for event in self._events)

    def dump(self, target: str | os.PathLike[str] | IO[str]) -> None:
        """Write the history as JSONL to a path or an open text stream."""
        if isinstance(target, (str, os.PathLike)):
            with open(target, "w", encoding="utf-8") as stream:
                stream.write(self.dumps())
        else:
            target.write(self.dumps())


def as_operations(history: Any) -> list[Operation]:
    """Accept a History, a list of Operations, or an iterable of event dicts."""
    if isinstance(history, History):
        return history.operations()
    items = list(history)
    if items and all(isinstance(item, Operation) for item in items):
        return sorted(items, key=lambda op: (op.invoke_time, op.index))
    return parse_events(items)


def final_state(state: Mapping[Any, Any]) -> dict[Any, Any]:
    """Canonicalise a site's final state (key -> value or None) for comparison."""
    if not isinstance(state, Mapping):
        raise HistoryError(f"a final state must be a JSON object mapping key to value, got {type(state).__name__}")
    return {canonical_value(key): canonical_value(value) for key, value in state.items()}
