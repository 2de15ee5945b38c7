"""Convergence: once healed and idle, two sites hold identical data.

A state is a mapping key -> value; a missing key and a key mapped to None (absent,
deleted) are the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chaos.checkers.history import canonical_value
from chaos.checkers.verdict import STATUS_OK, STATUS_VIOLATION, Verdict

CHECKER = "convergence"
DIFFERING_KEYS_MAX = 20


def check(
    state_a: Mapping[Any, Any],
    state_b: Mapping[Any, Any],
    *,
    names: tuple[str, str] = ("a", "b"),
    differing_keys_max: int = DIFFERING_KEYS_MAX,
) -> Verdict:
    """Compare two final states. Pure.

    On a difference, ``details`` holds the counts (``differing``, ``only_in_<a>``,
    ``only_in_<b>``, ``different_value``) and ``window`` lists at most ``differing_keys_max``
    differing keys as ``{"key", <a>, <b>}`` dicts, in key order.
    """
    name_a, name_b = names
    assert name_a != name_b, "the two sites need different names"
    a = {canonical_value(k): canonical_value(v) for k, v in state_a.items() if v is not None}
    b = {canonical_value(k): canonical_value(v) for k, v in state_b.items() if v is not None}
    only_a = [k for k in a if k not in b]
    only_b = [k for k in b if k not in a]
    different = [k for k in a if k in b and a[k] != b[k]]
    differing = sorted(only_a + only_b + different, key=repr)
    details = {
        "keys": len(set(a) | set(b)),
        "differing": len(differing),
        f"only_in_{name_a}": len(only_a),
        f"only_in_{name_b}": len(only_b),
        "different_value": len(different),
    }
    if not differing:
        return Verdict(CHECKER, STATUS_OK, message=f"sites {name_a} and {name_b} hold identical data", details=details)
    shown = differing[:differing_keys_max]
    window = tuple({"key": k, name_a: a.get(k), name_b: b.get(k)} for k in shown)
    message = (
        f"sites {name_a} and {name_b} differ on {len(differing)} key(s) ({len(only_a)} only in {name_a}, "
        f"{len(only_b)} only in {name_b}, {len(different)} with different values); first: {shown[0]!r} "
        f"{name_a}={a.get(shown[0])!r} {name_b}={b.get(shown[0])!r}"
    )
    return Verdict(CHECKER, STATUS_VIOLATION, message=message, key=shown[0], window=window, details=details)
