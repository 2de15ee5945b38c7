"""Correctness checkers shared by the deterministic simulator and the chaos suite.

Every checker is a pure function (no I/O) returning a ``Verdict`` (ok / violation / unknown):

- ``linearizability.check(history)``: per-key register histories are linearizable;
- ``lost_writes.check(history, final_states)``: no acknowledged write is lost;
- ``convergence.check(state_a, state_b)``: two sites hold the same data;
- ``split_brain.check(events)``: at most one site alone per epoch, commits only when allowed;
- ``corruption.check(history)``: every value read was written.

``history`` holds the event format, ``load_jsonl`` and the ``History`` builder.
"""

from chaos.checkers import convergence, corruption, linearizability, lost_writes, split_brain
from chaos.checkers.history import History, HistoryError, Operation, OpHandle, load_jsonl, parse_events
from chaos.checkers.verdict import Verdict, combine

__all__ = [
    "History",
    "HistoryError",
    "OpHandle",
    "Operation",
    "Verdict",
    "combine",
    "convergence",
    "corruption",
    "linearizability",
    "load_jsonl",
    "lost_writes",
    "parse_events",
    "split_brain",
]
