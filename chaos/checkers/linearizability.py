"""Linearizability of per-key read/write/delete register histories.

Theory of operation
-------------------
Linearizability is compositional (Herlihy & Wing), so the history is split by key and
each key's register history is checked on its own. For one key the checker is a
Wing & Gong depth-first search with Lowe's just-in-time linearization and memoisation,
as in Knossos and Porcupine:

- Operations are sorted by invoke time. A search node is (h, P, state): operations
  ``0 .. h-1`` have been *entered*, ``P`` is the (small) set of entered operations not yet
  linearized, and every operation from ``h`` on is not linearized. This is a canonical
  encoding of the set of linearized operations, so memoising visited nodes is exact, and
  it stays small however long an operation remains pending.
- An operation may be linearized next iff its invoke is not after the earliest return
  among the operations not yet linearized (``p`` precedes ``o`` in real time iff
  ``return(p) < invoke(o)``; equal times count as concurrent).
- A read whose value equals the current state and that may go next is always linearized
  at once, without branching: doing so never removes an option (it does not change the
  state and only relaxes the real-time constraints of the others).
- A delete is a write of "absent" (None).

Unknown outcomes (``info``) are the usual source of blow-up: such an operation has an
infinite return time, so it stays concurrent with the rest of the history. They are
tamed exactly (no loss of soundness or completeness):

- ``fail`` operations are dropped: they definitely did not take effect.
- ``info`` reads are dropped: they constrain nothing.
- An ``info`` write (or delete) may take effect or not. If it takes effect but no read
  returns its value from it, it can be removed from the linearization without changing
  any other result. So it is *optional*, and only matters if some read reads from it; that
  read returns its value and returns at the latest at R = the latest return among ok reads
  of that value. The write is therefore given return time R (if R is before its invoke, or
  no read returns its value, it is dropped outright), and the search may *skip* it instead
  of linearizing it, only when it holds the earliest pending return (a canonical place:
  skipping commutes with everything).

The search is bounded by ``step_budget`` node expansions per key; when the budget runs out
the verdict is ``"unknown"``, never ``"ok"``. On a violation the checker reports the key
and a small window of operations that cannot be linearized by themselves: it starts from
the operations up to the point where the search got furthest, then shrinks that set greedily
(re-checking each candidate), always keeping every write of a value that a kept read returns,
so the window remains self-explanatory.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from chaos.checkers.history import INFINITY, Operation, as_operations
from chaos.checkers.verdict import STATUS_OK, STATUS_UNKNOWN, STATUS_VIOLATION, Verdict

CHECKER = "linearizability"

# Node expansions allowed per key. Successful searches on histories with bounded concurrency
# expand about one node per operation, so this leaves two to three orders of magnitude of
# headroom for keys with thousands of operations; a violation explores more (every node
# reachable before the stuck point) but still far less than this in practice.
STEP_BUDGET_DEFAULT = 2_000_000
# Budget for each re-check while shrinking a violation window, and the size under which the
# greedy one-operation-at-a-time shrinking is attempted.
SHRINK_STEP_BUDGET = 20_000
# The first, short search of a key (see check_key).
FIRST_STEP_BUDGET = 100_000
SHRINK_GREEDY_OPERATIONS_MAX = 80
WINDOW_OPERATIONS_MAX = 200

_READ = 0
_WRITE = 1
# The state of a register cut out of a longer history before its first write: any of a set.
_ANY = object()
# Budget for proving a violation on a window cut around the point where the search got stuck.
WINDOW_STEP_BUDGET = 200_000
WINDOW_SPANS = (8, 32, 128, 512, 2048)


@dataclass(frozen=True)
class KeyResult:
    """The outcome of searching one key's history."""

    status: str
    steps: int
    # The operations (indices into the key's prepared list) around the point where the search got
    # furthest; meaningful only for a violation.
    stuck: tuple[int, ...] = ()
    linearized_max: int = 0


@dataclass(frozen=True)
class _Prepared:
    """One key's operations, ready for the search (parallel arrays, sorted by invoke time)."""

    operations: tuple[Operation, ...]
    invoke: tuple[float, ...]
    ret: tuple[float, ...]
    kind: tuple[int, ...]
    value: tuple[Any, ...]
    optional: tuple[bool, ...]


def prepare(operations: Iterable[Operation]) -> list[Operation]:
    """Drop what cannot matter and give optional (info) writes their effective return time.

    Returns operations with ``status`` "ok" (mandatory) or "info" (optional write or delete with
    a finite or infinite effective ``return_time``), sorted by invoke time.
    """
    operations = list(operations)
    latest_read_return: dict[Any, float] = {}
    for op in operations:
        if op.f == "read" and op.status == "ok":
            previous = latest_read_return.get(op.value, -INFINITY)
            latest_read_return[op.value] = max(previous, op.return_time)
    kept: list[Operation] = []
    for op in operations:
        if op.status == "fail":
            continue
        if op.status == "info":
            if op.f == "read":
                continue
            effective = latest_read_return.get(op.value)
            if effective is None or effective < op.invoke_time:
                continue
            op = replace(op, return_time=effective)
        kept.append(op)
    kept.sort(key=lambda op: (op.invoke_time, op.index))
    return kept


def _arrays(operations: Sequence[Operation]) -> _Prepared:
    return _Prepared(
        operations=tuple(operations),
        invoke=tuple(op.invoke_time for op in operations),
        ret=tuple(op.return_time for op in operations),
        kind=tuple(_READ if op.f == "read" else _WRITE for op in operations),
        value=tuple(op.value for op in operations),
        optional=tuple(op.status == "info" for op in operations),
    )


def search(
    operations: Sequence[Operation],
    step_budget: int = STEP_BUDGET_DEFAULT,
    initial_states: frozenset[Any] | None = None,
) -> KeyResult:
    """Decide whether one key's *prepared* operations (see ``prepare``) are linearizable.

    The register starts absent (None), or, if ``initial_states`` is given, in any one of those
    states (used to check a window cut out of a longer history). Pure function; returns a
    KeyResult whose status is ok, violation or unknown.
    """
    p = _arrays(operations)
    n = len(p.invoke)
    invoke, ret, kind, value, optional = p.invoke, p.ret, p.kind, p.value, p.optional
    # suffix_min_return[i]: earliest return among operations i..n-1.
    suffix_min_return = [INFINITY] * (n + 1)
    # mandatory_after[i]: number of mandatory operations among i..n-1.
    mandatory_after = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix_min_return[i] = min(ret[i], suffix_min_return[i + 1])
        mandatory_after[i] = mandatory_after[i + 1] + (0 if optional[i] else 1)
    # For each value, the index of its last write and of its last read: whether a value can still
    # be produced, or is still wanted, is then a comparison with h plus a look at the pending set.
    last_write: dict[Any, int] = {}
    last_read: dict[Any, int] = {}
    read_indices: dict[Any, list[int]] = defaultdict(list)
    for i in range(n):
        (last_read if kind[i] == _READ else last_write)[value[i]] = i
        if kind[i] == _READ:
            read_indices[value[i]].append(i)

    def memo_key(h: int, pending: tuple[int, ...], state: Any) -> tuple[Any, ...]:
        """The node's identity for memoisation, with interchangeable optional writes collapsed.

        Pending optional writes with the same value and return time are interchangeable (all are
        candidates), and more of them than there are remaining reads of their value is useless
        (each use that matters is read by a distinct read): so only the capped count matters.
        """
        if not any(optional[j] for j in pending):
            return (h, pending, (), state)
        groups: dict[tuple[Any, float], int] = defaultdict(int)
        for j in pending:
            if optional[j]:
                groups[(value[j], ret[j])] += 1
        collapsed = []
        for (v, r), count in groups.items():
            indices = read_indices.get(v, ())
            remaining = len(indices) - bisect_left(indices, h) + sum(
                1 for j in pending if kind[j] == _READ and value[j] == v
            )
            collapsed.append((repr(v), r, min(count, remaining)))
        collapsed.sort()
        return (h, tuple(j for j in pending if not optional[j]), tuple(collapsed), state)

    def take(h: int, pending: tuple[int, ...], i: int) -> tuple[int, tuple[int, ...]]:
        """Linearize (or skip) operation i: the new (h, pending)."""
        if i < h:
            return h, tuple(j for j in pending if j != i)
        return i + 1, pending + tuple(range(h, i))

    def close(h: int, pending: tuple[int, ...], state: Any) -> tuple[int, tuple[int, ...], float, list[int]]:
        """Apply forced moves until none is left, and return the node with its candidates.

        Forced: a candidate read that matches the state (linearize it), and a candidate optional
        write whose value no remaining read wants (skip it: it can never be observed).
        """
        while True:
            earliest = suffix_min_return[h]
            for j in pending:
                if ret[j] < earliest:
                    earliest = ret[j]
            found = list(pending)
            i = h
            while i < n and invoke[i] <= earliest:
                found.append(i)
                i += 1
            forced = -1
            for i in found:
                if kind[i] == _READ:
                    if value[i] == state and state is not _ANY:
                        forced = i
                        break
                elif optional[i]:
                    v = value[i]
                    if last_read.get(v, -1) < h and not any(kind[j] == _READ and value[j] == v for j in found):
                        forced = i
                        break
            if forced < 0:
                return h, pending, earliest, found
            h, pending = take(h, pending, forced)

    visited: set[tuple[Any, ...]] = set()
    best_depth = -1
    best_found: list[int] = []

    def expand(h: int, pending: tuple[int, ...], state: Any) -> list[tuple[int, tuple[int, ...], Any]] | None:
        """Children of a node (empty if dead or seen), or None if the node is a goal."""
        nonlocal best_depth, best_found
        h, pending, earliest, found = close(h, pending, state)
        if mandatory_after[h] == 0 and all(optional[j] for j in pending):
            return None
        depth = h - len(pending)
        if depth > best_depth:
            best_depth = depth
            best_found = found
        key = memo_key(h, pending, state)
        if key in visited:
            return []
        visited.add(key)
        if state is not _ANY:
            # Dead ends: a pending read wants a value that is not the state and that no remaining
            # write can produce any more; or the operation with the earliest return is a read
            # whose value no candidate write produces (it must be linearized before anything
            # invoked later, and the state is wrong).
            producible = {value[i] for i in found if kind[i] == _WRITE}
            for i in found:
                if kind[i] != _READ:
                    continue
                v = value[i]
                if v not in producible and last_write.get(v, -1) < h:
                    return []
                if ret[i] == earliest and not optional[i] and v not in producible:
                    return []
        # Writes whose value a pending read wants go first: a cheap heuristic that makes the
        # common, linearizable case run straight down without backtracking.
        wanted = {value[i] for i in found if kind[i] == _READ}
        first: list[tuple[int, tuple[int, ...], Any]] = []
        later: list[tuple[int, tuple[int, ...], Any]] = []
        skips: list[tuple[int, tuple[int, ...], Any]] = []
        # Of several optional writes of one value, only the one that must be decided first is
        # worth linearizing: the others stay available at least as long (skipping is free), and
        # of identical ones (same value and return) only the lowest index is used or skipped, so
        # the pending set stays canonical instead of growing into every subset.
        linearized_values: set[Any] = set()
        skipped_groups: set[tuple[Any, float]] = set()
        fixed: set[Any] = set()
        for i in sorted(found, key=lambda j: (ret[j], j)):
            if kind[i] == _READ:
                # Only reachable from the "any initial state" root: a read fixes the state.
                if state is _ANY and value[i] in initial_states and value[i] not in fixed:  # type: ignore[operator]
                    fixed.add(value[i])
                    first.append((*take(h, pending, i), value[i]))
                continue
            child_h, child_pending = take(h, pending, i)
            if optional[i]:
                group = (value[i], ret[i])
                if ret[i] == earliest and group not in skipped_groups:
                    skipped_groups.add(group)
                    skips.append((child_h, child_pending, state))
                if value[i] in linearized_values:
                    continue
                linearized_values.add(value[i])
            child = (child_h, child_pending, value[i])
            (first if value[i] in wanted and value[i] != state else later).append(child)
        return first + later + skips

    # Iterative DFS: histories have thousands of operations per key, deeper than Python's stack.
    steps = 1
    root = expand(0, (), None if initial_states is None else _ANY)
    if root is None:
        return KeyResult(STATUS_OK, steps=steps, linearized_max=n)
    stack: list[list[tuple[int, tuple[int, ...], Any]]] = [root[::-1]]
    while stack:
        frontier = stack[-1]
        if not frontier:
            stack.pop()
            continue
        h, pending, state = frontier.pop()
        steps += 1
        if steps > step_budget:
            return KeyResult(
                STATUS_UNKNOWN, steps=steps, stuck=tuple(sorted(set(best_found))), linearized_max=best_depth
            )
        children = expand(h, pending, state)
        if children is None:
            return KeyResult(STATUS_OK, steps=steps, linearized_max=n)
        if children:
            stack.append(children[::-1])
    return KeyResult(STATUS_VIOLATION, steps=steps, stuck=tuple(sorted(set(best_found))), linearized_max=best_depth)


def _never_written(operations: Sequence[Operation]) -> Operation | None:
    """The first ok read of a value that no ok or info write on this key could have produced."""
    written = {op.value for op in operations if op.is_write and op.status != "fail"}
    written.add(None)
    for op in operations:
        if op.f == "read" and op.status == "ok" and op.value not in written:
            return op
    return None


def _closure(selected: Iterable[Operation], universe: Sequence[Operation]) -> list[Operation]:
    """Add every write in ``universe`` of a value that a selected read returns (deletes for None).

    Removing a read, or a write whose value no remaining read returns, only relaxes a history:
    so a closed subset that is not linearizable proves the whole is not, and it explains itself.
    """
    chosen = {op.index: op for op in selected}
    wanted = {op.value for op in chosen.values() if op.f == "read"}
    for op in universe:
        if op.is_write and op.value in wanted:
            chosen.setdefault(op.index, op)
    return sorted(chosen.values(), key=lambda op: (op.invoke_time, op.index))


def _fails(
    operations: Sequence[Operation],
    initial_states: frozenset[Any] | None,
    step_budget: int = SHRINK_STEP_BUDGET,
) -> bool:
    return search(prepare(operations), step_budget, initial_states).status == STATUS_VIOLATION


def relaxed_window(
    operations: Sequence[Operation], start_time: float, end_time: float
) -> tuple[list[Operation], frozenset[Any] | None]:
    """Cut the operations between two instants out of a key's history, relaxed so that if the
    window is not linearizable (from any of the returned initial states), neither is the history.

    Kept: operations invoked at or before ``end_time`` and not returned before ``start_time``.
    Relaxations: reads invoked before ``start_time`` or returning after ``end_time`` are dropped;
    writes invoked before ``start_time`` become optional (they may have taken effect before the
    cut); the initial state is absent or any value written before ``start_time``. A linearization
    of the history, cut at its last operation completed before ``start_time``, yields one of the
    window; so the window's failure is a proof. With ``start_time = -inf`` it is exact.
    """
    if start_time == -INFINITY:
        initial: frozenset[Any] | None = None
    else:
        earlier = {op.value for op in operations if op.is_write and op.status != "fail" and op.invoke_time < start_time}
        initial = frozenset(earlier | {None})
    window: list[Operation] = []
    for op in operations:
        if op.status == "fail" or op.invoke_time > end_time or op.return_time < start_time:
            continue
        if op.f == "read":
            if op.invoke_time < start_time or op.return_time > end_time:
                continue
        elif op.invoke_time < start_time and op.status == "ok":
            op = replace(op, status="info", return_time=INFINITY)
        window.append(op)
    return window, initial


def localize(
    operations: Sequence[Operation], end_time: float, step_budget: int = WINDOW_STEP_BUDGET
) -> tuple[list[Operation], frozenset[Any] | None, float] | None:
    """The smallest of a few windows ending at ``end_time`` that provably cannot be linearized.

    Returns (window, initial states, start time), or None if none of them fails within budget.
    """
    ending = sum(1 for op in operations if op.invoke_time <= end_time)
    for span in (*WINDOW_SPANS, None):
        start = 0 if span is None else max(0, ending - span)
        start_time = operations[start].invoke_time if start > 0 else -INFINITY
        window, initial = relaxed_window(operations, start_time, end_time)
        if _fails(window, initial, step_budget):
            return window, initial, start_time
        if start == 0:
            break
    return None


def shrink(window: Sequence[Operation], initial_states: frozenset[Any] | None) -> list[Operation]:
    """Shrink a window that is not linearizable to a small closed subset that still is not.

    Drops the oldest operations in halving chunks, then (for small windows) one operation at a
    time; every candidate is closed (see ``_closure``) and re-checked, so the result is always a
    genuine counterexample.
    """
    universe = list(window)
    current = _closure(universe, universe)
    chunk = max(1, len(current) // 2)
    while len(current) > 1:
        candidate = _closure(current[chunk:], universe)
        if len(candidate) < len(current) and _fails(candidate, initial_states):
            current = candidate
            chunk = max(1, min(chunk, len(current) // 2))
        elif chunk == 1:
            break
        else:
            chunk //= 2
    if len(current) <= SHRINK_GREEDY_OPERATIONS_MAX:
        position = 0
        while position < len(current):
            removed = current[position]
            candidate = _closure([op for op in current if op.index != removed.index], universe)
            if removed.index not in {op.index for op in candidate} and _fails(candidate, initial_states):
                current = candidate
            else:
                position += 1
    return current


def _describe(window: Sequence[Operation]) -> str:
    parts = []
    for op in window:
        end = "∞" if op.return_time == INFINITY else str(op.return_time)
        parts.append(f"p{op.process} {op.f} {op.value!r} {op.status} [{op.invoke_time}, {end}]")
    return "; ".join(parts)


def _stuck_time(result: KeyResult, prepared: Sequence[Operation], originals: dict[int, Operation]) -> float:
    """The latest (finite) return among the operations the search could not get past."""
    stuck = [originals[prepared[i].index] for i in result.stuck]
    finite = [op.return_time for op in stuck if op.return_time != INFINITY]
    return max(finite) if finite else max((op.invoke_time for op in stuck), default=INFINITY)


def check_key(
    key: Any,
    operations: Sequence[Operation],
    *,
    step_budget: int = STEP_BUDGET_DEFAULT,
    shrink_window: bool = True,
) -> Verdict:
    """Check one key's operations (all on ``key``). Pure; returns a Verdict."""
    operations = sorted(operations, key=lambda op: (op.invoke_time, op.index))
    corrupt = _never_written(operations)
    if corrupt is not None:
        failed = [op for op in operations if op.is_write and op.value == corrupt.value]
        how = "only by a failed write" if failed else "by no write on this key"
        window = [corrupt, *failed]
        return Verdict(
            CHECKER,
            STATUS_VIOLATION,
            message=(
                f"read of a value never written: process {corrupt.process!r} read {corrupt.value!r} "
                f"(line {corrupt.line}), a value written {how}"
            ),
            key=key,
            window=tuple(op.to_dict() for op in window),
            details={"operations": len(operations), "steps": 0, "reason": "never-written"},
        )
    prepared = prepare(operations)
    operations_by_index = {op.index: op for op in operations}
    # First a short search: a linearizable history almost always completes within it. If it does
    # not, try to prove a violation on small windows around where it got stuck (cheap), and only
    # then spend the full budget.
    result = search(prepared, min(step_budget, FIRST_STEP_BUDGET))
    found = None
    steps = result.steps
    if result.status != STATUS_OK:
        found = localize(operations, _stuck_time(result, prepared, operations_by_index))
        if found is None and result.status == STATUS_UNKNOWN and step_budget > FIRST_STEP_BUDGET:
            result = search(prepared, step_budget)
            steps += result.steps
            if result.status != STATUS_OK:
                found = localize(operations, _stuck_time(result, prepared, operations_by_index))
    details = {"operations": len(operations), "searched": len(prepared), "steps": steps}
    if result.status == STATUS_OK:
        return Verdict(CHECKER, STATUS_OK, message="linearizable", key=key, details=details)
    end_time = _stuck_time(result, prepared, operations_by_index)
    if found is None and result.status == STATUS_UNKNOWN:
        return Verdict(
            CHECKER,
            STATUS_UNKNOWN,
            message=(
                f"search budget of {step_budget} steps exhausted after linearizing at most "
                f"{result.linearized_max} of {len(prepared)} operations"
            ),
            key=key,
            details=details,
        )
    if found is None:
        # The full search proved the violation but no window around the stuck point fails on
        # its own: report the whole prefix (the history's start is part of the explanation).
        window = [op for op in operations if op.invoke_time <= end_time and op.status != "fail"]
        start_time = -INFINITY
    else:
        window, initial, start_time = found
        if shrink_window:
            window = shrink(window, initial)
    # Report the operations as recorded (the window may have relaxed some of them).
    window = [operations_by_index[op.index] for op in window]
    if len(window) > WINDOW_OPERATIONS_MAX:
        window = window[-WINDOW_OPERATIONS_MAX:]
    # Writes of the values the window reads, from before the window: context for the reader.
    in_window = {op.index for op in window}
    read_values = {op.value for op in window if op.f == "read"}
    context = [op for op in operations if op.is_write and op.value in read_values and op.index not in in_window]
    since = "" if start_time == -INFINITY else f", starting from any state the key could have at time {start_time}"
    message = (
        f"not linearizable: no order of these {len(window)} operations on key {key!r} is consistent with "
        f"real time and a register{since}: {_describe(window[:12])}{' ...' if len(window) > 12 else ''}"
    )
    return Verdict(
        CHECKER,
        STATUS_VIOLATION,
        message=message,
        key=key,
        window=tuple(op.to_dict() for op in window),
        details={
            **details,
            "linearized_max": result.linearized_max,
            "reason": "no-linearization",
            "window_start_time": None if start_time == -INFINITY else start_time,
            "context": [op.to_dict() for op in context[-5:]],
        },
    )


def by_key(operations: Iterable[Operation]) -> dict[Any, list[Operation]]:
    groups: dict[Any, list[Operation]] = defaultdict(list)
    for op in operations:
        groups[op.key].append(op)
    return dict(groups)


def check(
    history: Any,
    *,
    step_budget: int = STEP_BUDGET_DEFAULT,
    shrink_window: bool = True,
) -> Verdict:
    """Check a whole history (events, a History, or Operations), key by key.

    ``step_budget`` bounds the search per key. The first violating key (in key order) is
    reported; ``details["violating_keys"]`` and ``details["unknown_keys"]`` list the others
    (at most 20 each).
    """
    operations = as_operations(history)
    groups = by_key(operations)
    violations: list[Verdict] = []
    unknowns: list[Verdict] = []
    steps = 0
    for key in sorted(groups, key=repr):
        verdict = check_key(key, groups[key], step_budget=step_budget, shrink_window=shrink_window and not violations)
        steps += verdict.details.get("steps", 0)
        if verdict.violation:
            violations.append(verdict)
        elif verdict.unknown:
            unknowns.append(verdict)
    details: dict[str, Any] = {
        "keys": len(groups),
        "operations": len(operations),
        "steps": steps,
        "violating_keys": [v.key for v in violations][:20],
        "unknown_keys": [v.key for v in unknowns][:20],
    }
    first = violations[0] if violations else unknowns[0] if unknowns else None
    if first is None:
        return Verdict(
            CHECKER, STATUS_OK, message=f"{len(operations)} operations on {len(groups)} keys are linearizable",
            details=details,
        )
    extra = len(violations) + len(unknowns) - 1
    suffix = f" (and {extra} other key(s) not ok)" if extra else ""
    return Verdict(
        CHECKER,
        first.status,
        message=first.message + suffix,
        key=first.key,
        window=first.window,
        details={**details, **{k: v for k, v in first.details.items() if k not in details}},
    )


__all__ = [
    "CHECKER",
    "STEP_BUDGET_DEFAULT",
    "KeyResult",
    "by_key",
    "check",
    "check_key",
    "prepare",
    "search",
    "shrink",
]
