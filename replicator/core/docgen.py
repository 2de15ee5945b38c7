"""Render docs/protocol.md from the transition table and the phases' module docstrings.

`make docs` runs `python -m replicator.core.docgen > docs/protocol.md`; a test
(tests/test_core_table.py) fails when the committed file differs from `render()`.
Pure: it builds a string, the Makefile writes it.
"""

from __future__ import annotations

import inspect
from types import ModuleType

from replicator.core import (
    dedup,
    effects,
    errors,
    log,
    plants,
    reads,
    reconcile,
    replication,
    resync_source,
    resync_target,
    session,
    site,
    standing,
    table,
    takeover,
    timers,
    witness_client,
)
from replicator.core.messages import Role

PHASES: tuple[tuple[str, ModuleType], ...] = (
    ("Session and Hello", session),
    ("Write path", replication),
    ("Reconcile", reconcile),
    ("Asking the witness", witness_client),
    ("Takeover", takeover),
    ("Resync source (and mark-synced)", resync_source),
    ("Resync target", resync_target),
    ("Read gate", reads),
    ("Timers", timers),
)
LEAVES: tuple[tuple[str, ModuleType], ...] = (
    ("Replication log", log),
    ("Dedup table", dedup),
    ("Effects", effects),
)


def _name(kind: type) -> str:
    return kind.__name__


def _handler(row: table.Row) -> str:
    module = row.handler.__module__.rsplit(".", 1)[-1]
    return f"`{module}.{row.handler.__name__}`"


def _roles(roles: frozenset[Role]) -> str:
    return ", ".join(role.name for role in Role if role in roles) or "-"


def _diagram() -> list[str]:
    edges: dict[tuple[Role, Role], list[str]] = {}
    for (role, kind), row in table.TRANSITIONS.items():
        for nxt in row.handler_moves:
            edges.setdefault((role, nxt), []).append(_name(kind))
    for role, moves in table.TIMER_MOVES.items():
        for nxt in moves:
            edges.setdefault((role, nxt), []).append("timers")
    lines = ["```mermaid", "stateDiagram-v2", "    [*] --> STARTING"]
    for (role, nxt), kinds in sorted(edges.items(), key=lambda item: (list(Role).index(item[0][0]), list(Role).index(item[0][1]))):
        lines.append(f"    {role.name} --> {nxt.name}: {', '.join(sorted(kinds))}")
    lines += ["    STOPPED --> [*]", "```"]
    return lines


def _matrix() -> list[str]:
    lines: list[str] = []
    for role in Role:
        rows = [(kind, row) for (r, kind), row in table.TRANSITIONS.items() if r is role]
        lines += ["", f"### {role.name}", ""]
        if not rows:
            lines.append("Takes no event: every step raises `ProtocolError(STOPPED)`.")
            continue
        timers = table.TIMER_MOVES.get(role, frozenset())
        lines += [f"The timers, after any event here, may move it to: {_roles(timers)} (and on from there).", ""]
        lines += ["| event | handler | the handler may move it to | the row's next roles (with the timers) |"]
        lines += ["|---|---|---|---|"]
        for kind, row in sorted(rows, key=lambda item: _name(item[0])):
            lines.append(f"| `{_name(kind)}` | {_handler(row)} | {_roles(row.handler_moves)} | {_roles(row.next_roles)} |")
    return lines


def _docstring(module: ModuleType) -> list[str]:
    return (inspect.getdoc(module) or "").splitlines()


def _enum_table(title: str, members: list[tuple[str, str]]) -> list[str]:
    lines = ["", f"**{title}**", "", "| name | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {meaning} |" for name, meaning in members]
    return lines


def _substates() -> list[str]:
    lines = [
        "",
        "## Sub-states beside the role",
        "",
        "The role is what the peer sees in a Hello; these say what a site is doing within it.",
        "Each is an object or an enum in the core, never a loose flag.",
    ]
    lines += _enum_table("Standing (durable: meta `grant`, `target`)", [(s.name, s.value) for s in standing.Standing])
    lines += _enum_table("Takeover stages (`SiteCore.takeover`)", [(s.name, s.value) for s in takeover.TakeoverStage])
    lines += _enum_table(
        "Phase objects",
        [
            ("Reconcile", "`session.reconcile`: a same-epoch reconcile in this session (reconcile.py)"),
            ("ResyncSource", "`session.resync_source`: a resync this site sends in this session (resync_source.py)"),
            ("MarkSynced", "`SiteCore.mark_synced`: resync done, asking the witness for SYNC(e+1); outlives the session"),
            ("Takeover", "`SiteCore.takeover`: granted, waiting out leases, then committing the log (takeover.py)"),
        ],
    )
    lines += _enum_table("Who may decide a commit (`SiteCore.decide_commit`)", [(k.name, _roles(k.value)) for k in standing.CommitKind])
    return lines


def _errors() -> list[str]:
    lines = ["", "## Errors", ""] + _docstring(errors)
    lines += _enum_table("ProtocolErrorKind (local: a bug in the caller)", [(k.name, k.value) for k in errors.ProtocolErrorKind])
    lines += _enum_table("RemoteErrorKind (the peer's: counted, session dropped)", [(k.name, k.value) for k in errors.RemoteErrorKind])
    return lines


def _plants() -> list[str]:
    lines = ["", "## Plants", ""] + _docstring(plants)
    lines += ["", "| plant | what it does | the rule it breaks |", "|---|---|---|"]
    for plant in plants.Plant:
        only = " (simulator only)" if plant.simulator_only else ""
        lines.append(f"| `{plant.name_in_config}`{only} | {plant.description} | {plant.rule} |")
    return lines


def render() -> str:
    lines = [
        "<!-- Generated by `make docs` (python -m replicator.core.docgen) from replicator/core: do not edit. -->",
        "",
        "# The pair protocol",
        "",
        *_docstring(site),
        "",
        "## State diagram",
        "",
        "Every arrow is a move some row of `replicator/core/table.py` allows, labelled with the events",
        "whose handlers make it; `timers` marks the moves of the timers, which run after every event",
        "(so every row of a role also lists them). A step that stays in its role is not drawn.",
        "",
        *_diagram(),
        "",
        "## The transition table",
        "",
        *_docstring(table),
        *_matrix(),
        *_substates(),
    ]
    for title, module in PHASES:
        lines += ["", f"## {title}", "", f"From `replicator/core/{module.__name__.rsplit('.', 1)[-1]}.py`.", "", *_docstring(module)]
    lines += ["", "## Leaves"]
    for title, module in LEAVES:
        lines += ["", f"### {title}", "", f"From `replicator/core/{module.__name__.rsplit('.', 1)[-1]}.py`.", "", *_docstring(module)]
    lines += _errors()
    lines += _plants()
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
