"""Nothing corrupt is served: every value read is a value some client wrote to that key.

A read of a value nobody ever tried to write (not even by a failed or timed-out write)
means the system served bytes it made up: a corrupt or mis-routed value. The
linearizability checker also rejects such a history, but this checker says so plainly and
checks every read, not just the first violation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from chaos.checkers.history import as_operations
from chaos.checkers.verdict import STATUS_OK, STATUS_VIOLATION, Verdict

CHECKER = "corruption"
CORRUPT_READS_MAX = 20


def check(history: Any, *, corrupt_reads_max: int = CORRUPT_READS_MAX) -> Verdict:
    """Every ok read returns None or a value written (invoked, whatever its outcome) to that key. Pure."""
    operations = as_operations(history)
    written: dict[Any, set[Any]] = defaultdict(set)
    keys_by_value: dict[Any, set[Any]] = defaultdict(set)
    for op in operations:
        if op.f == "write":
            written[op.key].add(op.value)
            keys_by_value[op.value].add(op.key)
    corrupt = [
        op
        for op in operations
        if op.f == "read" and op.status == "ok" and op.value is not None and op.value not in written[op.key]
    ]
    reads = sum(1 for op in operations if op.f == "read" and op.status == "ok")
    details = {"reads": reads, "corrupt_reads": len(corrupt)}
    if not corrupt:
        return Verdict(CHECKER, STATUS_OK, message=f"all {reads} reads returned written values", details=details)
    first = corrupt[0]
    elsewhere = sorted(keys_by_value.get(first.value, set()), key=repr)
    where = f" (it was written to other key(s) {elsewhere[:5]!r}: mis-routed?)" if elsewhere else ""
    message = (
        f"{len(corrupt)} read(s) returned a value never written to the key; first: process {first.process!r} "
        f"read {first.value!r} from key {first.key!r} (line {first.line}){where}"
    )
    return Verdict(
        CHECKER,
        STATUS_VIOLATION,
        message=message,
        key=first.key,
        window=tuple(op.to_dict() for op in corrupt[:corrupt_reads_max]),
        details=details,
    )
