"""python -m chaos.sim: run many seeds, report violations, exit non-zero on any.

    python -m chaos.sim --seeds 1-1000          # many seeds, a summary
    python -m chaos.sim --seed 17 --verbose     # replay one seed with its trace
    python -m chaos.sim --plant no_witness --seeds 1-200
    python -m chaos.sim --list-plants
    python -m chaos.sim --seeds 1-20000 --faults partition=3,crash=1    # a weighted fault mix
    python -m chaos.sim --seeds 1-100000 --out chaos-report/sim    # summary files; resumable
    python -m chaos.sim --seed 61196 --small-values --eager-syncs --reorder --plant accept_gaps \
        --plant undurable_resync --plant undurable_resync_begin   # the stale read as found

With --out DIR, each chunk of seeds writes DIR/chunk-<first>-<last>.json when done;
a rerun with the same --out skips the chunks already there (resume after a stop),
then DIR/summary.json and DIR/summary.md add up every chunk of the range.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace

from chaos.sim.run import FAULTS, RunResult, run_seed
from chaos.sim.world import SMALL_VALUES, SimParams
from replicator.core.config import PLANTS, SIMULATOR_PLANTS
from replicator.driver import SHELL_PLANTS

CHUNK_SEEDS = 500  # seeds per summary file of a long run (--out)


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            if int(high) < int(low):
                raise argparse.ArgumentTypeError(f"bad seed range {part!r}")
            seeds.extend(range(int(low), int(high) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds")
    return seeds


def parse_faults(text: str) -> tuple[tuple[str, float], ...]:
    """`partition=3,crash` -> weights (a kind without a weight counts 1); unknown kinds refused."""
    weights: list[tuple[str, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight_text = part.partition("=")
        if name not in FAULTS:
            raise argparse.ArgumentTypeError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in {part!r}") from None
        if not weight > 0:
            raise argparse.ArgumentTypeError(f"weight of {name} must be positive")
        weights.append((name, weight))
    if not weights:
        raise argparse.ArgumentTypeError("no faults named")
    return tuple(weights)


def _run(args: tuple[int, SimParams, bool]) -> RunResult:
    seed, params, verbose = args
    return run_seed(seed, params, verbose=verbose)


# What opens the window of each simulator-only plant (--list-plants says it; tests/test_sim.py
# checks that every one has its entry).
SIMULATOR_PLANT_WINDOWS = {
    "accept_gaps": "needs --reorder (TCP never reorders; seed 61196's replay and tests/test_scenarios.py catch it)",
    "undurable_resync": "caught by seed 9377's replay with --eager-syncs (docs/chaos.md, \"Seed 9377\")",
    "undurable_resync_begin": "caught by tests/test_scenarios.py's crash of a full resync source at its ResyncBegin (seed 220)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=parse_seeds, help="seeds to run, e.g. 1-1000 or 3,7,9")
    parser.add_argument("--seed", type=int, help="one seed (with --verbose: the whole trace)")
    parser.add_argument("--plant", action="append", default=[], help="switch on a deliberate protocol bug")
    parser.add_argument("--list-plants", action="store_true", help="list the plants and exit")
    parser.add_argument("--verbose", action="store_true", help="print the trace of each run")
    parser.add_argument("--safety-ms", type=int, default=SimParams.safety_ms, help="simulated ms of faults per run")
    parser.add_argument("--no-faults", action="store_true", help="no faults (a baseline run)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--stop-after", type=int, default=0, help="stop after this many failing seeds (0: never)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--faults", type=parse_faults, help=f"restrict or weight the fault mix, e.g. partition=3,crash; kinds: {', '.join(FAULTS)}"
    )
    parser.add_argument(
        "--reorder", action="store_true", help="a test fault: links reorder messages within a connection (TCP never does)"
    )
    parser.add_argument(
        "--small-values", action="store_true",
        help="no large values and the link's own byte bound (the schedules seeds had before sizes were simulated)",
    )
    parser.add_argument(
        "--eager-syncs", action="store_true",
        help="every persist starts its sync, lazy ones too (the schedules seeds had before lazy syncs were simulated)",
    )
    parser.add_argument(
        "--fingerprint", action="store_true",
        help="run seed 1 briefly and print the hash of the simulated code (as the chunk files of --out record it)",
    )
    parser.add_argument("--out", help="write per-chunk and total summaries here; skip chunks already done (resume)")
    parser.add_argument("--chunk-seeds", type=int, default=CHUNK_SEEDS, help="seeds per chunk file with --out")
    args = parser.parse_args(argv)
    if args.list_plants:
        for name, description in PLANTS.items():
            print(f"{name:24} {description}")
        for name, description in SIMULATOR_PLANTS.items():
            print(f"{name:24} {description} [simulator only: {SIMULATOR_PLANT_WINDOWS[name]}]")
        for name, description in SHELL_PLANTS.items():
            print(f"{name:24} {description} [in the shell: replicator/driver.py]")
        return 0
    if args.fingerprint:
        from chaos.sim.long import code_fingerprint

        run_seed(1, replace(SimParams(), safety_ms=500))
        print(code_fingerprint())
        return 0
    known = set(PLANTS) | set(SIMULATOR_PLANTS) | set(SHELL_PLANTS)
    unknown = [plant for plant in args.plant if plant not in known]
    if unknown:
        parser.error(f"unknown plant(s) {unknown}; see --list-plants")
    if args.seed is not None:
        seeds = [args.seed]
    elif args.seeds:
        seeds = args.seeds
    else:
        parser.error("give --seeds or --seed")
    params = replace(
        SimParams(),
        safety_ms=args.safety_ms,
        faults=not args.no_faults,
        plants=frozenset(args.plant),
        reorder_within_connection=args.reorder,
        fault_weights=args.faults,
    )
    if args.small_values:
        params = replace(params, **SMALL_VALUES)
    if args.eager_syncs:
        params = replace(params, lazy_sync_us=None)
    if args.out:
        from chaos.sim.long import run_long

        return run_long(seeds, params, args.out, jobs=max(1, args.jobs), chunk_seeds=max(1, args.chunk_seeds), argv=argv)
    started = time.monotonic()
    failures: list[RunResult] = []
    totals = {"runs": 0, "operations": 0, "acknowledged_writes": 0, "faults": 0, "protocol_errors": 0}
    jobs = 1 if args.verbose or len(seeds) == 1 else max(1, args.jobs)
    work = [(seed, params, args.verbose) for seed in seeds]
    if jobs == 1:
        results = map(_run, work)
    else:
        pool = ProcessPoolExecutor(jobs)
        results = pool.map(_run, work, chunksize=4)
    for result in results:
        totals["runs"] += 1
        totals["operations"] += result.operations
        totals["acknowledged_writes"] += result.acknowledged_writes
        totals["faults"] += sum(result.faults.values())
        totals["protocol_errors"] += result.protocol_errors
        if not result.ok:
            failures.append(result)
            if not args.json:
                print(f"seed {result.seed}: VIOLATION", file=sys.stderr)
                for violation in result.violations:
                    print(f"  {violation[:2000]}", file=sys.stderr)
                if len(seeds) == 1 and not args.verbose:
                    print("  trace tail:", file=sys.stderr)
                    for line in result.trace_tail:
                        print(f"    {line}", file=sys.stderr)
                plant = "".join(f" --plant {p}" for p in args.plant)
                extra = (" --reorder" if args.reorder else "") + (" --small-values" if args.small_values else "") + (" --eager-syncs" if args.eager_syncs else "") + (
                    " --faults " + ",".join(f"{n}={w:g}" for n, w in args.faults) if args.faults else ""
                )
                print(f"  replay: python -m chaos.sim --seed {result.seed}{plant}{extra} --verbose", file=sys.stderr)
            if args.stop_after and len(failures) >= args.stop_after:
                break
    elapsed = time.monotonic() - started
    summary = {
        **totals,
        "failed_seeds": [f.seed for f in failures],
        "plants": sorted(args.plant),
        "seconds": round(elapsed, 1),
    }
    if args.json:
        print(json.dumps({**summary, "failures": [asdict(f) for f in failures[:5]]}))
    else:
        print(
            f"{totals['runs']} runs, {totals['operations']} operations, {totals['acknowledged_writes']} writes acknowledged, "
            f"{totals['faults']} faults, {len(failures)} with violations, {totals['protocol_errors']} protocol errors, "
            f"{elapsed:.1f} s"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
