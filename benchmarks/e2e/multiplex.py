"""Unary against multiplexed client calls, on one Replicator pair in one run (issue 15, lever 3).

    python -m benchmarks.e2e.multiplex [--seconds 8] [--rounds 2] [--concurrency 32] [--size 4096]

Starts a witness and two sites (ReplicatorSystem, demo timeouts) once, then runs 4 KiB puts at c=32
with the load generator's public AsyncClient in unary mode and in multiplexed mode, alternating
(unary, multiplexed, unary, ...) so that both see the same cluster, disk and neighbours. Prints
per run and per mode (summed over rounds): ops/s, p50/p99, and server CPU µs per acknowledged put
for each site (/proc/<pid>/stat, benchmarks/e2e/cpu.py), and the ratios multiplexed / unary.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

from benchmarks.e2e.loadgen import run_load
from benchmarks.e2e.replicator_system import ReplicatorSystem

MODES = (("unary", False), ("multiplexed", True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window of each run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2, help="runs per mode, alternating")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--size", type=int, default=4096, help="value bytes")
    args = parser.parse_args()
    totals: dict[str, dict[str, float]] = {name: {"ops": 0, "s": 0.0, "a": 0.0, "b": 0.0} for name, _ in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-mux-") as directory:
        system = ReplicatorSystem(directory)
        system.start()
        try:
            base = system.driver_spec("both")
            print(f"{'run':<14} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'a us/op':>8} {'b us/op':>8} errors")
            for round_number in range(args.rounds):
                for name, multiplex in MODES:
                    system.wait_ready()
                    spec = replace(base, options={**base.options, "multiplex": multiplex})
                    result = run_load(
                        spec, "put", args.size, args.concurrency, args.seconds, args.warmup,
                        server_pids=system.processes(), seed=round_number + 1,
                    )
                    per_op = result.server_cpu_us_per_op
                    print(
                        f"{name + ' ' + str(round_number + 1):<14} {result.ops_per_s:>8.0f} {result.p50_ms:>7.2f} "
                        f"{result.p99_ms:>7.2f} {per_op.get('a') or 0:>8.1f} {per_op.get('b') or 0:>8.1f} "
                        f"{result.errors}" + (" (load generator saturated)" if result.loadgen_saturated else "")
                    )
                    total = totals[name]
                    total["ops"] += result.ops
                    total["s"] += result.seconds
                    for site in ("a", "b"):
                        total[site] += result.server_cpu_s.get(site) or 0.0
        finally:
            system.stop()
    print()
    summary = {}
    for name, _ in MODES:
        total = totals[name]
        ops = max(1.0, total["ops"])
        summary[name] = (total["ops"] / total["s"], total["a"] / ops * 1e6, total["b"] / ops * 1e6)
        print(f"{name:<12} {summary[name][0]:>8.0f} ops/s  a {summary[name][1]:.1f} us/op  b {summary[name][2]:.1f} us/op")
    unary, multiplexed = summary["unary"], summary["multiplexed"]
    print(
        f"multiplexed / unary: ops/s {multiplexed[0] / unary[0]:.2f}x, CPU per put a {multiplexed[1] / unary[1]:.2f}x, "
        f"b {multiplexed[2] / unary[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
