"""No acknowledged write is lost: a site's final state must be one that the history allows.

For every key, the final value at a site is treated as a read invoked after every
operation of the history and never returning (an observation "at the end of time"), and the
key's history with that read appended must still be linearizable. That is exactly "the
final state equals the state after some linearization of the history": acknowledged writes
must be there unless an acknowledged-or-unknown write ordered after them replaced them;
unknown-outcome writes may or may not be there; failed writes must not be.

When it is not, the verdict names the acknowledged writes (or deletes) that are lost: those
that no later acknowledged write superseded for sure and whose value is not the final one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from chaos.checkers import linearizability
from chaos.checkers.history import INFINITY, Operation, as_operations, final_state
from chaos.checkers.verdict import STATUS_OK, STATUS_UNKNOWN, STATUS_VIOLATION, Verdict

CHECKER = "lost_writes"
LOST_WRITES_SHOWN_MAX = 5


def _lookup(state: Mapping[Any, Any], key: Any) -> Any:
    # JSON object keys are strings; histories may use integer keys.
    if key in state:
        return state[key]
    return state.get(str(key))


def _not_superseded(operations: Sequence[Operation]) -> list[Operation]:
    """Acknowledged writes/deletes that no other acknowledged write follows for sure in real time."""
    acknowledged = [op for op in operations if op.is_write and op.status == "ok"]
    if not acknowledged:
        return []
    latest_invoke = max(op.invoke_time for op in acknowledged)
    return [op for op in acknowledged if op.return_time >= latest_invoke]


def check_key(
    key: Any,
    operations: Sequence[Operation],
    final_value: Any,
    *,
    site: str = "final",
    step_budget: int = linearizability.STEP_BUDGET_DEFAULT,
    shrink_window: bool = True,
) -> Verdict:
    """Check one key: its operations plus the final value seen at ``site``. Pure."""
    operations = sorted(operations, key=lambda op: (op.invoke_time, op.index))
    finite = [t for op in operations for t in (op.invoke_time, op.return_time) if t != INFINITY]
    end = (max(finite) + 1) if finite else 0
    final_read = Operation(
        process=f"final:{site}",
        f="read",
        key=key,
        value=final_value,
        invoke_time=end,
        return_time=INFINITY,
        status="ok",
        index=(max(op.index for op in operations) + 1) if operations else 0,
        line=0,
    )
    written = {op.value for op in operations if op.is_write and op.status != "fail"}
    if final_value is not None and final_value not in written:
        failed = any(op.is_write and op.value == final_value for op in operations)
        how = "only by a failed write" if failed else "by no write on this key"
        return Verdict(
            CHECKER,
            STATUS_VIOLATION,
            message=f"site {site}: final value of key {key!r} is {final_value!r}, written {how}",
            key=key,
            window=(final_read.to_dict(),),
            details={"site": site, "final_value": final_value, "reason": "never-written"},
        )
    verdict = linearizability.check_key(
        key, [*operations, final_read], step_budget=step_budget, shrink_window=shrink_window
    )
    if verdict.ok:
        return Verdict(CHECKER, STATUS_OK, message="final value allowed", key=key, details={"site": site})
    if verdict.unknown:
        return Verdict(
            CHECKER, STATUS_UNKNOWN, message=f"site {site}: {verdict.message}", key=key, details={"site": site}
        )
    base = linearizability.check_key(key, operations, step_budget=step_budget, shrink_window=False)
    if not base.ok:
        return Verdict(
            CHECKER,
            base.status,
            message=(
                f"cannot judge the final state of key {key!r}: the history itself is {base.status} ({base.message})"
            ),
            key=key,
            window=base.window,
            details={"site": site, "reason": "history-not-linearizable"},
        )
    lost = [op for op in _not_superseded(operations) if op.value != final_value]
    if lost:
        shown = ", ".join(
            f"{op.f} {op.value!r} by process {op.process!r} acknowledged at {op.return_time} (line {op.line})"
            for op in lost[:LOST_WRITES_SHOWN_MAX]
        )
        message = f"site {site}: acknowledged write lost on key {key!r}: final value is {final_value!r}, but {shown}"
    else:
        message = (
            f"site {site}: final value {final_value!r} of key {key!r} is not the state after any linearization "
            f"of its history"
        )
    return Verdict(
        CHECKER,
        STATUS_VIOLATION,
        message=message,
        key=key,
        window=verdict.window,
        details={
            "site": site,
            "final_value": final_value,
            "lost": [op.to_dict() for op in lost[:LOST_WRITES_SHOWN_MAX]],
            "reason": "lost-write" if lost else "unreachable-final-state",
        },
    )


def check(
    history: Any,
    final: Mapping[Any, Any],
    *,
    site: str = "final",
    step_budget: int = linearizability.STEP_BUDGET_DEFAULT,
    shrink_window: bool = True,
) -> Verdict:
    """Check one site's final state (key -> value, None or missing = absent) against a history. Pure.

    Every key of the history and of the final state is checked; the first bad key (in key
    order) is reported, ``details["bad_keys"]`` lists up to 20.
    """
    operations = as_operations(history)
    state = final_state(final)
    groups = linearizability.by_key(operations)
    keys = set(groups) | {key for key, value in state.items() if value is not None}
    keys = {key for key in keys if not (isinstance(key, str) and key not in groups and _int_key_in(key, groups))}
    bad: list[Verdict] = []
    for key in sorted(keys, key=repr):
        verdict = check_key(
            key,
            groups.get(key, []),
            _lookup(state, key),
            site=site,
            step_budget=step_budget,
            shrink_window=shrink_window and not bad,
        )
        if not verdict.ok:
            bad.append(verdict)
    details: dict[str, Any] = {"site": site, "keys": len(keys), "bad_keys": [v.key for v in bad][:20]}
    if not bad:
        return Verdict(CHECKER, STATUS_OK, message=f"site {site}: final state allowed for all {len(keys)} keys",
                       details=details)
    first = next((v for v in bad if v.violation), bad[0])
    return Verdict(
        CHECKER,
        first.status,
        message=first.message + (f" (and {len(bad) - 1} other key(s))" if len(bad) > 1 else ""),
        key=first.key,
        window=first.window,
        details={**first.details, **details},
    )


def _int_key_in(key: str, groups: Mapping[Any, Any]) -> bool:
    """A JSON string key "7" that stands for the history's integer key 7."""
    return key.lstrip("-").isdigit() and int(key) in groups


def check_sites(
    history: Any,
    finals: Mapping[str, Mapping[Any, Any]],
    *,
    step_budget: int = linearizability.STEP_BUDGET_DEFAULT,
) -> list[Verdict]:
    """``check`` for every site of ``finals`` (site name -> final state)."""
    operations = as_operations(history)
    return [check(operations, state, site=site, step_budget=step_budget) for site, state in finals.items()]
