"""Tests for chaos.checkers and the ``python -m chaos.check`` CLI."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaos.checkers import (
    History,
    HistoryError,
    Verdict,
    combine,
    convergence,
    corruption,
    linearizability,
    load_jsonl,
    lost_writes,
    parse_events,
    split_brain,
)
from chaos.checkers.history import Operation
from chaos.checkers.synthetic import register_history

HISTORIES = Path(__file__).parent / "histories"
REPO = Path(__file__).parent.parent
GOOD = sorted(HISTORIES.glob("ok_*.jsonl"))
BAD = sorted(HISTORIES.glob("bad_*.jsonl"))


def cli(*arguments: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chaos.check", *map(str, arguments)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---------------------------------------------------------------- hand-made histories


def test_the_hand_made_histories_are_there() -> None:
    assert len(GOOD) >= 6 and len(BAD) >= 6


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_history_is_linearizable(path: Path) -> None:
    verdict = linearizability.check(load_jsonl(path))
    assert verdict.ok, verdict.message
    assert verdict.status == "ok"


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_history_is_a_violation_with_a_window(path: Path) -> None:
    verdict = linearizability.check(load_jsonl(path))
    assert verdict.status == "violation", verdict.message
    assert not verdict.ok
    assert verdict.key == "k"
    assert 1 <= len(verdict.window) <= 6
    json.loads(verdict.to_json())


def test_stale_read_window_names_the_two_writes_and_the_read() -> None:
    verdict = linearizability.check(load_jsonl(HISTORIES / "bad_stale_read.jsonl"))
    assert [(op["f"], op["value"]) for op in verdict.window] == [("write", "v1"), ("write", "v2"), ("read", "v1")]


def test_non_monotonic_reads_window_has_both_reads() -> None:
    verdict = linearizability.check(load_jsonl(HISTORIES / "bad_non_monotonic_reads.jsonl"))
    reads = [op["value"] for op in verdict.window if op["f"] == "read"]
    assert reads == ["new", "old"]


def test_never_written_value_gets_a_dedicated_message() -> None:
    verdict = linearizability.check(load_jsonl(HISTORIES / "bad_never_written.jsonl"))
    assert "never written" in verdict.message and "'garbage'" in verdict.message
    assert verdict.details["reason"] == "never-written"
    failed = linearizability.check(load_jsonl(HISTORIES / "bad_read_of_failed_write.jsonl"))
    assert "only by a failed write" in failed.message


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_cli_accepts_good_history(path: Path) -> None:
    result = cli(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["status"] == "ok"


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_cli_rejects_bad_history(path: Path) -> None:
    result = cli(path)
    assert result.returncode == 1, result.stdout + result.stderr
    output = json.loads(result.stdout)
    assert output["status"] == "violation" and output["key"] == "k" and output["window"]


def test_cli_malformed_line_exits_2_naming_the_line() -> None:
    result = cli(HISTORIES / "malformed_line3.jsonl")
    assert result.returncode == 2
    assert "line 3" in result.stderr and "line 3" in json.loads(result.stdout)["message"]


def test_cli_missing_file_exits_2() -> None:
    assert cli(HISTORIES / "no_such_file.jsonl").returncode == 2


def test_cli_final_states_good_and_converged() -> None:
    good = HISTORIES / "lost_write_final_good.json"
    result = cli(HISTORIES / "lost_write.jsonl", "--final-a", good, "--final-b", good)
    assert result.returncode == 0, result.stdout
    checkers = [v["checker"] for v in json.loads(result.stdout)["details"]["verdicts"]]
    assert checkers == ["linearizability", "corruption", "lost_writes", "lost_writes", "convergence"]


def test_cli_final_state_may_or_may_not_hold_an_info_write() -> None:
    result = cli(HISTORIES / "lost_write.jsonl", "--final-a", HISTORIES / "lost_write_final_good_info_absent.json")
    assert result.returncode == 0, result.stdout


def test_cli_lost_write() -> None:
    result = cli(
        HISTORIES / "lost_write.jsonl",
        "--final-a", HISTORIES / "lost_write_final_good.json",
        "--final-b", HISTORIES / "lost_write_final_lost.json",
    )
    assert result.returncode == 1
    output = json.loads(result.stdout)
    assert output["key"] == "k"
    assert "lost_writes" in output["message"] and "'v2'" in output["message"] and "site b" in output["message"]


def test_cli_divergent_sites() -> None:
    result = cli(
        HISTORIES / "lost_write.jsonl",
        "--final-a", HISTORIES / "lost_write_final_good.json",
        "--final-b", HISTORIES / "lost_write_final_b_differs.json",
    )
    assert result.returncode == 1
    assert json.loads(result.stdout)["message"].startswith("convergence:")


def test_cli_unknown_when_budget_is_too_small(tmp_path: Path) -> None:
    events, _ = register_history(random.Random(5), operations=300, keys=1, processes=6, think_ns_max=10)
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert cli(path).returncode == 0
    result = cli(path, "--step-budget", "3")
    assert result.returncode == 2
    assert json.loads(result.stdout)["status"] == "unknown"


# ---------------------------------------------------------------- parsing and the builder


def event(process: object, kind: str, f: str, value: object, time: int, key: str = "k") -> dict[str, object]:
    return {"process": process, "type": kind, "f": f, "key": key, "value": value, "time": time}


@pytest.mark.parametrize(
    ("events", "line", "words"),
    [
        ([event(1, "ok", "read", None, 5)], 1, "no outstanding invoke"),
        ([event(1, "invoke", "read", None, 5), event(1, "invoke", "read", None, 6)], 2, "outstanding"),
        ([event(1, "invoke", "read", None, 5), event(1, "ok", "read", None, 4)], 2, "before its invoke"),
        ([event(1, "invoke", "read", None, 5), event(1, "ok", "write", None, 6)], 2, "does not match"),
        ([event(1, "invoke", "scan", None, 5)], 1, "'f' must be"),
        ([{"process": 1, "type": "invoke", "f": "read", "key": "k"}], 1, "missing field 'time'"),
        ([event(1, "invoke", "read", None, -1)], 1, "non-negative"),
        ([event(1, "invoke", "read", None, 1), event(1, "ok", "read", None, 2), ["x"]], 3, "JSON object"),
    ],
)
def test_parse_errors_name_the_line(events: list[object], line: int, words: str) -> None:
    with pytest.raises(HistoryError) as caught:
        parse_events(events)  # type: ignore[arg-type]
    assert caught.value.line == line and words in str(caught.value)


def test_unfinished_invoke_is_info_and_info_process_may_continue() -> None:
    operations = parse_events(
        [
            event(1, "invoke", "write", "v1", 1),
            event(1, "info", "write", None, 2),
            event(1, "invoke", "write", "v2", 3),
        ]
    )
    assert [(op.value, op.status, op.return_time) for op in operations] == [
        ("v1", "info", float("inf")),
        ("v2", "info", float("inf")),
    ]


def test_history_builder_round_trips_through_jsonl(tmp_path: Path) -> None:
    now = [0]

    def clock() -> int:
        now[0] += 10
        return now[0]

    history = History(clock=clock)
    write = history.invoke(1, "write", "k", "v1")
    read = history.invoke(2, "read", "k")
    history.ok(write)
    history.ok(read, "v1")
    lost = history.invoke(3, "write", "k", "v2")
    history.info(lost)
    failed = history.invoke(3, "delete", "k", time=1000)
    history.fail(failed, time=1001)
    with pytest.raises(HistoryError):
        history.ok(failed, time=1002)
    busy = history.invoke(4, "read", "k", time=1003)
    with pytest.raises(HistoryError):
        history.invoke(4, "read", "k", time=1004)
    history.ok(busy, "v1", time=1005)
    path = tmp_path / "h.jsonl"
    history.dump(path)
    assert load_jsonl(path) == history.events()
    assert linearizability.check(history).ok
    assert linearizability.check(load_jsonl(path)).ok
    assert [op.status for op in history.operations()] == ["ok", "ok", "info", "fail", "ok"]
    with pytest.raises(ValueError):
        History().invoke(1, "read", "k")


def test_integer_keys_and_structured_values() -> None:
    history = History()
    write = history.invoke(1, "write", 7, {"block": [1, 2]}, time=1)
    history.ok(write, time=2)
    read = history.invoke(1, "read", 7, time=3)
    history.ok(read, {"block": [1, 2]}, time=4)
    assert linearizability.check(history).ok
    assert lost_writes.check(history, {"7": {"block": [1, 2]}}).ok
    assert lost_writes.check(history, {"7": None}).violation


# ---------------------------------------------------------------- linearizability details


def ops_from(*rows: tuple[object, str, str, object, int, float]) -> list[Operation]:
    """Rows of (process, f, status, value, invoke, return)."""
    return [
        Operation(process=p, f=f, key="k", value=v, invoke_time=i, return_time=r, status=s, index=n, line=n + 1)
        for n, (p, f, s, v, i, r) in enumerate(rows)
    ]


def test_equal_times_count_as_concurrent() -> None:
    # The read is invoked at the very instant the write returns: either order is allowed.
    history = ops_from((1, "write", "ok", "v1", 0, 10), (2, "read", "ok", None, 10, 20))
    assert linearizability.check(history).ok


def test_values_need_not_be_unique() -> None:
    history = ops_from(
        (1, "write", "ok", "x", 0, 10),
        (1, "write", "ok", "y", 20, 30),
        (2, "write", "ok", "x", 25, 60),
        (3, "read", "ok", "x", 70, 80),
        (3, "read", "ok", "y", 90, 95),
    )
    verdict = linearizability.check(history)
    assert verdict.violation  # y was overwritten for sure by the second x before the first read.
    assert linearizability.check(history[:4]).ok


def test_info_delete_may_happen_late() -> None:
    history = ops_from(
        (1, "write", "ok", "v1", 0, 10),
        (2, "delete", "info", None, 5, float("inf")),
        (3, "read", "ok", "v1", 20, 30),
        (3, "read", "ok", None, 40, 50),
        (3, "read", "ok", None, 60, 70),
    )
    assert linearizability.check(history).ok
    # ...but once it took effect it cannot be undone.
    assert linearizability.check([*history, *ops_from((0, "read", "ok", "v1", 80, 90))[:1]]).ok is False


def test_many_info_deletes_do_not_blow_up() -> None:
    rows: list[tuple[object, str, str, object, int, float]] = []
    t = 0
    for n in range(200):
        rows.append((f"w{n}", "write", "ok", f"v{n}", t, t + 5))
        rows.append((f"d{n}", "delete", "info", None, t + 1, float("inf")))
        rows.append((f"r{n}", "read", "ok", None if n % 2 else f"v{n}", t + 6, t + 9))
        t += 10
    verdict = linearizability.check(ops_from(*rows))
    assert verdict.ok, verdict.message
    # Make the last read impossible: it reads a value overwritten for sure.
    rows.append(("late", "read", "ok", "v3", t + 100, t + 101))
    assert linearizability.check(ops_from(*rows)).violation


def test_unknown_is_distinct_from_ok_and_violation() -> None:
    events, _ = register_history(random.Random(3), operations=200, keys=1, processes=6, think_ns_max=10)
    verdict = linearizability.check(events, step_budget=2)
    assert verdict.status == "unknown" and not verdict.ok and not verdict.violation
    assert "budget" in verdict.message


# ---------------------------------------------------------------- properties


HEAVY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def simulated(draw: st.DrawFn) -> tuple[list[dict[str, object]], dict[str, object]]:
    seed = draw(st.integers(0, 2**32 - 1))
    return register_history(
        random.Random(seed),
        operations=draw(st.integers(0, 120)),
        keys=draw(st.integers(1, 3)),
        processes=draw(st.integers(1, 6)),
        info_probability=draw(st.sampled_from([0.0, 0.05, 0.2])),
        fail_probability=draw(st.sampled_from([0.0, 0.1])),
        delete_probability=draw(st.sampled_from([0.0, 0.1, 0.3])),
        think_ns_max=draw(st.sampled_from([0, 50, 2000])),
        new_process_after_info=draw(st.booleans()),
    )


@HEAVY
@given(simulated())
def test_simulated_register_histories_are_accepted(case: tuple[list[dict[str, object]], dict[str, object]]) -> None:
    events, final = case
    assert linearizability.check(events).ok
    assert corruption.check(events).ok
    assert lost_writes.check(events, final).ok


def mutate_read(events: list[dict[str, object]], choose: int, future: bool) -> list[Operation] | None:
    """Make one ok read return a value that it provably cannot return, or None if there is none.

    ``future``: a value whose every write was invoked after the read returned. Otherwise: a value
    whose every write returned before an acknowledged write (of another value) that itself
    returned before the read was invoked.
    """
    operations = parse_events(events)
    options = []
    for read in operations:
        if read.f != "read" or read.status != "ok":
            continue
        same_key = [op for op in operations if op.key == read.key and op.is_write and op.status != "fail"]
        by_value: dict[object, list[Operation]] = {}
        for op in same_key:
            by_value.setdefault(op.value, []).append(op)
        for value, writes in by_value.items():
            if value is None or value == read.value:
                continue
            if future:
                good = all(w.invoke_time > read.return_time for w in writes)
            else:
                last = max(w.return_time for w in writes)
                good = any(
                    o.status == "ok" and o.value != value and o.invoke_time > last and o.return_time < read.invoke_time
                    for o in same_key
                )
            if good:
                options.append((read, value))
    if not options:
        return None
    read, value = options[choose % len(options)]
    return [dataclasses.replace(op, value=value) if op is read else op for op in operations]


@HEAVY
@given(simulated(), st.integers(0, 10_000), st.booleans())
def test_a_read_of_an_impossible_value_is_rejected(
    case: tuple[list[dict[str, object]], dict[str, object]], choose: int, future: bool
) -> None:
    mutated = mutate_read(case[0], choose, future)
    if mutated is not None:
        verdict = linearizability.check(mutated)
        assert verdict.violation, verdict.message
        assert verdict.window


def test_the_mutations_do_happen() -> None:
    events, _ = register_history(random.Random(11), operations=200, keys=2, processes=4)
    assert mutate_read(events, 0, future=True) is not None
    assert mutate_read(events, 0, future=False) is not None


@HEAVY
@given(simulated(), st.integers(0, 10_000))
def test_a_final_state_with_an_overwritten_value_is_a_lost_write(
    case: tuple[list[dict[str, object]], dict[str, object]], choose: int
) -> None:
    events, final = case
    operations = parse_events(events)
    candidates = []
    for key in final:
        writes = [op for op in operations if op.key == key and op.is_write and op.status != "fail"]
        acknowledged = [op for op in writes if op.status == "ok"]
        for old in {op.value for op in writes if op.value is not None}:
            last = max(op.return_time for op in writes if op.value == old)
            # An acknowledged write of another value started after every write of `old` returned.
            if any(op.value != old and op.invoke_time > last for op in acknowledged):
                candidates.append((key, old))
    if candidates:
        key, old = sorted(candidates, key=repr)[choose % len(candidates)]
        verdict = lost_writes.check(events, {**final, key: old}, site="b")
        assert verdict.violation and verdict.key == key, verdict.message


# ---------------------------------------------------------------- lost writes, convergence, corruption


def test_lost_write_names_the_acknowledged_write() -> None:
    events = load_jsonl(HISTORIES / "lost_write.jsonl")
    verdict = lost_writes.check(events, {"k": "v1"}, site="a")
    assert verdict.violation and verdict.key == "k"
    assert [op["value"] for op in verdict.details["lost"]] == ["v2"]
    assert "acknowledged write lost" in verdict.message
    assert lost_writes.check(events, {"k": "v2", "j": "j1"}).ok
    resurrected = lost_writes.check(events, {"k": "v2", "x": "boo"})
    assert resurrected.violation and resurrected.key == "x"
    deleted = lost_writes.check(events, {})
    assert deleted.violation and deleted.key == "k"


def test_final_state_of_failed_write_is_a_violation() -> None:
    events = load_jsonl(HISTORIES / "ok_failed_write_not_read.jsonl")
    assert lost_writes.check(events, {"k": "v1"}).ok
    verdict = lost_writes.check(events, {"k": "v2"})
    assert verdict.violation and "failed write" in verdict.message


def test_convergence() -> None:
    assert convergence.check({"a": "1", "b": None}, {"a": "1"}).ok
    verdict = convergence.check(
        {"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "X", "d": "4"}, names=("east", "west"), differing_keys_max=2
    )
    assert verdict.violation
    assert verdict.details == {
        "keys": 4, "differing": 3, "only_in_east": 1, "only_in_west": 1, "different_value": 1
    }
    assert [item["key"] for item in verdict.window] == ["b", "c"]
    assert verdict.window[0] == {"key": "b", "east": "2", "west": "X"}


def test_corruption_reports_every_bad_read() -> None:
    events = [
        event(1, "invoke", "write", "good", 1, key="k"),
        event(1, "ok", "write", "good", 2, key="k"),
        event(2, "invoke", "read", None, 3, key="j"),
        event(2, "ok", "read", "good", 4, key="j"),
        event(2, "invoke", "read", None, 5, key="k"),
        event(2, "ok", "read", "\x00junk", 6, key="k"),
    ]
    verdict = corruption.check(events)
    assert verdict.violation and verdict.details["corrupt_reads"] == 2
    assert "mis-routed" in verdict.message
    assert corruption.check(load_jsonl(HISTORIES / "bad_read_of_failed_write.jsonl")).ok


# ---------------------------------------------------------------- split brain


def site(name: str, time: int, kind: str, epoch: int, state: str | None = None, granted: bool = False) -> dict:
    return {"site": name, "time": time, "event": kind, "epoch": epoch, "state": state, "granted": granted}


def test_split_brain_accepts_a_normal_failover() -> None:
    events = [
        site("a", 1, "state", 1, "SYNC"),
        site("b", 1, "state", 1, "SYNC"),
        site("a", 2, "commit", 1),
        site("b", 3, "commit", 1),
        site("a", 4, "state", 1, "SUSPENDED"),
        site("b", 4, "state", 1, "SUSPENDED"),
        site("a", 5, "grant", 2),
        site("a", 6, "state", 2, "SOLO", granted=True),
        site("b", 6, "state", 1, "FENCED"),
        site("a", 7, "commit", 2),
        site("b", 8, "state", 2, "RESYNC_TARGET"),
        site("a", 8, "state", 2, "RESYNC_SOURCE", granted=True),
        site("a", 9, "commit", 2),
        site("a", 10, "state", 3, "SYNC"),
        site("b", 10, "state", 3, "SYNC"),
        site("b", 11, "commit", 3),
    ]
    verdict = split_brain.check(events)
    assert verdict.ok, verdict.message
    assert verdict.details["commits"] == 5


@pytest.mark.parametrize(
    ("events", "words"),
    [
        (
            [site("a", 1, "state", 2, "SOLO", True), site("b", 2, "state", 2, "SOLO", True)],
            "both SOLO in epoch 2",
        ),
        ([site("a", 1, "grant", 2), site("b", 2, "grant", 2)], "granted to both"),
        ([site("a", 1, "state", 2, "SOLO")], "without the witness's grant"),
        ([site("a", 1, "state", 1, "SUSPENDED"), site("a", 2, "commit", 1)], "while SUSPENDED(1)"),
        ([site("a", 1, "state", 1, "SYNC"), site("a", 2, "commit", 2)], "committed in epoch 2 while SYNC(1)"),
        ([site("a", 2, "commit", 1)], "before any state event"),
        ([site("a", 1, "state", 2, "SOLO", True), site("b", 2, "state", 2, "SYNC")], "was SOLO"),
    ],
)
def test_split_brain_violations(events: list[dict], words: str) -> None:
    verdict = split_brain.check(events)
    assert verdict.violation and words in verdict.message, verdict.message
    assert verdict.window


def test_split_brain_incremental_and_objects() -> None:
    checker = split_brain.SplitBrainChecker(strict_epoch_modes=False)
    assert checker.observe(split_brain.SiteEvent("a", 1, "state", 2, "SOLO", granted=True)) == []
    assert checker.observe(split_brain.SiteEvent("b", 2, "state", 2, "SYNC")) == []
    assert checker.observe(split_brain.SiteEvent("b", 3, "state", 2, "SOLO", granted=True))
    assert checker.verdict().violation
    with pytest.raises(ValueError):
        checker.observe(split_brain.SiteEvent("b", 1, "commit", 2))
    with pytest.raises(ValueError):
        split_brain.SiteEvent("a", 1, "nap", 2)
    # The grant given to a site for an epoch counts when it goes SOLO later.
    assert split_brain.check([site("a", 1, "grant", 4), site("a", 2, "state", 4, "SOLO")]).ok


def test_cli_site_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(site("a", 1, "state", 2, "SOLO")) + "\n")
    result = cli(HISTORIES / "ok_two_keys_interleaved.jsonl", "--site-events", path)
    assert result.returncode == 1 and "split_brain" in json.loads(result.stdout)["message"]
    path.write_text('{"site": "a"}\n')
    result = cli(HISTORIES / "ok_two_keys_interleaved.jsonl", "--site-events", path)
    assert result.returncode == 2 and "line 1" in result.stderr


# ---------------------------------------------------------------- verdicts


def test_verdict_is_frozen_and_serialisable() -> None:
    verdict = Verdict("x", "violation", message="m", key="k", window=[{"a": 1}])
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.status = "ok"  # type: ignore[misc]
    assert json.loads(verdict.to_json())["window"] == [{"a": 1}]
    with pytest.raises(AssertionError):
        Verdict("x", "maybe")
    combined = combine("all", [Verdict("a", "ok"), Verdict("b", "unknown", message="u"), Verdict("c", "violation")])
    assert combined.status == "violation" and combined.message.startswith("c:")
    assert combine("all", [Verdict("a", "ok"), Verdict("b", "unknown")]).status == "unknown"
    assert combine("all", [Verdict("a", "ok")]).ok


def test_sync_point_verdict_is_not_ok_when_nothing_was_compared() -> None:
    """The chaos suite's convergence at the sync points: a divergence is a violation, and a run whose
    episodes had not one sync point checked says unknown (the run fails), not ok."""
    from chaos.suite.run import sync_point_verdict

    identical = {"index": 1, "sync_point": "sites identical (40 keys)"}
    busy = {"index": 2, "sync_point": "not checked: clients still busy"}
    assert sync_point_verdict([identical, busy], []).status == "ok"
    assert "1 of 2" in sync_point_verdict([identical, busy], []).message
    assert sync_point_verdict([], []).status == "ok"  # no episode, nothing to compare
    unchecked = sync_point_verdict([busy, {"index": 3, "sync_point": "not checked: TimeoutError: x"}], [])
    assert unchecked.status == "unknown" and "clients still busy" in unchecked.message
    assert combine("chaos", [unchecked]).status == "unknown"
    diverged = sync_point_verdict([identical, {"index": 4, "sync_point": "DIVERGED: 2 key(s) differ"}], [{"episode": 4}])
    assert diverged.status == "violation" and diverged.details["divergences"] == [{"episode": 4}]
