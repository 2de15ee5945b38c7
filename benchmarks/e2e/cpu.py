"""CPU seconds per process from /proc/<pid>/stat, sampled before and after a run.

    sampler = CpuSampler({"a": pid_a, "b": pid_b})
    before = sampler.sample()
    ... the run ...
    after = sampler.sample()
    used = cpu_delta(before, after)                   # {"a": 1.92, "b": 1.71} CPU seconds
    per_op = cpu_per_op_us(used, ops)                 # {"a": 95.1, "b": 84.7, "total": 179.8} µs per op

utime + stime of the process (every thread: gRPC's, RocksDB's background threads, the event loop)
in clock ticks (`os.sysconf("SC_CLK_TCK")`, 100 per second on Linux, so a 10 ms resolution:
run long enough that this does not matter). A process that is gone is reported as None, never
as zero, so a dead server is visible in the results.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or parentheses itself:
    # the fields after it start after the LAST ')'.
    return raw[raw.rfind(")") + 2 :].split()


def _ticks_seconds(pid: int, first: int, second: int) -> float | None:
    """The sum of two clock-tick fields of /proc/<pid>/stat (1-based field numbers), in seconds."""
    fields = _stat_fields(pid)
    try:
        return (int(fields[first - 3]) + int(fields[second - 3])) / CLOCK_TICKS if fields is not None else None
    except (IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` (all its threads) in seconds, or None if it cannot be read."""
    return _ticks_seconds(pid, 14, 15)


def children_cpu_seconds(pid: int) -> float | None:
    """cutime + cstime: CPU of `pid`'s children that have exited and been waited for (fields 16, 17)."""
    return _ticks_seconds(pid, 16, 17)


class CpuSampler:
    """Samples the CPU seconds of named processes."""

    def __init__(self, processes: Mapping[str, int]) -> None:
        self.processes = dict(processes)

    def sample(self) -> dict[str, float | None]:
        return {name: cpu_seconds(pid) for name, pid in self.processes.items()}


def cpu_delta(before: Mapping[str, float | None], after: Mapping[str, float | None]) -> dict[str, float | None]:
    """CPU seconds each process used between two samples (None if either sample is missing)."""
    used: dict[str, float | None] = {}
    for name, start in before.items():
        end = after.get(name)
        used[name] = None if start is None or end is None else round(max(0.0, end - start), 3)
    return used


def cpu_per_op_us(used: Mapping[str, float | None], ops: int) -> dict[str, float | None]:
    """µs of CPU per operation for each process and their "total" (None where unknown or no ops)."""
    per_op: dict[str, float | None] = {}
    known = [v for v in used.values() if v is not None]
    for name, seconds in used.items():
        per_op[name] = None if seconds is None or ops <= 0 else round(seconds / ops * 1e6, 1)
    per_op["total"] = round(sum(known) / ops * 1e6, 1) if ops > 0 and known else None
    return per_op
