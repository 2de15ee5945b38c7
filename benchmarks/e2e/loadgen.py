"""The load generator: the same for every system, several worker processes, each an asyncio loop.

    result = run_load(spec, "put", value_size=4096, concurrency=32, seconds=5, warmup_s=1,
                      processes=None, keys=10_000, server_pids=system.processes())

How a run goes:

1. `processes` worker processes are started as fresh interpreters (`python -c`, the "spawn" way:
   nothing inherited from the parent's threads or gRPC state, and the caller's __main__ is not
   imported again); the parent and each worker exchange pickled messages over two pipes. Worker w runs its share of the
   `concurrency` coroutines (split as evenly as possible) on one event loop (uvloop when it is
   installed) over ONE `Driver` (`common.open_driver(spec, w)`), so a system sees `concurrency`
   requests in flight at all times.
2. Set-up, not measured: each worker opens its driver and, for "get" and "block_read", writes its
   part of the keys (or block slots) that the run will read ("prefill"; skipped with prefill=False
   when an earlier run of the same size already wrote them).
3. The parent waits until every worker is ready and gives all of them the same start time on
   CLOCK_MONOTONIC (shared by every process on the machine). Every coroutine loops: pick a random
   key (uniform over the key space), time the call with `time.monotonic_ns()`, record it.
   The first `warmup_s` seconds are the warm-up: only operations that COMPLETE inside the
   measured window [start + warmup_s, start + warmup_s + seconds] count, for throughput and
   latency. After the window the coroutines stop issuing and the calls in flight finish.
4. Every latency of the window is kept (int nanoseconds in an array, 8 bytes each: a few MB for
   the longest runs), so percentiles are exact (nearest rank, see `percentile`).
5. Errors are counted over the whole run (prefill, warm-up and drain too) and the first distinct
   messages kept with their counts (prefill writes are retried, but each failure is counted); an error is never a latency sample. A get that returns nothing for a
   key written in the prefill, or a short read, is an error too.
6. CPU: each worker samples its own `time.process_time()` (all its threads) at the window's edges,
   and the parent samples every server process's /proc/<pid>/stat at the same edges
   (`cpu.CpuSampler`), so CPU per server process per operation can be reported. A worker near 100 %
   of one core means the load generator may be the bottleneck: `loadgen_saturated` says so.

Key names: objects use bucket "bench" and keys f"v{value_size}-{index:08d}", so runs with
different sizes never read each other's values. Block ops use the volume the system names in
`spec.options["volume"]` (with "block_size", "volume_size_bytes"), at slots of `value_size`
bytes: slot i starts at LBA i * value_size // block_size.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import math
import os
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.e2e.common import DriverSpec, open_driver
from benchmarks.e2e.cpu import CpuSampler, cpu_delta, cpu_per_op_us

OPS = ("put", "get", "block_write", "block_read")
BLOCK_OPS = ("block_write", "block_read")
READ_OPS = ("get", "block_read")
PREFILL_BYTES_MAX = 16 * 1024 * 1024  # reads spread over at most this much prefilled data ...
PREFILL_KEYS_MAX = 1024  # ... and at most this many keys or slots
PREFILL_KEYS_MIN = 16
PREFILL_CONCURRENCY = 16  # per worker
PREFILL_ATTEMPTS = 20  # set-up writes are retried (every failure is still counted and reported)
ERROR_MESSAGES_MAX = 5  # distinct messages kept per run
START_DELAY_S = 0.2  # between "go" and the common start time
DRAIN_TIMEOUT_S = 30.0  # calls still in flight after the window get this long, then count as errors
READY_TIMEOUT_S = 600.0  # set-up (driver, prefill) of every worker
SATURATED_CPU_SHARE = 0.9  # a worker using this share of a core may be the bottleneck
CLIENT_TASK_PREFIX = "bench-client-"  # the measuring coroutines' task names: "bench-client-<n>" in each worker


class LoadGenError(Exception):
    """The run could not be done at all (a worker failed to start or to set up); the message says why."""


def default_processes(concurrency: int) -> int:
    """Worker processes for a run: 1 at concurrency 1, else 2 (this is a 2-core machine), at most one a core."""
    if concurrency <= 1:
        return 1
    return max(1, min(2, os.cpu_count() or 1, concurrency))


def percentile(sorted_samples: Sequence[int] | Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ascending samples: the smallest sample with at least p % at or below it."""
    if not sorted_samples:
        return math.nan
    if not 0 <= p <= 100:
        raise ValueError(f"percentile: p must be in [0, 100], got {p}")
    # round() first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, and its rank is 999
    rank = max(1, math.ceil(round(p * len(sorted_samples) / 100, 9)))
    return float(sorted_samples[rank - 1])


def latency_summary_ms(samples_ns: Sequence[int]) -> dict[str, float | None]:
    """min, mean, p50, p90, p99, p99.9, max in milliseconds (rounded to 1 µs) of unsorted ns samples."""
    if not samples_ns:
        return dict.fromkeys(("min", "mean", "p50", "p90", "p99", "p999", "max"))
    ordered = sorted(samples_ns)

    def ms(ns: float) -> float:
        return round(ns / 1e6, 3)

    return {
        "min": ms(ordered[0]),
        "mean": ms(sum(ordered) / len(ordered)),
        "p50": ms(percentile(ordered, 50)),
        "p90": ms(percentile(ordered, 90)),
        "p99": ms(percentile(ordered, 99)),
        "p999": ms(percentile(ordered, 99.9)),
        "max": ms(ordered[-1]),
    }


def prefill_count(op: str, value_size: int, keys: int, slots: int | None = None) -> int:
    """How many keys (or block slots) a read run reads from, all written by the prefill."""
    count = min(keys, PREFILL_KEYS_MAX, max(PREFILL_KEYS_MIN, PREFILL_BYTES_MAX // max(1, value_size)))
    return min(count, slots) if slots is not None else count


def object_key(value_size: int, index: int) -> str:
    return f"v{value_size}-{index:08d}"


@dataclass
class LoadResult:
    op: str
    value_size: int
    concurrency: int
    processes: int
    seconds: float  # the measured window
    warmup_s: float
    ops: int  # completed inside the window
    ops_per_s: float
    mb_per_s: float  # 10**6 bytes of values per second
    latency_ms: dict[str, float | None]  # min, mean, p50, p90, p99, p999, max
    errors: int  # the whole run: warm-up, window, drain
    error_messages: list[str] = field(default_factory=list)  # "N x message", first distinct ones
    loadgen_cpu_s: list[float] = field(default_factory=list)  # per worker, inside the window
    loadgen_cpu_share: list[float] = field(default_factory=list)  # per worker, CPU seconds / window seconds
    loadgen_saturated: bool = False
    server_cpu_s: dict[str, float | None] = field(default_factory=dict)  # per server process, inside the window
    server_cpu_us_per_op: dict[str, float | None] = field(default_factory=dict)  # ... and "total"
    keys: int = 0  # key space (or block slots) used
    prefilled: int = 0  # keys or slots written before the run (read ops)
    setup_s: float = 0.0  # start of the workers to ready (driver, prefill)
    event_loop: str = ""  # "uvloop" or "asyncio"

    @property
    def p50_ms(self) -> float | None:
        return self.latency_ms.get("p50")

    @property
    def p99_ms(self) -> float | None:
        return self.latency_ms.get("p99")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ the worker process


@dataclass(frozen=True)
class _WorkerPlan:
    spec: DriverSpec
    op: str
    value_size: int
    worker: int
    workers: int
    coroutines: int
    keys: int  # key space for writes
    read_keys: int  # key space for reads (all prefilled)
    prefill: bool
    seed: int


class _Errors:
    def __init__(self) -> None:
        self.count = 0
        self.messages: dict[str, int] = {}

    def add(self, message: str) -> None:
        self.count += 1
        message = message.strip().replace("\n", " ")[:300] or "(no message)"
        if message in self.messages or len(self.messages) < ERROR_MESSAGES_MAX:
            self.messages[message] = self.messages.get(message, 0) + 1


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _Ops:
    """The driver calls of one run, by op name; `call(index)` does one operation on key/slot `index`."""

    def __init__(self, plan: _WorkerPlan, driver: Any, value: bytes) -> None:
        self.plan = plan
        self.driver = driver
        self.value = value
        options = plan.spec.options
        self.volume = str(options.get("volume", "bench"))
        self.block_size = int(options.get("block_size", 4096))
        self.blocks_per_slot = max(1, plan.value_size // self.block_size)
        self.bucket_keys = [object_key(plan.value_size, i) for i in range(max(plan.keys, plan.read_keys))]

    async def write(self, index: int) -> None:
        if self.plan.op in BLOCK_OPS:
            await self.driver.write_block(self.volume, index * self.blocks_per_slot, self.value)
        else:
            await self.driver.put(self.bucket_keys[index], self.value)

    async def read(self, index: int) -> str | None:
        """None if fine, else what was wrong with the answer."""
        size = self.plan.value_size
        if self.plan.op in BLOCK_OPS:
            data = await self.driver.read_block(self.volume, index * self.blocks_per_slot, self.blocks_per_slot)
        else:
            data = await self.driver.get(self.bucket_keys[index])
            if data is None:
                return f"get {self.bucket_keys[index]}: not found (written by the prefill)"
        if len(data) != size:
            return f"read of {size} bytes at {index} returned {len(data)} bytes"
        return None


async def _prefill(plan: _WorkerPlan, ops: _Ops, errors: _Errors) -> int:
    """Write this worker's share of the keys (slots) the run reads. A failed write is retried after a
    pause (the set-up is not measured), counted in `errors`, and fails the run after PREFILL_ATTEMPTS."""
    mine = list(range(plan.worker, plan.read_keys, plan.workers))
    queue = iter(mine)

    async def writer() -> None:
        for index in queue:
            for attempt in range(1, PREFILL_ATTEMPTS + 1):
                try:
                    await ops.write(index)
                    break
                except Exception as error:
                    errors.add(f"prefill: {_describe(error)}")
                    if attempt == PREFILL_ATTEMPTS:
                        raise
                    await asyncio.sleep(0.25)

    await asyncio.gather(*(writer() for _ in range(min(PREFILL_CONCURRENCY, max(1, len(mine))))))
    return len(mine)


async def _worker_async(plan: _WorkerPlan, connection: Any) -> None:
    setup_started = time.monotonic()
    driver = await open_driver(plan.spec, plan.worker)
    try:
        if plan.op in BLOCK_OPS and not hasattr(driver, "write_block"):
            raise LoadGenError(f"the {plan.spec.kind} driver does not do block volumes")
        value = os.urandom(plan.value_size)
        ops = _Ops(plan, driver, value)
        prefilled = 0
        setup_errors = _Errors()
        if plan.prefill and plan.op in READ_OPS:
            prefilled = await _prefill(plan, ops, setup_errors)
        connection.send(("ready", {"setup_s": time.monotonic() - setup_started, "prefilled": prefilled}))
        # Waiting for "go" blocks this loop, which has nothing else to do meanwhile (gRPC keeps its
        # channels alive in its own threads).
        message = await asyncio.get_running_loop().run_in_executor(None, connection.recv)
        if message[0] != "go":
            return
        _, start_ns, warmup_ns, window_ns = message
        result = await _measure(
            plan, ops, start_ns, start_ns + warmup_ns, start_ns + warmup_ns + window_ns, setup_errors
        )
        result["prefilled"] = prefilled
        connection.send(("done", result))
    finally:
        await driver.close()


async def _measure(
    plan: _WorkerPlan, ops: _Ops, start_ns: int, window_start_ns: int, end_ns: int, errors: _Errors
) -> dict[str, Any]:
    samples = array.array("q")
    cpu_edges: dict[str, float] = {}
    reading = plan.op in READ_OPS
    space = plan.read_keys if reading else plan.keys

    async def sleep_until(deadline_ns: int) -> None:
        delay = (deadline_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)

    async def clock() -> None:
        await sleep_until(window_start_ns)
        cpu_edges["start"] = time.process_time()
        await sleep_until(end_ns)
        cpu_edges["end"] = time.process_time()

    async def client(number: int) -> None:
        chooser = random.Random(plan.seed * 1_000_003 + plan.worker * 1009 + number)
        pick = chooser.randrange
        append = samples.append
        now = time.monotonic_ns
        await sleep_until(start_ns)
        while True:
            began = now()
            if began >= end_ns:
                return
            index = pick(space)
            try:
                if reading:
                    problem = await ops.read(index)
                else:
                    await ops.write(index)
                    problem = None
            except Exception as error:  # every failure is counted and reported, never hidden
                errors.add(_describe(error))
                await asyncio.sleep(0.001)  # a system that is down must not turn this into a busy loop
                continue
            finished = now()
            if problem is not None:
                errors.add(problem)
            elif window_start_ns <= finished <= end_ns:
                append(finished - began)

    clock_task = asyncio.ensure_future(clock())
    tasks = [asyncio.create_task(client(n), name=f"{CLIENT_TASK_PREFIX}{n}") for n in range(plan.coroutines)]
    await clock_task
    done, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
    for task in pending:
        task.cancel()
        errors.add(f"an operation still ran {DRAIN_TIMEOUT_S:.0f} s after the end of the window (cancelled)")
    for task in done:
        if task.exception() is not None:
            errors.add(_describe(task.exception()))  # type: ignore[arg-type]
    if pending:
        await asyncio.wait(pending, timeout=5)
    return {
        "samples": samples.tobytes(),
        "errors": errors.count,
        "messages": errors.messages,
        "cpu_s": cpu_edges.get("end", time.process_time()) - cpu_edges.get("start", 0.0),
    }


def _worker_main(plan: _WorkerPlan, connection: Any) -> None:
    """The body of a worker process: run the plan, report to `connection`."""
    try:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
            loop_name = "uvloop"
        except ImportError:
            runner = asyncio.Runner()
            loop_name = "asyncio"
        connection.send(("loop", loop_name))
        with runner:
            runner.run(_worker_async(plan, connection))
    except BaseException as error:  # report it to the parent, whatever it is
        try:
            connection.send(("error", f"worker {plan.worker}: {_describe(error)}\n{traceback.format_exc()}"))
        except (OSError, ValueError):
            pass
    finally:
        connection.close()


# ------------------------------------------------------------------ the parent


class _Worker:
    """A worker as a subprocess of this interpreter ("spawn" semantics: a fresh interpreter, nothing
    inherited; unlike multiprocessing's spawn it does not re-import the caller's __main__). Messages
    go both ways as pickles over two pipes (multiprocessing.connection.Connection on the fds)."""

    def __init__(self, plan: _WorkerPlan) -> None:
        self.plan = plan
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        root = str(Path(__file__).resolve().parents[2])
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [environment.get("PYTHONPATH")])])
        code = f"from benchmarks.e2e.loadgen import _child_main; _child_main({to_child_r}, {from_child_w})"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                env=environment,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.sender = Connection(to_child_w, readable=False)
        self.connection = Connection(from_child_r, writable=False)
        self.sender.send(plan)
        self.loop = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: tuple[Any, ...]) -> None:
        self.sender.send(message)

    def receive(self, deadline: float, wanted: str) -> Any:
        """The payload of the next `wanted` message; raises LoadGenError on an error, an exit or the deadline."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoadGenError(f"worker {self.plan.worker}: no {wanted!r} within the time limit")
            if self.connection.poll(min(remaining, 0.5)):
                try:
                    kind, *payload = self.connection.recv()
                except EOFError:
                    raise LoadGenError(
                        f"worker {self.plan.worker} (pid {self.pid}) exited with code "
                        f"{self.process.wait()} without a report"
                    ) from None
                if kind == "error":
                    raise LoadGenError(payload[0])
                if kind == "loop":
                    self.loop = payload[0]
                    continue
                if kind == wanted:
                    return payload[0] if len(payload) == 1 else payload
                raise LoadGenError(f"worker {self.plan.worker}: unexpected message {kind!r}")
            if self.process.poll() is not None and not self.connection.poll(0):
                raise LoadGenError(
                    f"worker {self.plan.worker} (pid {self.pid}) exited with code "
                    f"{self.process.returncode} before {wanted!r}"
                )

    def stop(self) -> None:
        """Tell the worker to stop, make sure it is gone (our own child, by its Popen: terminate, then kill)."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.sender.send(("stop",))
        for action in (None, self.process.terminate, self.process.kill):
            if action is not None and self.process.poll() is None:
                action()
            try:
                self.process.wait(timeout=10 if action is None else 5)
                break
            except subprocess.TimeoutExpired:
                continue
        self.sender.close()
        self.connection.close()


def _child_main(read_fd: int, write_fd: int) -> None:
    """Entry point of a worker subprocess: the plan arrives first on `read_fd`."""
    receiver = Connection(read_fd, writable=False)
    sender = Connection(write_fd, readable=False)
    try:
        plan = receiver.recv()
    except EOFError:
        return
    _worker_main(plan, _Duplex(receiver, sender))


class _Duplex:
    """recv from one pipe, send on the other."""

    def __init__(self, receiver: Connection, sender: Connection) -> None:
        self.receiver = receiver
        self.sender = sender

    def recv(self) -> Any:
        return self.receiver.recv()

    def send(self, message: Any) -> None:
        self.sender.send(message)

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_load(
    spec: DriverSpec,
    op: str,
    value_size: int,
    concurrency: int,
    seconds: float,
    warmup_s: float = 1.0,
    processes: int | None = None,
    keys: int = 10_000,
    *,
    prefill: bool = True,
    server_pids: Mapping[str, int] | None = None,
    seed: int = 1,
) -> LoadResult:
    """Drive `spec` with `op` at `concurrency` for `seconds` after `warmup_s`; see the module docstring."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if concurrency < 1 or seconds <= 0 or warmup_s < 0 or value_size < 1 or keys < 1:
        raise ValueError("concurrency, seconds, value_size and keys must be positive, warmup_s >= 0")
    workers_count = min(processes or default_processes(concurrency), concurrency)
    slots = None
    if op in BLOCK_OPS:
        block_size = int(spec.options.get("block_size", 4096))
        if value_size % block_size:
            raise ValueError(f"block ops: value_size {value_size} is not a multiple of the block size {block_size}")
        volume_bytes = int(spec.options.get("volume_size_bytes", 0))
        if volume_bytes < value_size:
            raise ValueError(f"block ops: the system's volume ({volume_bytes} bytes) is smaller than {value_size}")
        slots = volume_bytes // value_size
        keys = min(keys, slots)
    read_keys = prefill_count(op, value_size, keys, slots)
    workers: list[_Worker] = []
    started = time.monotonic()
    try:
        for index, coroutines in enumerate(_split(concurrency, workers_count)):
            plan = _WorkerPlan(spec, op, value_size, index, workers_count, coroutines, keys, read_keys, prefill, seed)
            workers.append(_Worker(plan))
        ready_deadline = time.monotonic() + READY_TIMEOUT_S
        readies = [w.receive(ready_deadline, "ready") for w in workers]
        setup_s = time.monotonic() - started
        window_ns = round(seconds * 1e9)
        warmup_ns = round(warmup_s * 1e9)
        start_ns = time.monotonic_ns() + round(START_DELAY_S * 1e9)
        for worker in workers:
            worker.send(("go", start_ns, warmup_ns, window_ns))
        sampler = CpuSampler(server_pids or {})
        _sleep_until_ns(start_ns + warmup_ns)
        cpu_before = sampler.sample()
        _sleep_until_ns(start_ns + warmup_ns + window_ns)
        cpu_after = sampler.sample()
        done_deadline = time.monotonic() + DRAIN_TIMEOUT_S + 30
        reports = [w.receive(done_deadline, "done") for w in workers]
    finally:
        for worker in workers:
            worker.stop()
    samples = array.array("q")
    errors = 0
    messages: dict[str, int] = {}
    for report in reports:
        samples.frombytes(report["samples"])
        errors += report["errors"]
        for message, count in report["messages"].items():
            if message in messages or len(messages) < ERROR_MESSAGES_MAX:
                messages[message] = messages.get(message, 0) + count
    ops = len(samples)
    loadgen_cpu = [round(r["cpu_s"], 3) for r in reports]
    share = [round(c / seconds, 3) for c in loadgen_cpu]
    server_cpu = cpu_delta(cpu_before, cpu_after)
    return LoadResult(
        op=op,
        value_size=value_size,
        concurrency=concurrency,
        processes=workers_count,
        seconds=seconds,
        warmup_s=warmup_s,
        ops=ops,
        ops_per_s=round(ops / seconds, 1),
        mb_per_s=round(ops * value_size / seconds / 1e6, 2),
        latency_ms=latency_summary_ms(samples),
        errors=errors,
        error_messages=[f"{count} x {message}" for message, count in messages.items()],
        loadgen_cpu_s=loadgen_cpu,
        loadgen_cpu_share=share,
        loadgen_saturated=any(s >= SATURATED_CPU_SHARE for s in share),
        server_cpu_s=server_cpu,
        server_cpu_us_per_op=cpu_per_op_us(server_cpu, ops) if server_cpu else {},
        keys=read_keys if op in READ_OPS else keys,
        prefilled=sum(r.get("prefilled", 0) for r in readies),
        setup_s=round(setup_s, 3),
        event_loop=workers[0].loop if workers else "",
    )


def _sleep_until_ns(deadline_ns: int) -> None:
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)
