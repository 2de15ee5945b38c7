"""Check a recorded history: ``python -m chaos.check HISTORY.jsonl [options]``.

Runs the linearizability and corruption checkers on the history; with final states
(``--final-a``/``--final-b``, or ``--final NAME=PATH``), also the lost-write checker for every
site and the convergence checker between the first two; with ``--site-events``, the
split-brain checker. Prints one JSON verdict on stdout.

Exit status: 0 every check passed; 1 a violation; 2 unknown (search budget exhausted) or bad
input (a malformed history names its line number).

A final state file is a JSON object mapping key to value (null or missing = absent).
Site events are JSON lines in the format of ``chaos.checkers.split_brain``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from chaos.checkers import convergence, corruption, linearizability, lost_writes, split_brain
from chaos.checkers.history import HistoryError, load_operations
from chaos.checkers.verdict import Verdict, combine

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_UNKNOWN = 2


class InputError(Exception):
    """A bad input file or argument: reported with exit status 2."""


def _load_state(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as stream:
            state = json.load(stream)
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: line {error.lineno}: not valid JSON: {error.msg}") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: a final state must be a JSON object mapping key to value")
    return state


def _load_site_events(path: str) -> list[split_brain.SiteEvent]:
    events = []
    try:
        with open(path, encoding="utf-8") as stream:
            for number, text in enumerate(stream, start=1):
                if not text.strip():
                    continue
                try:
                    events.append(split_brain.SiteEvent.from_dict(json.loads(text)))
                except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as error:
                    raise InputError(f"{path}: line {number}: {error}") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from None
    return events


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.check",
        description="Check a recorded operation history (JSONL) for linearizability, lost writes and convergence.",
    )
    parser.add_argument("history", help="JSONL history, one operation event a line")
    parser.add_argument("--final-a", metavar="A.json", help="final state of site a (JSON object key -> value)")
    parser.add_argument("--final-b", metavar="B.json", help="final state of site b")
    parser.add_argument("--final", metavar="NAME=PATH", action="append", default=[],
                        help="final state of another site (repeatable)")
    parser.add_argument("--site-events", metavar="EVENTS.jsonl", help="site state/grant/commit events (split brain)")
    parser.add_argument("--step-budget", type=int, default=linearizability.STEP_BUDGET_DEFAULT,
                        help="search steps allowed per key before the verdict is unknown (default %(default)s)")
    parser.add_argument("--no-shrink", action="store_true", help="do not shrink violation windows")
    parser.add_argument("--indent", type=int, default=None, help="indent the JSON output")
    return parser.parse_args(argv)


def run(arguments: argparse.Namespace) -> Verdict:
    """Load the inputs (all I/O is here) and run the pure checkers."""
    try:
        operations = load_operations(arguments.history)
    except OSError as error:
        raise InputError(f"{arguments.history}: cannot read: {error.strerror}") from None
    except HistoryError as error:
        raise InputError(f"{arguments.history}: {error}") from None
    finals: dict[str, dict[str, Any]] = {}
    if arguments.final_a:
        finals["a"] = _load_state(arguments.final_a)
    if arguments.final_b:
        finals["b"] = _load_state(arguments.final_b)
    for item in arguments.final:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise InputError(f"--final expects NAME=PATH, got {item!r}")
        if name in finals:
            raise InputError(f"final state of site {name!r} given twice")
        finals[name] = _load_state(path)
    if arguments.step_budget < 1:
        raise InputError("--step-budget must be positive")
    shrink = not arguments.no_shrink
    verdicts = [
        linearizability.check(operations, step_budget=arguments.step_budget, shrink_window=shrink),
        corruption.check(operations),
    ]
    for name, state in finals.items():
        verdicts.append(lost_writes.check(operations, state, site=name, step_budget=arguments.step_budget,
                                          shrink_window=shrink))
    if len(finals) >= 2:
        (name_a, state_a), (name_b, state_b) = list(finals.items())[:2]
        verdicts.append(convergence.check(state_a, state_b, names=(name_a, name_b)))
    if arguments.site_events:
        verdicts.append(split_brain.check(_load_site_events(arguments.site_events)))
    return combine("check", verdicts)


def main(argv: list[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    try:
        verdict = run(arguments)
    except InputError as error:
        print(json.dumps({"checker": "check", "ok": False, "status": "error", "message": str(error)}))
        print(f"error: {error}", file=sys.stderr)
        return EXIT_UNKNOWN
    print(verdict.to_json(indent=arguments.indent))
    if verdict.ok:
        return EXIT_OK
    return EXIT_VIOLATION if verdict.violation else EXIT_UNKNOWN


if __name__ == "__main__":
    sys.exit(main())
