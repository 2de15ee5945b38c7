"""The end-to-end benchmark's output: results.json, a Markdown report with ratios, PNG plots.

    results = new_results(argv, settings)       # machine info, settings, empty lists
    results["runs"].append(run_record(...))     # __main__ fills runs, systems, raw, recovery
    paths = write_report(results, out_dir)      # evaluates the goals, writes results.json, report.md,
                                                # summary.md (goals + 4 KiB puts, for the README), plots/

The results document (results.json, schema 1):

    {"schema": 1, "started": ISO, "finished": ISO, "wall_s": s, "command": [...],
     "machine": {cpu_count, cpu_model, kernel, python, packages: {...}, git: {...}, load_avg_start, ...},
     "settings": {seconds, warmup_s, quick, keys, ...},
     "systems": {name: {"status": "ok" | "not available" | "failed", "message", "version", "settings",
                        "processes": {name: pid}}},
     "runs": [{"system", "placement", "op", "value_size", "concurrency", "status": "ok" | "failed",
               "message", "load_avg", ...every LoadResult field: ops_per_s, mb_per_s, latency_ms{p50,...},
               errors, error_messages, loadgen_cpu_s, server_cpu_s, server_cpu_us_per_op, ...}],
     "raw": [{"value_size", "status", ...raw_rocksdict's numbers}],
     "recovery": {"resync": {...} | {"status": "not measured", "message"},
                  "failover": {...} | {"status": "not measured", "message"}},
     "goals": [{"id", "goal", "measured", "ratio", "target", "status": "pass" | "miss" | "not measured"}]}

A *series* is a system at a placement: "replicator" (clients at both sites), "replicator (one site)",
"replicator-single" (replication off), "etcd", "redis". Ratios are always the Replicator pair with
clients at both sites against the other series, from the same run of the suite.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA = 1
MAIN = "replicator"  # the series every ratio is about
SINGLE = "replicator-single"
ONE_SITE = "replicator (one site)"
BASELINES = ("etcd", "redis")
SERIES_ORDER = (MAIN, ONE_SITE, "replicator-production", SINGLE, "etcd", "redis")
BLOCK_OPS = ("block_write", "block_read")
OP_TITLES = {
    "put": "object puts",
    "get": "object gets",
    "block_write": "block writes",
    "block_read": "block reads",
}
PACKAGES = ("grpcio", "protobuf", "rocksdict", "uvloop", "redis", "matplotlib", "replicator")
GOAL_TARGETS = {
    "put_vs_etcd": 2.0,
    "put_vs_redis": 1.0,
    "block_vs_raw": 0.5,
    "replication_cost": 0.7,
    "c1_latency": 0.3,  # ms more than the single site at most
    "failover_rto": 2.0,  # seconds, median, demo timeouts
    "failover_rto_production": 3.0,  # seconds, median, the shipped default timeouts
}


# ------------------------------------------------------------------ building the document


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (versions of etcd and redis are added per system)."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": _memory_bytes(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": _package_versions(),
        "git": _git(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


def new_results(command: Sequence[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "started": _now(),
        "finished": None,
        "wall_s": None,
        "command": list(command),
        "machine": machine_info(),
        "settings": dict(settings),
        "systems": {},
        "runs": [],
        "raw": [],
        "recovery": {},
        "goals": [],
    }


def series_name(system: str, placement: str) -> str:
    """The label of a system at a placement (see the module docstring)."""
    if system == MAIN and placement == "one":
        return ONE_SITE
    return system


def run_record(
    system: str, placement: str, result: Mapping[str, Any] | None, *, message: str = "", **extra: Any
) -> dict[str, Any]:
    """One run of the matrix: a LoadResult's fields (`result.to_dict()`) or a failure with its message."""
    record: dict[str, Any] = {
        "system": system,
        "placement": placement,
        "series": series_name(system, placement),
        "status": "ok" if result is not None else "failed",
        "message": message,
    }
    record.update(extra)
    if result is not None:
        record.update(result)
    return record


# ------------------------------------------------------------------ looking things up


def _ok_runs(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results.get("runs", []) if r.get("status") == "ok"]


def find_run(
    results: Mapping[str, Any], series: str, op: str, value_size: int, concurrency: int
) -> dict[str, Any] | None:
    for run in _ok_runs(results):
        if (run["series"], run["op"], run["value_size"], run["concurrency"]) == (series, op, value_size, concurrency):
            return run
    return None


def _p(run: Mapping[str, Any] | None, name: str) -> float | None:
    if run is None:
        return None
    value = (run.get("latency_ms") or {}).get(name)
    return None if value is None else float(value)


def _throughput(run: Mapping[str, Any] | None, op: str) -> float | None:
    """MB/s for block ops, ops/s for objects (the unit each table and goal uses)."""
    if run is None or not run.get("ops"):
        return None
    return float(run["mb_per_s"] if op in BLOCK_OPS else run["ops_per_s"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _median_rto_s(failover: Mapping[str, Any]) -> float | None:
    """The median RTO in seconds from measure_failover's dict, whatever unit it names."""
    for key, scale in (("median_rto_ms", 1e-3), ("rto_median_ms", 1e-3), ("median_rto_s", 1.0), ("rto_median_s", 1.0)):
        value = failover.get(key)
        if isinstance(value, int | float):
            return float(value) * scale
    for key, scale in (("rto_ms", 1e-3), ("rto_s", 1.0)):
        values = failover.get(key)
        if isinstance(values, list) and values and all(isinstance(v, int | float) for v in values):
            return float(statistics.median(values)) * scale
    return None


# ------------------------------------------------------------------ goals


def _goal(
    goal_id: str, goal: str, measured: str, ratio: float | None, target: str, ok: bool | None
) -> dict[str, Any]:
    status = "not measured" if ok is None else ("pass" if ok else "miss")
    return {"id": goal_id, "goal": goal, "measured": measured, "ratio": ratio, "target": target, "status": status}


def _fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.{digits}f}"
    return f"{text}{unit}"


def _missing(*named: tuple[str, Any]) -> str:
    absent = [name for name, value in named if value is None]
    return "not measured: no " + ", no ".join(absent) if absent else ""


def evaluate_goals(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each with what was measured, the ratio, and pass / miss / not measured."""
    goals = []
    size, c = 4096, 32
    rep = find_run(results, MAIN, "put", size, c)
    etcd = find_run(results, "etcd", "put", size, c)
    redis = find_run(results, "redis", "put", size, c)
    single = find_run(results, SINGLE, "put", size, c)

    ratio = _ratio(_throughput(rep, "put"), _throughput(etcd, "put"))
    rep_p99, etcd_p99 = _p(rep, "p99"), _p(etcd, "p99")
    ok = None if ratio is None or rep_p99 is None or etcd_p99 is None else (
        ratio >= GOAL_TARGETS["put_vs_etcd"] and rep_p99 < etcd_p99
    )
    measured = _missing(("replicator run", rep), ("etcd run", etcd)) or (
        f"{_fmt(_throughput(rep, 'put'))} vs {_fmt(_throughput(etcd, 'put'))} ops/s; "
        f"p99 {_fmt(rep_p99)} vs {_fmt(etcd_p99)} ms"
    )
    goals.append(_goal("put_vs_etcd", "4 KiB puts at c=32: ≥ 2× etcd throughput, p99 below etcd's",
                       measured, ratio, "≥ 2× and p99 lower", ok))

    ratio = _ratio(_throughput(rep, "put"), _throughput(redis, "put"))
    measured = _missing(("replicator run", rep), ("redis run", redis)) or (
        f"{_fmt(_throughput(rep, 'put'))} vs {_fmt(_throughput(redis, 'put'))} ops/s"
    )
    goals.append(_goal("put_vs_redis", "4 KiB puts at c=32: ≥ 1× Redis (SET + WAIT 1) throughput",
                       measured, ratio, "≥ 1×", None if ratio is None else ratio >= GOAL_TARGETS["put_vs_redis"]))

    mib = 1 << 20
    block_runs = [r for r in _ok_runs(results) if (r["series"], r["op"], r["value_size"]) == (MAIN, "block_write", mib)]
    best = max(block_runs, key=lambda r: r["mb_per_s"], default=None)
    raw = next((r for r in results.get("raw", []) if r.get("value_size") == mib and r.get("status") == "ok"), None)
    raw_mb = float(raw["mb_per_s"]) if raw else None
    best_mb = float(best["mb_per_s"]) if best else None
    ratio = _ratio(best_mb, raw_mb)
    measured = _missing(("replicator 1 MiB block writes", best), ("raw rocksdict run", raw)) or (
        f"{_fmt(best_mb)} MB/s (best, at c={best['concurrency']}) vs raw {_fmt(raw_mb)} MB/s"  # type: ignore[index]
    )
    goals.append(_goal("block_vs_raw", "1 MiB block writes: ≥ 0.5× raw rocksdict synced batches (MB/s)",
                       measured, ratio, "≥ 0.5×", None if ratio is None else ratio >= GOAL_TARGETS["block_vs_raw"]))

    ratio = _ratio(_throughput(rep, "put"), _throughput(single, "put"))
    measured = _missing(("replicator run", rep), ("single-site run", single)) or (
        f"{_fmt(_throughput(rep, 'put'))} vs {_fmt(_throughput(single, 'put'))} ops/s (4 KiB puts, c=32)"
    )
    goals.append(_goal("replication_cost", "replication on vs off (4 KiB puts, c=32): ≥ 0.7×",
                       measured, ratio, "≥ 0.7×", None if ratio is None else ratio >= GOAL_TARGETS["replication_cost"]))

    rep1 = find_run(results, MAIN, "put", size, 1)
    single1 = find_run(results, SINGLE, "put", size, 1)
    a, b = _p(rep1, "p50"), _p(single1, "p50")
    extra = None if a is None or b is None else round(a - b, 3)
    measured = _missing(("replicator c=1 run", rep1), ("single-site c=1 run", single1)) or (
        f"p50 {_fmt(a, 3)} vs {_fmt(b, 3)} ms: +{_fmt(extra, 3)} ms"
    )
    goals.append(_goal("c1_latency", "4 KiB puts at c=1: p50 ≤ single-site p50 + 0.3 ms",
                       measured, extra, "≤ +0.3 ms", None if extra is None else extra <= GOAL_TARGETS["c1_latency"]))

    for key, label in (("failover", "demo timeouts"), ("failover_production", "production default timeouts")):
        goal_id = "failover_rto" if key == "failover" else "failover_rto_production"
        target = GOAL_TARGETS[goal_id]
        failover = (results.get("recovery") or {}).get(key) or {}
        rto = _median_rto_s(failover) if failover.get("status", "ok") not in ("not measured", "failed") else None
        if rto is None:
            why = failover.get("message") or "no failover measurement"
            measured = f"not measured: {why}"
        else:
            measured = f"median {_fmt(rto, 3)} s over {len(failover.get('rto_ms') or []) or '?'} kills"
        goals.append(_goal(goal_id, f"failover ({label}): median RTO < {target:g} s", measured,
                           None if rto is None else round(rto, 3), f"< {target:g} s",
                           None if rto is None else rto < target))
    return goals


# ------------------------------------------------------------------ Markdown


def _size(value_size: int) -> str:
    if value_size >= 1 << 20 and value_size % (1 << 20) == 0:
        return f"{value_size >> 20} MiB"
    if value_size >= 1024 and value_size % 1024 == 0:
        return f"{value_size >> 10} KiB"
    return f"{value_size} B"


def _series_present(runs: Iterable[Mapping[str, Any]]) -> list[str]:
    present = {r["series"] for r in runs}
    ordered = [s for s in SERIES_ORDER if s in present]
    return ordered + sorted(present - set(ordered))


def _groups(results: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(op, value_size) pairs that have runs, in a stable order."""
    order = {op: i for i, op in enumerate(OP_TITLES)}
    pairs = {(r["op"], r["value_size"]) for r in results.get("runs", [])}
    return sorted(pairs, key=lambda p: (order.get(p[0], 99), p[1]))


def goals_table(goals: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| goal | measured | ratio | target | result |", "|---|---|---|---|---|"]
    for goal in goals:
        ratio = goal.get("ratio")
        shown = "–" if ratio is None else (f"{ratio:+.3f} ms" if goal["id"] == "c1_latency" else (
            f"{ratio:.2f} s" if goal["id"].startswith("failover_rto") else f"{ratio:.2f}×"))
        result = {"pass": "**pass**", "miss": "**miss**"}.get(goal["status"], goal["status"])
        lines.append(f"| {goal['goal']} | {goal['measured']} | {shown} | {goal['target']} | {result} |")
    return "\n".join(lines)


def comparison_table(results: Mapping[str, Any], op: str, value_size: int) -> str:
    """Rows: concurrency; per series throughput and p50/p99; then the ratios of the pair against the rest."""
    runs = [r for r in results.get("runs", []) if r["op"] == op and r["value_size"] == value_size]
    series = _series_present(runs)
    unit = "MB/s" if op in BLOCK_OPS else "ops/s"
    others = [s for s in (*BASELINES, SINGLE) if s in series and MAIN in series]
    header = ["c"] + [f"{s} {unit} (p50 / p99 ms)" for s in series] + [f"× {s}" for s in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in sorted({r["concurrency"] for r in runs}):
        cells = [str(c)]
        for s in series:
            run = next((r for r in runs if r["series"] == s and r["concurrency"] == c), None)
            if run is None:
                cells.append("")
            elif run["status"] != "ok":
                cells.append("failed")
            else:
                errors = f" ⚠ {run['errors']} errors" if run.get("errors") else ""
                if run.get("incidents"):
                    errors += f" ⚠ {len(run['incidents'])} role changes"
                cells.append(
                    f"{_fmt(_throughput(run, op))} ({_fmt(_p(run, 'p50'))} / {_fmt(_p(run, 'p99'))}){errors}"
                )
        main = _throughput(find_run(results, MAIN, op, value_size, c), op)
        for s in others:
            ratio = _ratio(main, _throughput(find_run(results, s, op, value_size, c), op))
            cells.append("–" if ratio is None else f"{ratio:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_cell(run: Mapping[str, Any]) -> str:
    per_op = run.get("server_cpu_us_per_op") or {}
    parts = [f"{name} {_fmt(v)}" for name, v in per_op.items() if name != "total" and v is not None]
    total = per_op.get("total")
    return (", ".join(parts) + (f"; total {_fmt(total)}" if total is not None else "")) or "–"


def runs_table(results: Mapping[str, Any]) -> str:
    header = [
        "series", "op", "size", "c", "procs", "ops/s", "MB/s", "p50 ms", "p99 ms", "p99.9 ms",
        "server CPU µs/op", "load generator CPU (share of a core per worker)", "errors", "load avg", "at s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in results.get("runs", []):
        if run["status"] != "ok":
            lines.append(
                f"| {run['series']} | {run['op']} | {_size(run['value_size'])} | {run['concurrency']} | "
                f"| failed: {run.get('message', '')[:200].replace('|', '/')} |" + " |" * (len(header) - 6)
            )
            continue
        shares = ", ".join(f"{s:.2f}" for s in run.get("loadgen_cpu_share", []))
        saturated = " (saturated)" if run.get("loadgen_saturated") else ""
        errors = str(run.get("errors", 0))
        if run.get("error_messages"):
            errors += ": " + "; ".join(run["error_messages"])[:300]
        if run.get("incidents"):
            errors += f"; role changes during the run: {'; '.join(run['incidents'][:4])}"[:400]
        if run.get("readiness", "ready") != "ready":
            errors += f"; before the run: {run['readiness']}"[:300]
        errors = errors.replace("|", "/")
        load = run.get("load_avg")
        lines.append(
            "| " + " | ".join([
                run["series"], run["op"], _size(run["value_size"]), str(run["concurrency"]), str(run["processes"]),
                _fmt(run["ops_per_s"]), _fmt(run["mb_per_s"]), _fmt(_p(run, "p50"), 3), _fmt(_p(run, "p99"), 3),
                _fmt(_p(run, "p999"), 3), _cpu_cell(run), shares + saturated, errors,
                "–" if load is None else f"{load:.2f}", _fmt(run.get("at_s")),
            ]) + " |"
        )
    return "\n".join(lines)


def _systems_table(results: Mapping[str, Any]) -> str:
    lines = ["| system | status | version | notes |", "|---|---|---|---|"]
    for name, info in results.get("systems", {}).items():
        notes = str(info.get("message") or info.get("settings") or "")[:300]
        if info.get("restarts"):
            notes += f" **restarted {len(info['restarts'])}×** (it did not return to its measured state; logs in " \
                     f"{', '.join(str(r.get('logs')) for r in info['restarts'])})"
        notes = notes.replace("\n", " ").replace("|", "/")
        lines.append(f"| {name} | {info.get('status', '?')} | {info.get('version') or '–'} | {notes} |")
    return "\n".join(lines)


def _raw_table(results: Mapping[str, Any]) -> str:
    lines = ["| value size | status | ops/s | MB/s | p50 ms | p99 ms | CPU s |", "|---|---|---|---|---|---|---|"]
    for raw in results.get("raw", []):
        if raw.get("status") != "ok":
            lines.append(f"| {_size(raw['value_size'])} | {raw.get('status')}: {raw.get('message', '')[:200]} |||||")
            continue
        lines.append(
            f"| {_size(raw['value_size'])} | ok | {_fmt(raw.get('ops_per_s'))} | {_fmt(raw.get('mb_per_s'))} | "
            f"{_fmt(raw.get('p50_ms'), 3)} | {_fmt(raw.get('p99_ms'), 3)} | {_fmt(raw.get('cpu_s'))} |"
        )
    return "\n".join(lines)


RECOVERY_KEYS = {
    "failover_production": ("kills", "median_rto_ms", "worst_rto_ms", "acked_writes", "lost_writes",
                            "uncertain_writes", "client_errors", "unplanned_failovers", "replicas_identical",
                            "duration_s"),
    "failover": ("kills", "median_rto_ms", "worst_rto_ms", "acked_writes", "lost_writes", "uncertain_writes",
                 "client_errors", "unplanned_failovers", "replicas_identical", "duration_s"),
    "resync": ("size_bytes", "value_size", "resync_seconds", "mb_per_s", "mb_per_s_from_healthy",
               "keys_resynced", "sync_lost_again", "verified", "duration_s"),
}


def recovery_summary(name: str, data: Mapping[str, Any]) -> str:
    """The numbers that matter of one recovery measurement, on one line."""
    if data.get("status") == "not measured":
        return f"not measured ({data.get('message', '')})"
    keys = RECOVERY_KEYS.get(name) or tuple(
        k for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)
    )
    shown = ", ".join(f"{k} {data[k]}" for k in keys if k in data and data[k] is not None)
    failed = f"**failed**: {data.get('message') or data.get('error')}; " if data.get("status") == "failed" else ""
    warning = f"; warning: {data['warning']}" if data.get("warning") else ""
    return f"{failed}{shown}{warning}"


def _recovery_lines(results: Mapping[str, Any]) -> list[str]:
    lines = [
        f"- {name}: {recovery_summary(name, data)}"
        for name, data in (results.get("recovery") or {}).items()
        if isinstance(data, Mapping)
    ]
    if lines:
        lines.append("- (everything measured is in results.json under `recovery`)")
    return lines or ["- not measured"]


def render_markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    machine = results.get("machine", {})
    settings = results.get("settings", {})
    packages = machine.get("packages", {})
    versions = ", ".join(f"{k} {v}" for k, v in packages.items() if v)
    git = machine.get("git") or {}
    out = [
        f"# Replicator end-to-end benchmark, {str(results.get('started', ''))[:10]}",
        "",
        f"Machine: {machine.get('cpu_count')} CPUs ({machine.get('cpu_model')}), kernel {machine.get('kernel')}, "
        f"Python {machine.get('python')}; {versions}. Commit {str(git.get('commit'))[:12]}"
        f"{' (with local changes)' if git.get('dirty') else ''}. Load average at the start "
        f"{machine.get('load_avg_start')} (the machine may be shared: see each run's load average).",
        "",
        f"Each run: {settings.get('warmup_s')} s warm-up, then {settings.get('seconds')} s measured; "
        "throughput counts operations completed in the measured window, latencies are exact percentiles of every "
        "one of them. Every server on 127.0.0.1, started by the suite; the load generator runs in separate "
        "processes (1 at c=1, else 2), the same for every system. "
        "`replicator` = the pair with clients spread over both sites (every write durable at both sites before it "
        "is acknowledged); `replicator (one site)` = every client at site a; `replicator-single` = the same daemon "
        "alone (site b stopped, a SOLO: replication off); etcd = 3 members; redis = primary + replica, SET + WAIT 1. "
        "Ratios (× …) are `replicator`'s throughput over the other's at the same concurrency. "
        f"Wall time of the suite: {_fmt(results.get('wall_s'))} s.",
        "",
        "## Goals",
        "",
        goals_table(results.get("goals") or evaluate_goals(results)),
        "",
        "## Systems",
        "",
        _systems_table(results),
        "",
    ]
    plot_names = {Path(p).name for p in plots}
    for op, value_size in _groups(results):
        out += [f"## {OP_TITLES.get(op, op)}, {_size(value_size)}", "", comparison_table(results, op, value_size), ""]
        image = plot_filename(op, value_size)
        if image in plot_names:
            out += [f"![{op} {_size(value_size)}](plots/{image})", ""]
    out += ["## Raw RocksDB (synced one-value batches, one thread, no network)", "", _raw_table(results), ""]
    out += ["## Recovery", "", *_recovery_lines(results), ""]
    out += [
        "## Every run",
        "",
        "In the order they ran (`at s`: seconds after the suite started; each system is started once and "
        "serves all its runs, so a system that slows down as it ages shows it here). Server CPU is each "
        "server process's utime + stime over the measured window divided by the operations in it.",
        "",
        runs_table(results),
        "",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------ plots


def plot_filename(op: str, value_size: int) -> str:
    return f"{op}-{value_size}.png"


def write_plots(results: Mapping[str, Any], directory: Path) -> list[Path]:
    """One PNG per (op, value size): throughput and p50/p99 latency against concurrency, a line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for op, value_size in _groups(results):
        runs = [r for r in _ok_runs(results) if r["op"] == op and r["value_size"] == value_size and r.get("ops")]
        if not runs:
            continue
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        unit = "MB/s" if op in BLOCK_OPS else "ops/s"
        for index, series in enumerate(_series_present(runs)):
            mine = sorted((r for r in runs if r["series"] == series), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in mine]
            color = f"C{index}"
            left.plot(xs, [_throughput(r, op) for r in mine], marker="o", color=color, label=series)
            right.plot(xs, [_p(r, "p50") for r in mine], marker="o", color=color, label=f"{series} p50")
            right.plot(xs, [_p(r, "p99") for r in mine], marker="x", linestyle="--", color=color, label=f"{series} p99")
        ticks = sorted({r["concurrency"] for r in runs})
        for axis in (left, right):
            axis.set_xscale("log", base=2)
            axis.set_xticks(ticks, [str(t) for t in ticks])
            axis.xaxis.set_minor_locator(NullLocator())
            axis.set_xlabel("concurrency (requests in flight)")
            axis.grid(True, which="both", alpha=0.3)
        left.set_ylabel(unit)
        left.set_title(f"{OP_TITLES.get(op, op)}, {_size(value_size)}: throughput")
        left.set_ylim(bottom=0)
        right.set_yscale("log")
        right.set_ylabel("latency (ms)")
        right.set_title("p50 (solid) and p99 (dashed)")
        left.legend(fontsize=8)
        right.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        path = directory / plot_filename(op, value_size)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


# ------------------------------------------------------------------ writing everything


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_report(results: dict[str, Any], directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Evaluate the goals and write results.json, report.md and plots/*.png into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    results["goals"] = evaluate_goals(results)
    results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path = out / "results.json"
    json_path.write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    plot_error = None
    try:
        plots = write_plots(results, out / "plots")
    except Exception as error:  # the numbers are written already; say why there is no picture
        plots, plot_error = [], f"{type(error).__name__}: {error}"
    markdown = render_markdown(results, [str(p) for p in plots])
    if plot_error:
        markdown += f"\n(no plots: {plot_error})\n"
    md_path = out / "report.md"
    md_path.write_text(markdown)
    summary_path = out / "summary.md"
    summary_path.write_text(render_summary(results, [str(p) for p in plots], out.name))
    return {"json": json_path, "markdown": md_path, "summary": summary_path, "plots": plots, "plot_error": plot_error}


def render_summary(results: Mapping[str, Any], plots: Sequence[str] = (), directory_name: str = "") -> str:
    """A short block for the README: the goals and the 4 KiB put table, with the plot (paths relative to
    the repository root when the results are in benchmarks/results/<directory_name>/)."""
    base = f"benchmarks/results/{directory_name}" if directory_name else "."
    machine = results.get("machine", {})
    out = [
        f"Latest end-to-end run ({str(results.get('started', ''))[:10]}, {machine.get('cpu_count')} CPUs, "
        f"load average at the start {(machine.get('load_avg_start') or ['?'])[0]}; full report: "
        f"[{base}/report.md]({base}/report.md)):",
        "",
        goals_table(results.get("goals") or evaluate_goals(results)),
        "",
    ]
    if any(r["op"] == "put" and r["value_size"] == 4096 for r in results.get("runs", [])):
        out += ["4 KiB object puts:", "", comparison_table(results, "put", 4096), ""]
    image = plot_filename("put", 4096)
    if image in {Path(p).name for p in plots}:
        out += [f"![4 KiB puts]({base}/plots/{image})", ""]
    return "\n".join(out)
