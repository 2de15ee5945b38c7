"""Judging a run: the checkers on the history, final states and site logs; RTO and resync times."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from chaos.checkers import convergence, corruption, linearizability, lost_writes, split_brain
from chaos.checkers.verdict import Verdict
from chaos.suite.workload import Sample

SITE_STATES_ALONE = frozenset({"SOLO", "RESYNC_SOURCE"})


def _time(event: dict[str, Any]) -> int:
    """The host's monotonic clock (ns) when the process logged it, else the log's millisecond timestamp."""
    return int(event["mono_ns"]) if "mono_ns" in event else int(event["mono"])


def site_events(logs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Split-brain checker events from the logs: the witness's grants, the sites' role changes and commits.

    A role change to SOLO/RESYNC_SOURCE counts as granted when the witness's log shows a grant of
    that epoch to that site. Commits are logged by sites started with `[chaos] log_commits`.
    """
    grants: list[dict[str, Any]] = []
    for event in logs.get("witness", []):
        if event.get("event") == "granted" and event.get("request") == "arbitrate":
            grants.append({"site": event["site"], "time": _time(event), "event": "grant", "epoch": event["epoch"]})
    granted = {(g["site"], g["epoch"]) for g in grants}
    site_side = []
    for site, events in logs.items():
        if site == "witness":
            continue
        for event in events:
            kind = event.get("event")
            if kind == "role" and "epoch" in event:
                site_side.append(
                    {
                        "site": site,
                        "time": _time(event),
                        "event": "state",
                        "epoch": int(event["epoch"]),
                        # RECONCILE is the SYNC epoch's catch-up after a reconnect (as in the simulator)
                        "state": "SYNC" if event["new"] == "RECONCILE" else event["new"],
                        "granted": (site, event["epoch"]) in granted,
                    }
                )
            elif kind == "commit" and "epoch" in event:
                site_side.append({"site": site, "time": _time(event), "event": "commit", "epoch": int(event["epoch"])})
    return grants + site_side  # stable sort by time in the checker: a grant first on a tie


def run_checkers(
    history: Any, finals: dict[str, dict[str, Any]] | None, events: list[dict[str, Any]]
) -> list[Verdict]:
    verdicts = [linearizability.check(history), corruption.check(history)]
    if finals:
        for site, state in finals.items():
            verdicts.append(lost_writes.check(history, state, site=site))
        if len(finals) == 2:
            (name_a, a), (name_b, b) = finals.items()
            verdicts.append(convergence.check(a, b, names=(name_a, name_b)))
    verdicts.append(split_brain.check(events))
    return verdicts


def longest_gap_ms(completions: Sequence[int], start: int, end: int) -> tuple[float, bool]:
    """The longest time (ms) in [start, end] with no completion; True if service never came back."""
    points = [start] + [c for c in completions if start < c <= end]
    resumed = len(points) > 1
    points.append(end if not resumed else points[-1])
    gaps = [b - a for a, b in zip(points, points[1:], strict=False)]
    return (max(gaps) / 1e6 if gaps else 0.0), not resumed


def role_intervals(logs: dict[str, list[dict[str, Any]]], state: str) -> list[tuple[str, int, int | None]]:
    """(site, entered, left) for every stay of a site in `state` (left None if it never left)."""
    intervals = []
    for site, events in logs.items():
        if site == "witness":
            continue
        entered = None
        for event in events:
            if event.get("event") == "role":
                if event["new"] == state and entered is None:
                    entered = event["mono"]
                elif event["new"] != state and entered is not None:
                    intervals.append((site, entered, event["mono"]))
                    entered = None
            elif event.get("event") == "started" and entered is not None:
                intervals.append((site, entered, None))  # the process restarted mid-way
                entered = None
        if entered is not None:
            intervals.append((site, entered, None))
    return intervals


def episode_metrics(
    episode: dict[str, Any], samples: Sequence[Sample], logs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    start, end = episode["start_ns"], episode["end_ns"]
    pause = episode.get("paused_ns")  # the sync-point check's pause is not downtime: cut it out

    def collapsed(t: int) -> int:
        if pause is None or t < pause[0]:
            return t
        return pause[0] if t <= pause[1] else t - (pause[1] - pause[0])

    writes = sorted(collapsed(s.complete) for s in samples if s.status == "ok" and s.f != "read")
    reads = sorted(collapsed(s.complete) for s in samples if s.status == "ok" and s.f == "read")
    end = collapsed(end)
    write_rto, write_never = longest_gap_ms(writes, start, end)
    read_rto, read_never = longest_gap_ms(reads, start, end)
    resyncs = [
        round((left - entered) / 1e6, 1)
        for _, entered, left in role_intervals(logs, "RESYNC_TARGET")
        if left is not None and start <= entered <= end
    ]
    inside = [s for s in samples if start <= s.invoke <= end]
    return {
        "write_rto_ms": round(write_rto, 1),
        "read_rto_ms": round(read_rto, 1),
        "writes_never_resumed": write_never,
        "reads_never_resumed": read_never,
        "resync_ms": resyncs,
        "operations": len(inside),
        "ok": sum(s.status == "ok" for s in inside),
        "fail": sum(s.status == "fail" for s in inside),
        "info": sum(s.status == "info" for s in inside),
    }


def summarise(values: Iterable[float]) -> dict[str, float | int | None]:
    values = sorted(values)
    if not values:
        return {"count": 0, "median": None, "worst": None}
    return {"count": len(values), "median": round(statistics.median(values), 1), "worst": round(values[-1], 1)}


def per_nemesis(episodes: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, list[float]]] = {}
    for episode in episodes:
        for name in episode["nemeses"]:
            row = table.setdefault(name, {"write_rto_ms": [], "read_rto_ms": [], "resync_ms": [], "sync_after_heal_ms": []})
            metrics = episode["metrics"]
            row["write_rto_ms"].append(metrics["write_rto_ms"])
            row["read_rto_ms"].append(metrics["read_rto_ms"])
            row["resync_ms"] += metrics["resync_ms"]
            if episode.get("sync_after_heal_ms") is not None:
                row["sync_after_heal_ms"].append(episode["sync_after_heal_ms"])
    return {
        name: {"episodes": len(row["write_rto_ms"]), **{k: summarise(v) for k, v in row.items()}}
        for name, row in table.items()
    }
