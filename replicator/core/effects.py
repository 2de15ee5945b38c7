"""What one step of the core hands back: the actions, and the continuations parked on persists.

The core numbers its persists; the shell makes them durable in issue order and
reports the highest durable id (`Persisted`). A continuation is a named
function (never a lambda) parked on a persist id; it runs once that persist is
durable, in the order parked. Invariants: the durable id never passes the last
id issued, continuations stay in persist-id order, and at most
`continuations_max` wait at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from replicator.core import events as ev
from replicator.core.errors import InvariantViolation, ProtocolError, ProtocolErrorKind, invariant
from replicator.core.records import Record, RecordId, Versioned

Meta = tuple[tuple[str, int | bytes | str], ...]


class Effects:
    def __init__(self, continuations_max: int) -> None:
        self.out: list[ev.Action] = []
        self.next_persist_id = 1
        self.durable_persist_id = 0
        self.after_durable: deque[tuple[int, Callable[[], None]]] = deque()
        self.continuations_max = continuations_max

    def persist(
        self,
        *,
        log_put: tuple[Record, ...] = (),
        log_delete: tuple[RecordId, ...] = (),
        apply: tuple[Versioned, ...] = (),
        dirty_add: tuple[bytes, ...] = (),
        dirty_remove: tuple[bytes, ...] = (),
        dedup_put: tuple[tuple[bytes, int], ...] = (),
        meta: Meta = (),
        clear_data: bool = False,
        urgent: bool = True,
    ) -> int:
        persist_id = self.next_persist_id
        self.next_persist_id += 1
        self.out.append(
            ev.Persist(
                persist_id,
                log_put=log_put,
                log_delete=log_delete,
                apply=apply,
                dirty_add=dirty_add,
                dirty_remove=dirty_remove,
                dedup_put=dedup_put,
                meta=meta,
                clear_data=clear_data,
                urgent=urgent,
            )
        )
        return persist_id

    def last_issued(self) -> int:
        return self.next_persist_id - 1

    def after(self, persist_id: int, continuation: Callable[[], None]) -> None:
        """Run `continuation` once `persist_id` is durable (at once if it already is)."""
        if not (persist_id < self.next_persist_id):
            raise InvariantViolation(f"a continuation on persist {persist_id}, never issued")
        if persist_id <= self.durable_persist_id:
            continuation()
            return
        invariant(
            not self.after_durable or self.after_durable[-1][0] <= persist_id,
            "continuations must be parked in persist-id order",
        )
        if len(self.after_durable) >= self.continuations_max:
            raise InvariantViolation(f"more than continuations_max={self.continuations_max} continuations wait")
        self.after_durable.append((persist_id, continuation))

    def durable(self, persist_id: int) -> None:
        """The shell reports `persist_id` durable: run what waited for it."""
        if persist_id >= self.next_persist_id:
            raise ProtocolError(ProtocolErrorKind.PERSIST_NEVER_ISSUED, f"persist {persist_id}")
        if persist_id <= self.durable_persist_id:
            return
        self.durable_persist_id = persist_id
        invariant(self.durable_persist_id < self.next_persist_id, "the durable persist id passed the next one")
        while self.after_durable and self.after_durable[0][0] <= self.durable_persist_id:
            _, continuation = self.after_durable.popleft()
            continuation()

    def drain(self) -> list[ev.Action]:
        out, self.out = self.out, []
        return out
