"""No split brain: at most one site goes on alone per epoch, and nobody commits without the right.

Event format (a dict, a JSON line, or a ``SiteEvent``), all fields but ``state``/``granted``
required::

    {"site": "a", "time": 1200, "event": "state",  "epoch": 4, "state": "SOLO", "granted": true}
    {"site": "a", "time": 1250, "event": "commit", "epoch": 4}
    {"site": "b", "time": 1100, "event": "grant",  "epoch": 4}

- ``event: "state"``: the site entered ``state`` (SYNC, SUSPENDED, SOLO, FENCED,
  RESYNC_SOURCE, RESYNC_TARGET, STARTING, ...) in ``epoch``. For SOLO (and RESYNC_SOURCE),
  ``granted`` says the site holds the witness's grant for that epoch.
- ``event: "grant"``: the witness granted ``site`` the right to go on alone in ``epoch``
  (recorded by the witness, or by the site when it receives GRANTED). It also counts as the
  site holding the grant.
- ``event: "commit"``: the site *decided* that a record is committed (as origin after the
  peer's acknowledgement, or alone after a grant), in ``epoch``. A peer applying a record
  the origin committed is not a commit.
- ``time``: integer nanoseconds on the run's shared monotonic clock. Events are judged in
  time order (ties in the order given).

Rules:

1. At most one site is SOLO in any epoch, and the witness grants any epoch to at most one site.
2. A site is SOLO (or RESYNC_SOURCE) in epoch e only while holding the grant for e.
3. A commit in epoch e is allowed only while the site's current state is SYNC(e), or
   SOLO(e)/RESYNC_SOURCE(e) with the grant for e. A commit before any state event is a violation.
4. (``strict_epoch_modes``, on by default) An epoch is either a SYNC epoch or a SOLO epoch:
   no site is SYNC in an epoch in which some site was SOLO (the witness moves SYNC(e) to
   SOLO(e+1) and back to SYNC(e'+1), never within an epoch).

``SplitBrainChecker`` takes events one at a time (a simulator can feed it live, in time
order); ``check(events)`` sorts a complete list and runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from chaos.checkers.verdict import STATUS_OK, STATUS_VIOLATION, Verdict

CHECKER = "split_brain"
EVENT_KINDS = ("state", "grant", "commit")
SOLO_STATES = frozenset({"SOLO", "RESYNC_SOURCE"})
VIOLATIONS_KEPT_MAX = 20


@dataclass(frozen=True)
class SiteEvent:
    site: str
    time: int
    event: str
    epoch: int
    state: str | None = None
    granted: bool = False

    def __post_init__(self) -> None:
        if self.event not in EVENT_KINDS:
            raise ValueError(f"event must be one of {', '.join(EVENT_KINDS)}, got {self.event!r}")
        if not isinstance(self.epoch, int) or isinstance(self.epoch, bool):
            raise ValueError(f"epoch must be an integer, got {self.epoch!r}")
        if not isinstance(self.time, int) or isinstance(self.time, bool):
            raise ValueError(f"time must be an integer (nanoseconds), got {self.time!r}")
        if self.event == "state" and not isinstance(self.state, str):
            raise ValueError("a state event needs a 'state' string")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteEvent:
        missing = [name for name in ("site", "time", "event", "epoch") if name not in data]
        if missing:
            raise ValueError(f"site event missing field(s) {', '.join(missing)}: {dict(data)!r}")
        return cls(
            site=data["site"],
            time=data["time"],
            event=data["event"],
            epoch=data["epoch"],
            state=data.get("state"),
            granted=bool(data.get("granted", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def as_event(event: SiteEvent | Mapping[str, Any]) -> SiteEvent:
    return event if isinstance(event, SiteEvent) else SiteEvent.from_dict(event)


class SplitBrainChecker:
    """Incremental checker: ``observe`` each event in time order, then ``verdict()``."""

    def __init__(self, *, strict_epoch_modes: bool = True) -> None:
        self.strict_epoch_modes = strict_epoch_modes
        self._state: dict[str, SiteEvent] = {}
        self._grants: dict[int, str] = {}
        self._held: set[tuple[str, int]] = set()
        self._solo_sites: dict[int, str] = {}
        self._sync_epochs: dict[int, str] = {}
        self._last_time: int | None = None
        self.events = 0
        self.commits = 0
        self.violation_count = 0
        self.violations: list[tuple[str, tuple[SiteEvent, ...]]] = []

    def _violate(self, message: str, *events: SiteEvent) -> str:
        self.violation_count += 1
        if len(self.violations) < VIOLATIONS_KEPT_MAX:
            self.violations.append((message, events))
        return message

    def observe(self, event: SiteEvent | Mapping[str, Any]) -> list[str]:
        """Judge one event; returns the violations it caused (usually none)."""
        event = as_event(event)
        if self._last_time is not None and event.time < self._last_time:
            raise ValueError(f"events must be observed in time order: {event.time} after {self._last_time}")
        self._last_time = event.time
        self.events += 1
        found: list[str] = []
        site, epoch = event.site, event.epoch
        if event.event == "grant":
            holder = self._grants.setdefault(epoch, site)
            if holder != site:
                found.append(self._violate(f"epoch {epoch} granted to both {holder!r} and {site!r}", event))
            self._held.add((site, epoch))
        elif event.event == "state":
            assert event.state is not None
            if event.granted:
                self._held.add((site, epoch))
            if event.state in SOLO_STATES:
                if (site, epoch) not in self._held:
                    found.append(self._violate(
                        f"site {site!r} is {event.state} in epoch {epoch} without the witness's grant", event
                    ))
            if event.state == "SOLO":
                other = self._solo_sites.setdefault(epoch, site)
                if other != site:
                    found.append(self._violate(f"split brain: sites {other!r} and {site!r} both SOLO in epoch {epoch}",
                                               event))
            if self.strict_epoch_modes:
                if event.state == "SOLO" and epoch in self._sync_epochs:
                    found.append(self._violate(
                        f"epoch {epoch} is both a SYNC epoch (site {self._sync_epochs[epoch]!r}) and a SOLO epoch "
                        f"(site {site!r})", event
                    ))
                if event.state == "SYNC":
                    self._sync_epochs.setdefault(epoch, site)
                    if epoch in self._solo_sites:
                        found.append(self._violate(
                            f"site {site!r} is SYNC in epoch {epoch}, in which site {self._solo_sites[epoch]!r} "
                            f"was SOLO", event
                        ))
            self._state[site] = event
        else:
            self.commits += 1
            current = self._state.get(site)
            if current is None:
                found.append(self._violate(f"site {site!r} committed in epoch {epoch} before any state event", event))
            elif current.epoch != epoch:
                found.append(self._violate(
                    f"site {site!r} committed in epoch {epoch} while {current.state}({current.epoch})", current, event
                ))
            elif current.state == "SYNC":
                pass
            elif current.state in SOLO_STATES and (site, epoch) in self._held:
                pass
            else:
                granted = "with" if (site, epoch) in self._held else "without"
                found.append(self._violate(
                    f"site {site!r} committed in epoch {epoch} while {current.state}({epoch}) {granted} the grant",
                    current, event,
                ))
        return found

    def verdict(self) -> Verdict:
        details = {"events": self.events, "commits": self.commits, "violations": self.violation_count}
        if not self.violation_count:
            return Verdict(CHECKER, STATUS_OK, message="no split brain", details=details)
        message, events = self.violations[0]
        more = f" (and {self.violation_count - 1} more)" if self.violation_count > 1 else ""
        return Verdict(
            CHECKER,
            STATUS_VIOLATION,
            message=message + more,
            key=events[-1].site,
            window=tuple(event.to_dict() for event in events),
            details={**details, "messages": [m for m, _ in self.violations]},
        )


def check(events: Iterable[SiteEvent | Mapping[str, Any]], *, strict_epoch_modes: bool = True) -> Verdict:
    """Check a complete list of site events (any order: they are sorted by time, stably). Pure."""
    parsed = sorted((as_event(event) for event in events), key=lambda event: event.time)
    checker = SplitBrainChecker(strict_epoch_modes=strict_epoch_modes)
    for event in parsed:
        checker.observe(event)
    return checker.verdict()
