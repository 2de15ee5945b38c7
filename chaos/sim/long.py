"""The simulator at scale: many seeds in chunks, in parallel, resumable, summarised.

`python -m chaos.sim --seeds 1-100000 --out chaos-report/sim` (or `make sim-long`)
splits the seeds into chunks of `CHUNK_SEEDS`; each worker process runs whole
chunks and each finished chunk is written at once as `chunk-<first>-<last>.json`
(with the commit and parameters it ran with). A rerun with the same directory
skips the chunks already there with the same parameters, so a run stopped
half-way goes on where it stopped. At the end `summary.json` and `summary.md`
add up every chunk of the range: seeds, operations, acknowledged writes,
faults by kind, protocol errors, violations (seed and first lines) and time.
The exit status is 1 when any seed of the range has a violation.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

from chaos.sim.run import run_seed
from chaos.sim.world import SimParams

VIOLATIONS_KEPT = 20  # per chunk: the seeds with violations, with their first lines


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        commit = head.stdout.strip() or "unknown"
        return commit + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


ROOT = Path(__file__).resolve().parents[2]
NOT_SIMULATED = {"chaos/sim/long.py", "chaos/sim/__main__.py"}  # run seeds, decide nothing in them


def code_fingerprint() -> str:
    """A hash of the project's code this process has loaded (call it after a run): every module
    under the tree but the runner's own, and for a compiled extension its Cython source. Ranges run
    on different commits ran the same simulated code exactly when their fingerprints agree."""
    digest = hashlib.sha256()
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        resolved = Path(path).resolve()
        if ROOT not in resolved.parents or ".venv" in resolved.parts:
            continue
        if resolved.suffix == ".so":
            sources = list(ROOT.glob(f"native/**/{resolved.name.split('.')[0]}.pyx"))
            if not sources:
                continue
            resolved = sources[0]
        relative = resolved.relative_to(ROOT).as_posix()
        if relative not in NOT_SIMULATED:
            files.add(relative)
    for relative in sorted(files):
        digest.update(relative.encode() + b"\0" + (ROOT / relative).read_bytes() + b"\0")
    return f"{len(files)}:{digest.hexdigest()[:16]}"


def _params_key(params: SimParams) -> dict[str, Any]:
    """The parameters as a chunk file holds them (tuples as lists, sets sorted): the resume check."""
    key: dict[str, Any] = json.loads(json.dumps(asdict(params), default=sorted))
    return key


def run_chunk(seeds: Sequence[int], params: SimParams) -> dict[str, Any]:
    started = time.monotonic()
    totals: dict[str, Any] = {
        "first_seed": seeds[0], "last_seed": seeds[-1], "runs": 0, "operations": 0, "acknowledged_writes": 0,
        "protocol_errors": 0, "faults_by_kind": {}, "failed_seeds": [], "violations": [],
    }
    for seed in seeds:
        result = run_seed(seed, params)
        totals["runs"] += 1
        totals["operations"] += result.operations
        totals["acknowledged_writes"] += result.acknowledged_writes
        totals["protocol_errors"] += result.protocol_errors
        for kind, count in result.faults.items():
            totals["faults_by_kind"][kind] = totals["faults_by_kind"].get(kind, 0) + count
        if not result.ok:
            totals["failed_seeds"].append(seed)
            if len(totals["violations"]) < VIOLATIONS_KEPT:
                totals["violations"].append({"seed": seed, "violations": [v[:500] for v in result.violations[:3]]})
    totals["seconds"] = round(time.monotonic() - started, 1)
    totals["code"] = code_fingerprint()
    return totals


def run_long(
    seeds: Sequence[int], params: SimParams, out: str, *, jobs: int, chunk_seeds: int, argv: Sequence[str] | None
) -> int:
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    key = _params_key(params)
    ordered = sorted(set(seeds))
    chunks = [ordered[i : i + chunk_seeds] for i in range(0, len(ordered), chunk_seeds)]
    done: dict[int, dict[str, Any]] = {}
    todo = []
    for chunk in chunks:
        path = directory / f"chunk-{chunk[0]}-{chunk[-1]}.json"
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                saved = None
            if saved is not None and saved.get("params") == key and saved.get("runs") == len(chunk):
                done[chunk[0]] = saved
                continue
        todo.append(chunk)
    began = time.monotonic()
    print(f"chaos.sim: {len(ordered)} seeds in {len(chunks)} chunks, {len(done)} already done, {jobs} workers, "
          f"commit {commit}, writing to {directory}", flush=True)
    with ProcessPoolExecutor(jobs) as pool:
        running = {pool.submit(run_chunk, chunk, params): chunk for chunk in todo[:jobs]}
        queued = todo[jobs:]
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                chunk = running.pop(future)
                totals = future.result()
                totals.update(commit=commit, params=key)
                path = directory / f"chunk-{chunk[0]}-{chunk[-1]}.json"
                path.write_text(json.dumps(totals, indent=1) + "\n")
                done[chunk[0]] = totals
                seeds_done = sum(t["runs"] for t in done.values())
                elapsed = time.monotonic() - began
                print(f"  seeds {chunk[0]}-{chunk[-1]}: {totals['runs']} runs, {len(totals['failed_seeds'])} with "
                      f"violations ({totals['seconds']} s); {seeds_done}/{len(ordered)} done, {elapsed:.0f} s",
                      flush=True)
                if queued:
                    nxt = queued.pop(0)
                    running[pool.submit(run_chunk, nxt, params)] = nxt
    summary = _summarise([done[c[0]] for c in chunks], ordered, key, argv)
    (directory / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (directory / "summary.md").write_text(_markdown(summary))
    print(_markdown(summary), end="")
    return 1 if summary["failed_seeds"] else 0


def _summarise(chunks: list[dict[str, Any]], seeds: Sequence[int], key: dict[str, Any],
               argv: Sequence[str] | None) -> dict[str, Any]:
    faults: dict[str, int] = {}
    for chunk in chunks:
        for kind, count in chunk["faults_by_kind"].items():
            faults[kind] = faults.get(kind, 0) + count
    return {
        "command": "python -m chaos.sim " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": f"{seeds[0]}-{seeds[-1]}" if list(seeds) == list(range(seeds[0], seeds[-1] + 1)) else len(seeds),
        "runs": sum(c["runs"] for c in chunks),
        "operations": sum(c["operations"] for c in chunks),
        "acknowledged_writes": sum(c["acknowledged_writes"] for c in chunks),
        "protocol_errors": sum(c["protocol_errors"] for c in chunks),
        "faults": sum(faults.values()),
        "faults_by_kind": dict(sorted(faults.items())),
        "failed_seeds": sorted(s for c in chunks for s in c["failed_seeds"]),
        "violations": [v for c in chunks for v in c["violations"]][:VIOLATIONS_KEPT],
        "worker_seconds": round(sum(c["seconds"] for c in chunks), 1),
        "commits": sorted({c["commit"] for c in chunks}),
        "codes": sorted({c.get("code", "unknown") for c in chunks}),
        "params": key,
        "cpus": os.cpu_count(),
    }


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Simulator run: seeds {summary['seeds']}",
        "",
        f"- command: `{summary['command']}`",
        f"- commits: {', '.join(summary['commits'])}",
        f"- simulated code (fingerprint): {', '.join(summary['codes'])}",
        f"- runs {summary['runs']:,}, operations {summary['operations']:,}, acknowledged writes "
        f"{summary['acknowledged_writes']:,}, faults {summary['faults']:,}, protocol errors {summary['protocol_errors']:,}",
        f"- seeds with violations: {len(summary['failed_seeds'])} {summary['failed_seeds'][:50]}",
        f"- worker time {summary['worker_seconds']:,} s on {summary['cpus']} cpus",
        "",
        "| fault | injected |",
        "|---|---|",
        *(f"| {kind} | {count:,} |" for kind, count in summary["faults_by_kind"].items()),
        "",
    ]
    for violation in summary["violations"]:
        lines.append(f"- seed {violation['seed']}: {'; '.join(violation['violations'])[:600]}")
    return "\n".join(lines) + "\n"
