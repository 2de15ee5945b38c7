"""Synthetic register histories for testing and benchmarking the checkers.

``register_history`` simulates a correct (linearizable) multi-key register: every operation
takes effect at a random instant between its invoke and its return, in that order, so the
history it returns is linearizable by construction. Some operations end ``info`` (they took
effect or not, at random) or ``fail`` (they did not take effect). Pure: randomness comes from
the ``random.Random`` passed in.

Run ``python -m chaos.checkers.synthetic`` to time the linearizability checker on a generated
history (the numbers quoted in docs/checkers.md come from it).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import time as _time
from typing import Any


def register_history(
    rng: random.Random,
    *,
    operations: int = 1000,
    keys: int = 4,
    processes: int = 4,
    info_probability: float = 0.0,
    fail_probability: float = 0.0,
    read_probability: float = 0.5,
    delete_probability: float = 0.1,
    duration_ns_max: int = 1000,
    think_ns_max: int = 300,
    new_process_after_info: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A linearizable history and the final state of the simulated register.

    Returns ``(events, final_state)``; ``final_state`` maps every written key to its value
    (None if deleted). Values are unique per write ("v1", "v2", ...).
    """
    assert operations >= 0 and keys >= 1 and processes >= 1
    key_names = [f"k{i}" for i in range(keys)]
    # Plan every operation: (invoke, linearization point, return, process slot).
    planned: list[dict[str, Any]] = []
    slot_process = list(range(processes))
    next_process = processes
    clock = [rng.randrange(0, think_ns_max + 1) for _ in range(processes)]
    counter = 0
    # Round-robin by earliest free time keeps the processes interleaved.
    ready = [(clock[s], s) for s in range(processes)]
    heapq.heapify(ready)
    while len(planned) < operations:
        start, slot = heapq.heappop(ready)
        invoke = start + 1
        duration = rng.randrange(1, duration_ns_max + 1)
        returned = invoke + duration
        point = rng.uniform(invoke, returned)
        roll = rng.random()
        if roll < read_probability:
            f = "read"
        elif roll < read_probability + delete_probability:
            f = "delete"
        else:
            f = "write"
        counter += 1
        outcome_roll = rng.random()
        outcome = "info" if outcome_roll < info_probability else (
            "fail" if outcome_roll < info_probability + fail_probability else "ok"
        )
        applied = outcome == "ok" or (outcome == "info" and rng.random() < 0.5)
        planned.append(
            {
                "process": slot_process[slot],
                "f": f,
                "key": rng.choice(key_names),
                "value": f"v{counter}" if f == "write" else None,
                "invoke": invoke,
                "return": returned,
                "point": point,
                "outcome": outcome,
                "applied": applied,
            }
        )
        if outcome == "info" and new_process_after_info:
            slot_process[slot] = next_process
            next_process += 1
        heapq.heappush(ready, (returned + rng.randrange(0, think_ns_max + 1), slot))
    # Apply in linearization order to find what each read returns.
    state: dict[str, Any] = {}
    for op in sorted(planned, key=lambda op: op["point"]):
        if not op["applied"]:
            continue
        if op["f"] == "read":
            op["result"] = state.get(op["key"])
        else:
            state[op["key"]] = op["value"]
    # Emit invoke and completion events in time order.
    stamped: list[tuple[int, int, dict[str, Any]]] = []
    for number, op in enumerate(planned):
        base = {"process": op["process"], "f": op["f"], "key": op["key"]}
        invoke = {**base, "type": "invoke", "value": op["value"], "time": op["invoke"]}
        stamped.append((op["invoke"], 2 * number, invoke))
        value = op.get("result") if op["f"] == "read" else op["value"]
        if op["outcome"] != "ok":
            value = None if op["f"] == "read" else value
        stamped.append(
            (op["return"], 2 * number + 1, {**base, "type": op["outcome"], "value": value, "time": op["return"]})
        )
    stamped.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in stamped], state


def main(argv: list[str] | None = None) -> int:
    from chaos.checkers import linearizability

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--info", type=float, default=0.05, help="probability an operation ends info")
    parser.add_argument("--fail", type=float, default=0.02, help="probability an operation ends fail")
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args(argv)
    events, _ = register_history(
        random.Random(arguments.seed),
        operations=arguments.operations,
        keys=arguments.keys,
        processes=arguments.processes,
        info_probability=arguments.info,
        fail_probability=arguments.fail,
    )
    started = _time.perf_counter()
    verdict = linearizability.check(events)
    elapsed = _time.perf_counter() - started
    print(json.dumps({"status": verdict.status, "seconds": round(elapsed, 3), **verdict.details}))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
