"""The one result type every checker returns.

A verdict has three possible statuses, and callers must tell them apart:

- ``"ok"``: the property holds for the input;
- ``"violation"``: the property is broken, and ``key``/``window``/``message``
  say where and why;
- ``"unknown"``: the checker ran out of its step budget before it could decide.
  This is never a pass: a run whose verdict is unknown proves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STATUS_OK = "ok"
STATUS_VIOLATION = "violation"
STATUS_UNKNOWN = "unknown"
STATUSES = (STATUS_OK, STATUS_VIOLATION, STATUS_UNKNOWN)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one checker on one input.

    ``window`` is a small list of operations (as plain dicts, see
    ``Operation.to_dict``) or events that exhibit the violation; ``details``
    holds checker-specific numbers (keys checked, search steps, differing keys).
    """

    checker: str
    status: str
    message: str = ""
    key: Any = None
    window: tuple[Mapping[str, Any], ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.status in STATUSES, f"bad verdict status {self.status!r}"
        # Freeze the window so a verdict can be shared between threads and hashed into reports safely.
        object.__setattr__(self, "window", tuple(self.window))

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def violation(self) -> bool:
        return self.status == STATUS_VIOLATION

    @property
    def unknown(self) -> bool:
        return self.status == STATUS_UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        return {
            "checker": self.checker,
            "ok": self.ok,
            "status": self.status,
            "message": self.message,
            "key": self.key,
            "window": [dict(item) for item in self.window],
            "details": dict(self.details),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, default=_json_default)

    def __str__(self) -> str:
        where = f" key={self.key!r}" if self.key is not None else ""
        return f"[{self.checker}] {self.status}{where}: {self.message}"


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if value == float("inf"):
        return None
    return str(value)


def combine(checker: str, verdicts: Sequence[Verdict]) -> Verdict:
    """Fold several verdicts into one: any violation wins, then any unknown, else ok.

    The first violation (or unknown) supplies the key, window and message; every
    verdict is kept, as a dict, in ``details["verdicts"]``.
    """
    verdicts = list(verdicts)
    for status in (STATUS_VIOLATION, STATUS_UNKNOWN):
        for verdict in verdicts:
            if verdict.status == status:
                return Verdict(
                    checker=checker,
                    status=status,
                    message=f"{verdict.checker}: {verdict.message}",
                    key=verdict.key,
                    window=verdict.window,
                    details={"verdicts": [v.to_dict() for v in verdicts]},
                )
    return Verdict(
        checker=checker,
        status=STATUS_OK,
        message="all checks passed",
        details={"verdicts": [v.to_dict() for v in verdicts]},
    )
