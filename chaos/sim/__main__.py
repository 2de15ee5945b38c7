"""python -m chaos.sim: run many seeds, report violations, exit non-zero on any.

    python -m chaos.sim --seeds 1-1000          # many seeds, a summary
    python -m chaos.sim --seed 17 --verbose     # replay one seed with its trace
    python -m chaos.sim --plant no_witness --seeds 1-200
    python -m chaos.sim --list-plants
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace

from chaos.sim.run import RunResult, run_seed
from chaos.sim.world import SimParams
from replicator.core.config import PLANTS


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


def _run(args: tuple[int, SimParams, bool]) -> RunResult:
    seed, params, verbose = args
    return run_seed(seed, params, verbose=verbose)


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
    args = parser.parse_args(argv)
    if args.list_plants:
        for name, description in PLANTS.items():
            print(f"{name:24} {description}")
        return 0
    unknown = [plant for plant in args.plant if plant not in PLANTS]
    if unknown:
        parser.error(f"unknown plant(s) {unknown}; see --list-plants")
    if args.seed is not None:
        seeds = [args.seed]
    elif args.seeds:
        seeds = args.seeds
    else:
        parser.error("give --seeds or --seed")
    params = replace(SimParams(), safety_ms=args.safety_ms, faults=not args.no_faults, plants=frozenset(args.plant))
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
                print(f"  replay: python -m chaos.sim --seed {result.seed}{plant} --verbose", file=sys.stderr)
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
