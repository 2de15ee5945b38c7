"""python -m benchmarks.e2e: the end-to-end benchmark suite (see --help)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.e2e import report
from benchmarks.e2e.common import DRIVER_MODULES, SystemUnavailable
from benchmarks.e2e.loadgen import LoadGenError, run_load
from benchmarks.e2e.replicator_system import ReplicatorProductionSystem, ReplicatorSingleSystem, ReplicatorSystem

KIB, MIB, GIB = 1024, 1024 * 1024, 1 << 30
RESULTS_ROOT = Path(__file__).resolve().parents[1] / "results"
SYSTEMS = ("replicator", "replicator-production", "replicator-single", "etcd", "redis", "raw")
OBJECT_SIZES = (1 * KIB, 4 * KIB, 64 * KIB)
BLOCK_SIZES = (4 * KIB, 64 * KIB, 1 * MIB)
CONCURRENCY = (1, 8, 32, 128, 256)
BLOCK_CONCURRENCY = (1, 8, 32)

DESCRIPTION = """\
The end-to-end benchmark: Replicator against etcd, Redis and raw RocksDB, on loopback.

Everything runs on this machine on 127.0.0.1 and is started (and stopped) by the suite:
  replicator         a witness and two site daemons (LocalCluster): every write durable at both
                     sites before it is acknowledged; clients spread over both sites (active-active),
                     and for puts also all at one site ("replicator (one site)")
  replicator-production  the same pair with the shipped default timeouts (4 KiB puts only)
  replicator-single  the same daemon with replication off: site b stopped, a alone (SOLO)
  etcd               a 3-member etcd cluster (Put, linearizable Get)
  redis              a Redis primary and a replica, appendfsync always, SET + WAIT 1
  raw                synced one-value RocksDB WriteBatches in one thread (the disk's limit, no network)

Object puts and gets of 1 KiB, 4 KiB and 64 KiB at concurrency 1, 8, 32, 128 and 256; block writes and
reads of 4 KiB, 64 KiB and 1 MiB at concurrency 1, 8 and 32 (Replicator only); failover time and
resync throughput (benchmarks/e2e/recovery.py). The load generator is the same for every system:
worker processes (1 at c=1, else 2) with asyncio coroutines; its CPU use and each server process's
CPU per operation are reported.

Output: benchmarks/results/<YYYY-MM-DD>/results.json (everything), report.md (tables with ratios,
the goals), summary.md (the goals and the 4 KiB put table, for the README), plots/*.png (throughput
and p50/p99 latency against concurrency, a line per system).
etcd and redis are installed from Debian packages when missing; a baseline that cannot be
installed or started is reported as "not available" and the rest goes on.

Exit status: 0 when every run completed without errors; 1 if a run had errors or failed, or a
system named in --only could not be started; 2 for bad arguments.
The default run takes about 15-25 minutes on 2 cores; --quick about 2 minutes."""


@dataclass(frozen=True)
class Run:
    system: str
    placement: str
    op: str
    value_size: int
    concurrency: int


def matrix(systems: Sequence[str], quick: bool) -> list[Run]:
    """Every run, grouped by system (each system is started once)."""
    runs: list[Run] = []
    for system in systems:
        if system == "raw":
            continue
        if system == "replicator-production":  # the production timeouts under the heaviest put load
            runs += [Run(system, "both", "put", 4 * KIB, c) for c in ((1, 32) if quick else CONCURRENCY)]
            continue
        if quick:
            sizes, concurrency = (4 * KIB,), (1, 32)
            block = [("block_write", MIB, 8)] if system.startswith("replicator") else []
            gets = [("get", 4 * KIB, 32)]
        else:
            sizes, concurrency = OBJECT_SIZES, CONCURRENCY
            block = []
            if system.startswith("replicator"):
                ops = ("block_write", "block_read") if system == "replicator" else ("block_write",)
                block = [(op, size, c) for op in ops for size in BLOCK_SIZES for c in BLOCK_CONCURRENCY]
            gets = [("get", size, c) for size in sizes for c in concurrency]
        for size in sizes:
            runs += [Run(system, "both", "put", size, c) for c in concurrency]
            runs += [Run(system, "both", op, s, c) for op, s, c in gets if s == size]
        if system == "replicator":
            runs += [Run(system, "one", "put", size, c) for size in sizes for c in concurrency]
        runs += [Run(system, "both", op, size, c) for op, size, c in block]
    return runs


def make_system(name: str, directory: Path) -> Any:
    if name == "replicator":
        return ReplicatorSystem(directory)
    if name == "replicator-single":
        return ReplicatorSingleSystem(directory)
    if name == "replicator-production":
        return ReplicatorProductionSystem(directory)
    module = importlib.import_module(DRIVER_MODULES[name])  # benchmarks.e2e.baselines
    factory = {"etcd": "EtcdCluster", "redis": "RedisPair"}[name]
    return getattr(module, factory)(directory)


def _size(value_size: int) -> str:
    return report._size(value_size)


def _progress_line(index: int, total: int, run: Run, result: Any) -> str:
    series = report.series_name(run.system, run.placement)
    head = f"[{index:>3}/{total}] {series:<22} {run.op:<11} {_size(run.value_size):>7} c={run.concurrency:<4}"
    if result is None:
        return head
    cpu = result.server_cpu_us_per_op.get("total")
    cpu_text = f"  server CPU {cpu:,.0f} µs/op" if cpu is not None else ""
    errors = f"  ERRORS {result.errors}: {result.error_messages[0]}" if result.errors else ""
    return (
        f"{head} {result.ops_per_s:>9,.0f} ops/s {result.mb_per_s:>8.1f} MB/s  p50 {result.p50_ms or 0:>8.3f} ms"
        f"  p99 {result.p99_ms or 0:>8.3f} ms{cpu_text}{errors}"
    )


class Suite:
    def __init__(self, args: argparse.Namespace, systems: list[str], explicit: bool, work: Path, out: Path) -> None:
        self.args = args
        self.systems = systems
        self.explicit = explicit
        self.work = work
        self.out = out
        self.failed = False
        self.started = time.monotonic()
        settings = {
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "quick": args.quick,
            "keys": args.keys,
            "systems": systems,
            "processes": "1 at concurrency 1, else 2" if args.processes is None else args.processes,
            "recovery": not args.no_recovery,
        }
        self.results = report.new_results([sys.executable, "-m", "benchmarks.e2e", *sys.argv[1:]], settings)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def run(self) -> int:
        started = self.started = time.monotonic()
        runs = matrix(self.systems, self.args.quick)
        total = len(runs) + (len(self._raw_sizes()) if "raw" in self.systems else 0)
        self.say(
            f"benchmarks.e2e: {len(runs)} load runs over {', '.join(self.systems)}; "
            f"{self.args.warmup:g} s warm-up + {self.args.seconds:g} s each; results in {self.out}"
        )
        index = 0
        for system_name in [s for s in self.systems if s != "raw"]:
            mine = [r for r in runs if r.system == system_name]
            index = self._system_runs(system_name, mine, index, total)
        if "raw" in self.systems:
            self._raw(index, total)
        if not self.args.no_recovery and "replicator" in self.systems:
            self._recovery()
        self.results["finished"] = report._now()
        self.results["wall_s"] = round(time.monotonic() - started, 1)
        written = report.write_report(self.results, self.out)
        self.say("")
        self.say(report.goals_table(self.results["goals"]))
        self.say("")
        self.say(f"wrote {written['json']}, {written['markdown']}, {written['summary']} and {len(written['plots'])} plots "
                 f"in {self.results['wall_s']:.0f} s")
        if written["plot_error"]:
            self.say(f"no plots: {written['plot_error']}")
        bad_runs = [r for r in self.results["runs"] if r["status"] != "ok" or r.get("errors")]
        if bad_runs:
            self.say(f"{len(bad_runs)} run(s) failed or had errors: see report.md")
            self.failed = True
        return 1 if self.failed else 0

    def _start_system(self, name: str, directory: Path, info: dict[str, Any]) -> Any:
        """Start a fresh `name` in `directory`; SystemUnavailable (and others) propagate, nothing left running."""
        if directory.exists():
            shutil.rmtree(directory)
        system = make_system(name, directory)
        self.say(f"starting {name} ...")
        began = time.monotonic()
        try:
            system.start()
        except BaseException:
            with contextlib.suppress(Exception):
                system.stop()
            raise
        info.update(status="ok", start_s=round(time.monotonic() - began, 2), processes=system.processes())
        with contextlib.suppress(Exception):
            info["version"] = system.version()
        if hasattr(system, "settings"):
            with contextlib.suppress(Exception):
                info["settings"] = system.settings()
        return system

    def _keep_logs(self, name: str, directory: Path, generation: int) -> str | None:
        """Copy the system's *.log files into OUT/logs/<name>-<generation>/ (for a run that went wrong)."""
        logs = sorted(directory.glob("*.log")) if directory.is_dir() else []
        if not logs:
            return None
        target = self.out / "logs" / f"{name}-{generation}"
        target.mkdir(parents=True, exist_ok=True)
        for log in logs:
            with contextlib.suppress(OSError):
                shutil.copy2(log, target / log.name)
        return str(target)

    def _system_runs(self, name: str, runs: list[Run], index: int, total: int) -> int:
        info: dict[str, Any] = {"status": "failed", "message": "", "version": None, "restarts": []}
        self.results["systems"][name] = info
        generation = 1
        directory = self.work / name
        try:
            system = self._start_system(name, directory, info)
        except (SystemUnavailable, ImportError, KeyError) as error:
            info.update(status="not available", message=f"{type(error).__name__}: {error}")
            self.say(f"{name}: not available: {error}")
            if self.explicit:
                self.failed = True
            return index + len(runs)
        except Exception as error:
            info.update(status="failed", message=f"{type(error).__name__}: {error}")
            self.say(f"{name}: failed to start: {error}")
            self.failed = True
            return index + len(runs)
        prefilled: set[tuple[str, int]] = set()
        broken = ""  # set when a restart failed: the remaining runs are recorded as failed at once
        troubled = False  # a run of this system had errors or incidents: keep its logs
        try:
            for run in runs:
                index += 1
                if broken:
                    self._failed_run(run, index, total, broken)
                    continue
                try:
                    readiness = system.wait_ready() if hasattr(system, "wait_ready") else "ready"
                except SystemUnavailable as error:
                    # The system did not come back to its measured state: keep its logs, start it
                    # afresh (a new directory) and go on; every restart is recorded.
                    kept = self._keep_logs(name, directory, generation)
                    self.say(f"{name}: {error}; restarting it (logs kept in {kept})")
                    with contextlib.suppress(Exception):
                        system.stop()
                    generation += 1
                    directory = self.work / f"{name}-{generation}"
                    info["restarts"].append({"before_run": index, "at_s": round(time.monotonic() - self.started, 1),
                                             "reason": str(error), "logs": kept})
                    self.failed = True
                    prefilled = set()
                    try:
                        system = self._start_system(name, directory, info)
                        readiness = f"restarted (fresh {name}): {error}"
                    except Exception as restart_error:
                        broken = f"{name} could not be restarted: {type(restart_error).__name__}: {restart_error}"
                        info.update(status="failed", message=broken)
                        self._failed_run(run, index, total, broken)
                        continue
                troubled |= self._one(system, run, index, total, prefilled, readiness)
        finally:
            self.say(f"stopping {name}")
            with contextlib.suppress(Exception):
                system.stop()
            if troubled and not broken:
                kept = self._keep_logs(name, directory, generation)
                if kept:
                    info["logs"] = kept
            if not self.args.keep:
                for path in self.work.glob(f"{name}*"):
                    if path.name == name or path.name.startswith(f"{name}-") and path.name[len(name) + 1:].isdigit():
                        shutil.rmtree(path, ignore_errors=True)
        return index

    def _failed_run(self, run: Run, index: int, total: int, message: str) -> None:
        self.results["runs"].append(report.run_record(
            run.system, run.placement, None, message=message, op=run.op, value_size=run.value_size,
            concurrency=run.concurrency, load_avg=round(os.getloadavg()[0], 2),
            at_s=round(time.monotonic() - self.started, 1),
        ))
        self.say(f"{_progress_line(index, total, run, None)} FAILED: {message.splitlines()[0]}")
        self.failed = True

    def _one(
        self, system: Any, run: Run, index: int, total: int, prefilled: set[tuple[str, int]], readiness: str
    ) -> bool:
        """One run; True if it had errors, incidents or failed."""
        key = (run.op, run.value_size)
        if readiness != "ready":
            self.say(f"{system.name}: {readiness}")
        try:
            pids = system.processes()
            load_avg = round(os.getloadavg()[0], 2)
            at_s = round(time.monotonic() - self.started, 1)
            spec = system.driver_spec(run.placement)
            mark = system.mark() if hasattr(system, "mark") else None
            result = run_load(
                spec,
                run.op,
                run.value_size,
                run.concurrency,
                seconds=self.args.seconds,
                warmup_s=self.args.warmup,
                processes=self.args.processes,
                keys=self.args.keys,
                prefill=key not in prefilled,
                server_pids=pids,
            )
        except (LoadGenError, SystemUnavailable, OSError, ValueError, RuntimeError) as error:
            self._failed_run(run, index, total, f"{type(error).__name__}: {error}")
            return True
        if run.op in ("get", "block_read"):
            prefilled.add(key)
        incidents: list[str] = []
        if mark is not None:
            with contextlib.suppress(Exception):
                incidents = system.incidents_since(mark)
        gone = [name for name, pid in pids.items() if result.server_cpu_s.get(name) is None]
        record = report.run_record(run.system, run.placement, result.to_dict(), load_avg=load_avg,
                                   readiness=readiness, at_s=at_s, incidents=incidents)
        notes = [] if readiness == "ready" else [readiness]
        if incidents:
            notes.append(f"{len(incidents)} incident(s): {'; '.join(incidents[:3])}")
        if gone:
            notes.append(f"server process(es) gone during the run: {', '.join(gone)}")
            self.failed = True
        record["message"] = "; ".join(notes)
        self.results["runs"].append(record)
        self.say(_progress_line(index, total, run, result) + (f"  ({'; '.join(notes)})" if notes else ""))
        return bool(result.errors or incidents or gone)

    def _raw_sizes(self) -> tuple[int, ...]:
        return (MIB,) if self.args.quick else BLOCK_SIZES

    def _raw(self, index: int, total: int) -> None:
        seconds = self.args.seconds
        for value_size in self._raw_sizes():
            index += 1
            directory = self.work / f"raw-{value_size}"
            shutil.rmtree(directory, ignore_errors=True)
            command = [
                sys.executable, "-m", "benchmarks.e2e.baselines", "raw",
                "--value-size", str(value_size), "--seconds", str(seconds), "--dir", str(directory),
            ]
            record: dict[str, Any] = {"value_size": value_size, "threads": 1}
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120,
                                      cwd=Path(__file__).resolve().parents[2])
                parsed = _last_json(done.stdout)
                if done.returncode != 0 or parsed is None:
                    raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
                record.update(parsed, status="ok")
                self.say(f"[{index:>3}/{total}] raw rocksdict {_size(value_size):>22} {parsed['ops_per_s']:>9,.0f} "
                         f"ops/s {parsed['mb_per_s']:>8.1f} MB/s  p50 {parsed['p50_ms']:>8.3f} ms  "
                         f"p99 {parsed['p99_ms']:>8.3f} ms")
            except (OSError, subprocess.SubprocessError, RuntimeError, KeyError, TypeError) as error:
                record.update(status="failed", message=f"{type(error).__name__}: {error}")
                self.say(f"raw rocksdict {_size(value_size)}: FAILED: {error}")
                if self.explicit:
                    self.failed = True
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            self.results["raw"].append(record)
        self.results["systems"]["raw"] = {
            "status": "ok" if any(r.get("status") == "ok" for r in self.results["raw"]) else "failed",
            "version": (self.results["machine"]["packages"] or {}).get("rocksdict"),
            "message": "rocksdict, WriteOptions(sync=True), one value per WriteBatch, one thread",
        }

    def _recovery(self) -> None:
        recovery = self.results["recovery"]
        if importlib.util.find_spec("benchmarks.e2e.recovery") is None:
            for name in ("failover", "resync"):
                recovery[name] = {"status": "not measured", "message": "benchmarks/e2e/recovery.py is not there"}
            self.say("recovery: not measured (benchmarks/e2e/recovery.py is not there)")
            return
        module = importlib.import_module("benchmarks.e2e.recovery")
        kills = 2 if self.args.quick else 5
        # The measure: 1 GiB changed while a site was away, in 1 MiB values (8 MiB of 32 KiB with --quick).
        resync_bytes = 8 * MIB if self.args.quick else GIB
        resync_value = 32 * KIB if self.args.quick else MIB
        measurements: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
            ("failover", lambda d: module.measure_failover(d, kills=kills, progress=self._recovery_progress)),
            # The same kills with the shipped default timeouts (longer peer timeout, witness grace, leases).
            ("failover_production", lambda d: module.measure_failover(
                d, kills=kills, progress=self._recovery_progress, timeouts="production")),
            ("resync", lambda d: module.measure_resync(d, resync_bytes, resync_value, progress=self._recovery_progress)),
        ]
        for name, measure in measurements:
            directory = self.work / f"recovery-{name}"
            shutil.rmtree(directory, ignore_errors=True)
            self.say(f"recovery: measuring {name} ...")
            began = time.monotonic()
            try:
                data = measure(directory)
                recovery[name] = data if isinstance(data, dict) else {"value": data}
                recovery[name].setdefault("duration_s", round(time.monotonic() - began, 1))
                if recovery[name].get("error"):
                    recovery[name]["status"] = "failed"
                    recovery[name]["message"] = str(recovery[name]["error"])
                    self.say(f"recovery: {name}: FAILED: {recovery[name]['error']}")
                    self.failed = True
                else:
                    self.say(f"recovery: {name}: {report.recovery_summary(name, recovery[name])}")
            except Exception as error:
                recovery[name] = {"status": "failed", "message": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc()[-2000:]}
                self.say(f"recovery: {name}: FAILED: {error}")
                self.failed = True
            finally:
                if not self.args.keep:
                    shutil.rmtree(directory, ignore_errors=True)

    def _recovery_progress(self, text: str) -> None:
        if self.args.verbose:
            self.say(f"    {text}")


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict):
                return parsed
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="a small subset (4 KiB puts at c=1 and 32, gets at c=32, 1 MiB block writes at c=8, "
                             "2 failovers, a small resync) with short runs: about 2 minutes")
    parser.add_argument("--only", default="",
                        help=f"comma-separated systems to run (default all): {','.join(SYSTEMS)}; a system named "
                             f"here that cannot be started makes the exit status 1")
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured seconds per run (default 5, --quick 2)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per run (default 1, --quick 0.5)")
    parser.add_argument("--keys", type=int, default=10_000, help="key space (and block slots) per run (default 10000)")
    parser.add_argument("--processes", type=int, default=None,
                        help="load generator worker processes (default 1 at concurrency 1, else 2)")
    parser.add_argument("--out", default=None,
                        help="output directory (default benchmarks/results/<YYYY-MM-DD>)")
    parser.add_argument("--work-dir", default=None,
                        help="where the systems keep their data (default a new temporary directory, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the systems' data and logs in the work directory")
    parser.add_argument("--no-recovery", action="store_true", help="skip the failover and resync measurements")
    parser.add_argument("--verbose", action="store_true", help="show the recovery measurements' progress")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.seconds <= 0 or args.warmup < 0 or args.keys < 1 or (args.processes is not None and args.processes < 1):
        parser.error("--seconds and --keys must be positive, --warmup at least 0, --processes at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    explicit = bool(args.only.strip())
    systems = [s.strip() for s in args.only.split(",") if s.strip()] if explicit else list(SYSTEMS)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"python -m benchmarks.e2e: unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RESULTS_ROOT / _dt.date.today().isoformat()
    own_work = args.work_dir is None
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="replicator-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    suite = Suite(args, systems, explicit, work, out)
    try:
        return suite.run()
    except KeyboardInterrupt:
        print("interrupted; every system started was stopped", file=sys.stderr)
        return 130
    finally:
        if own_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"data and logs kept in {work}")


if __name__ == "__main__":
    sys.exit(main())
