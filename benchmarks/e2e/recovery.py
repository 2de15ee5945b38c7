"""Recovery benchmarks on a real local deployment: resync throughput and failover time (RTO).

    python -m benchmarks.e2e.recovery resync --size 1GiB --dir D [--value-size 1MiB] [--kill]
    python -m benchmarks.e2e.recovery failover --kills 5 --dir D [--writers 8] [--call-timeout-ms 1000]

Both start a witness and sites a and b as separate processes on 127.0.0.1
(`replicator.local.LocalCluster`, demo timeouts: see the `settings` entry of
the result), wait for the pair to be SYNC, measure, check the data, and
always stop every process they started. Progress goes to stderr, the result
to stdout as one JSON object; the exit code is 1 if a write was lost, a
check failed or the pair did not come back to SYNC.

As a library:

    measure_resync(directory, size_bytes=1 << 30, value_size=1 << 20, progress=print) -> dict
    measure_failover(directory, kills=5, writers=8, progress=print) -> dict

`directory` must not exist yet or be empty (a deployment there would be
reused, with its data). Times are taken with time.monotonic() in this
process; a site's own view (its log's role changes) is added where the logs
have it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from replicator.client import Client, ClientError, NotFound, OutcomeUnknown, RetryPolicy, Unavailable
from replicator.config import load_site_config, load_witness_config
from replicator.local import TIMEOUT_PROFILES, LocalCluster, grpc_health

BUCKET = "bench"
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
SITES = ("a", "b")

# What an operator would give a client of a metro pair: give up on one call
# after 1 s (not the library's 5 s), move to the other site at once, back off
# at most 200 ms between rounds, and keep trying for a few seconds.
METRO_RETRY = RetryPolicy(attempts_max=10, backoff_initial_ms=20, backoff_ms_max=200, call_timeout_ms=1000)
# With the production timeouts a failover takes longer than METRO_RETRY's budget (a non-preferred survivor waits
# out the witness's 2 s grace): the writers use the client's own defaults, as an application would.
PRODUCTION_RETRY = RetryPolicy()
STATUS_RETRY = RetryPolicy(attempts_max=1, call_timeout_ms=1000)
# Bulk writing before a measurement and checking after it: patient (a page of List reads 1000 keys one by one).
BULK_RETRY = RetryPolicy(attempts_max=6, backoff_initial_ms=50, backoff_ms_max=1000, call_timeout_ms=60_000)
VERIFY_RETRY = RetryPolicy(attempts_max=1, call_timeout_ms=600_000)

Progress = Callable[[str], Any]


class BenchmarkError(Exception):
    """A precondition is not met (disk space, directory in use) or the deployment failed to start."""


# ---------------------------------------------------------------- helpers


def _say(progress: Progress | None, text: str) -> None:
    if progress is not None:
        progress(f"[{time.strftime('%H:%M:%S')}] {text}")


def _status(endpoint: str) -> Any:
    """The site's SiteStatus, or None if it does not answer (a fresh channel: no reconnect backoff)."""
    try:
        with Client([endpoint], retry=STATUS_RETRY) as client:
            return client.status()
    except ClientError:
        return None


def _states(endpoints: dict[str, str]) -> dict[str, Any]:
    return {name: _status(endpoint) for name, endpoint in endpoints.items()}


def _state_name(status: Any) -> str:
    return "-" if status is None else str(status.state)


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    """Poll until `predicate()` holds; the seconds it took. BenchmarkError after `timeout_s`."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise BenchmarkError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _both_sync(endpoints: dict[str, str]) -> bool:
    states = _states(endpoints)
    return all(s is not None and s.state == "SYNC" for s in states.values())


def _sync_epoch(endpoints: dict[str, str]) -> int | None:
    """The epoch if both sites report SYNC in the same epoch, else None."""
    states = list(_states(endpoints).values())
    if all(s is not None and s.state == "SYNC" for s in states) and len({s.epoch for s in states}) == 1:
        return int(states[0].epoch)
    return None


def _wait_stable_sync(endpoints: dict[str, str], since: float, hold_s: float, timeout_s: float, what: str) -> dict[str, Any]:
    """Wait until both sites stay SYNC in one epoch for `hold_s`.

    Returns seconds after `since` of the first moment both were SYNC
    (`first_sync_seconds`) and of the start of the window that held
    (`stable_sync_seconds`), and how often SYNC was lost again in between.
    """
    first: float | None = None
    window: tuple[float, int] | None = None  # (start, epoch)
    lost = 0
    deadline = time.monotonic() + timeout_s
    while True:
        epoch = _sync_epoch(endpoints)
        now = time.monotonic()
        if epoch is not None:
            first = now if first is None else first
            if window is None or window[1] != epoch:
                if window is not None:
                    lost += 1
                window = (now, epoch)
            if now - window[0] >= hold_s:
                return {
                    "first_sync_seconds": round(first - since, 3),
                    "stable_sync_seconds": round(window[0] - since, 3),
                    "sync_lost_again": lost,
                    "epoch": epoch,
                }
        elif window is not None:
            lost += 1
            window = None
        if now > deadline:
            raise BenchmarkError(f"timed out after {timeout_s:.0f} s waiting for {what} (SYNC held {hold_s:.1f} s)")
        time.sleep(0.05)


def _fresh_directory(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory).resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BenchmarkError(
            f"{path} is not an empty directory: the benchmark needs a new deployment (a LocalCluster directory "
            f"is reused with its data); give a new or empty directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _settings(cluster: LocalCluster) -> dict[str, Any]:
    """The timeouts the deployment really runs with (read back from its configuration files)."""
    site = load_site_config(cluster.config_path("a"))
    witness = load_witness_config(cluster.config_path("witness"))
    keys = (
        "peer_timeout_ms",
        "heartbeat_interval_ms",
        "lease_ms",
        "preferred_site",
        "reconnect_backoff_ms_max",
        "frame_size_bytes_max",
        "inflight_bytes_max",
    )
    return {
        "note": (
            "replicator.local demo settings (short timeouts for loopback), not the metro defaults"
            if cluster.timeouts == "demo"
            else "the configuration's shipped defaults (production timeouts)"
        ),
        "site": {key: getattr(site.site, key) for key in keys},
        "site_witness_client": {"timeout_ms": site.witness.timeout_ms, "retry_interval_ms": site.witness.retry_interval_ms},
        "witness": {
            "preferred_grace_ms": witness.witness.preferred_grace_ms,
            "request_timeout_ms": witness.witness.request_timeout_ms,
        },
    }


def _endpoints(cluster: LocalCluster) -> dict[str, str]:
    sites = cluster.cluster["sites"]
    return {name: sites[name]["grpc"] for name in SITES}


def _start(cluster: LocalCluster, progress: Progress | None) -> dict[str, str]:
    started = time.monotonic()
    cluster.start(sites=True)
    endpoints = _endpoints(cluster)
    _wait(lambda: _both_sync(endpoints), 60, "both sites in SYNC after the start")
    _say(progress, f"witness, a and b running in {cluster.directory}; pair SYNC after {time.monotonic() - started:.2f} s")
    return endpoints


# ---------------------------------------------------------------- logs


def _log_offsets(cluster: LocalCluster) -> dict[str, int]:
    offsets = {}
    for name in (*SITES, "witness"):
        try:
            offsets[name] = (cluster.directory / f"{name}.log").stat().st_size
        except OSError:
            offsets[name] = 0
    return offsets


def _log_events(cluster: LocalCluster, name: str, offset: int) -> list[dict[str, Any]]:
    """The JSON events `name` logged after byte `offset` (lines that are not JSON are skipped)."""
    events = []
    try:
        with (cluster.directory / f"{name}.log").open("rb") as handle:
            handle.seek(offset)
            for line in handle:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        events.append(event)
    except OSError:
        pass
    return events


def _event_seconds(event: dict[str, Any], wall0: float, mono0: float) -> float | None:
    """When `event` happened, in seconds after the moment (wall0, mono0): mono_ns if logged, else its ts."""
    if isinstance(event.get("mono_ns"), int):
        return float(event["mono_ns"] / 1e9 - mono0)
    try:
        return datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp() - wall0
    except (KeyError, ValueError):
        return None


def _summarise(events: list[dict[str, Any]], limit: int = 12) -> dict[str, int]:
    """Counts of event (and reason) in a log excerpt, most frequent first."""
    counts: dict[str, int] = {}
    for event in events:
        label = str(event.get("event"))
        if event.get("reason"):
            label += f": {event['reason']}"
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1])[:limit])


# ---------------------------------------------------------------- resync


def _resync_value(index: int, value_size: int, pool: bytes) -> bytes:
    """Value of key `index`: its index, then a slice of a random pool (distinct, incompressible, re-creatable)."""
    offset = (index * 4099) % (len(pool) - value_size + 1)
    head = struct.pack(">Q", index)
    return head + pool[offset : offset + value_size - len(head)]


def _resync_key(index: int) -> str:
    return f"resync/{index:09d}"


class _ResyncWriters:
    """`threads` clients at one site writing keys 0..count-1 with put_many, chunk by chunk."""

    def __init__(self, endpoint: str, count: int, value_size: int, pool: bytes, threads: int) -> None:
        self.endpoint = endpoint
        self.count = count
        self.value_size = value_size
        self.pool = pool
        self.chunk = max(1, min(64, (4 * MIB) // value_size))
        self.next_index = 0
        self.written = 0
        self.retries = 0
        self.failure: str | None = None
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"resync-writer-{i}") for i in range(threads)]

    def _take(self) -> range | None:
        with self.lock:
            if self.next_index >= self.count or self.failure is not None:
                return None
            start = self.next_index
            self.next_index = min(self.count, start + self.chunk)
            return range(start, self.next_index)

    def _run(self) -> None:
        with Client([self.endpoint], retry=BULK_RETRY) as client:
            while (indexes := self._take()) is not None:
                items = [(_resync_key(i), _resync_value(i, self.value_size, self.pool)) for i in indexes]
                for attempt in range(20):
                    try:
                        client.put_many(BUCKET, items)  # every put is idempotent in effect: same key, same value
                        break
                    except ClientError as error:
                        with self.lock:
                            self.retries += 1
                        if attempt == 19:
                            with self.lock:
                                self.failure = f"put_many of {indexes} failed 20 times, last: {error}"
                            return
                        time.sleep(0.1 * (attempt + 1))
                with self.lock:
                    self.written += len(items)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


def measure_resync(
    directory: str | os.PathLike[str],
    size_bytes: int = GIB,
    value_size: int = MIB,
    progress: Progress | None = print,
    *,
    writers: int = 4,
    stop_signal: int = signal.SIGTERM,
    sample_keys: int = 64,
    stall_timeout_s: float = 60.0,
    sync_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Time to resync `size_bytes` of data changed at a while b was away, from b's start to SYNC.

    b is stopped with `stop_signal` (SIGTERM: a clean shutdown, the default;
    SIGKILL: a crash). a then writes ceil(size_bytes / value_size) new keys of
    `value_size` bytes with `writers` threads (put_many), b is started again
    and both sites are polled until they report SYNC. Afterwards a sample of
    keys is read at b alone and the online verify (from a) compares the
    replicas. The result counts only if `verified` is true.

    Gives up (`completed` false, `error` and the sites' log summaries set)
    if a's dirty keys do not go down for `stall_timeout_s` or SYNC is not
    reached within `sync_timeout_s` (default: 120 s + 1 s per 2 MB).
    Raises BenchmarkError if the disk has less than 3 x size_bytes free, the
    directory is not empty, or the deployment does not start.
    """
    if size_bytes <= 0 or value_size <= 16:
        raise ValueError("size_bytes must be positive and value_size larger than 16 bytes")
    if writers <= 0 or sample_keys <= 0:
        raise ValueError("writers and sample_keys must be positive")
    path = Path(directory).resolve()
    free = _free_bytes(path)
    if free < 3 * size_bytes:
        raise BenchmarkError(
            f"not enough disk space under {path}: {free / GIB:.2f} GiB free, the benchmark wants 3 x "
            f"{size_bytes / GIB:.2f} GiB (the data at both sites plus RocksDB's logs and compactions)"
        )
    path = _fresh_directory(path)
    keys = -(-size_bytes // value_size)
    total_bytes = keys * value_size
    if sync_timeout_s is None:
        sync_timeout_s = 120.0 + total_bytes / 2e6
    signal_name = signal.Signals(stop_signal).name
    result: dict[str, Any] = {
        "benchmark": "resync",
        "directory": str(path),
        "size_bytes": total_bytes,
        "value_size": value_size,
        "keys": keys,
        "writers": writers,
        "b_stopped_with": signal_name,
        "completed": False,
        "verified": False,
        "error": None,
    }
    with LocalCluster(path) as cluster:
        endpoints = _start(cluster, progress)
        result["settings"] = _settings(cluster)
        stopped_at = time.monotonic()
        if stop_signal == signal.SIGTERM:
            cluster.stop_process("b")
        else:
            cluster.kill("b", stop_signal)
        result["b_stop_seconds"] = round(time.monotonic() - stopped_at, 3)
        result["a_solo_after_stop_seconds"] = round(
            result["b_stop_seconds"]
            + _wait(lambda: _state_name(_status(endpoints["a"])) == "SOLO", 60, "site a to go on alone (SOLO)"),
            3,
        )
        _say(progress, f"b stopped ({signal_name}); a is SOLO {result['a_solo_after_stop_seconds']:.2f} s later")

        _say(progress, f"writing {total_bytes / MIB:.1f} MiB at a: {keys} keys of {value_size} bytes, {writers} writers")
        pool = os.urandom(value_size + 64 * KIB)
        writer = _ResyncWriters(endpoints["a"], keys, value_size, pool, writers)
        started = time.monotonic()
        writer.start()
        reported = started
        while writer.alive():
            time.sleep(0.1)
            now = time.monotonic()
            if now - reported >= 2.0:
                reported = now
                done = writer.written * value_size
                _say(
                    progress,
                    f"  written {done / MIB:.0f}/{total_bytes / MIB:.0f} MiB ({100 * done / total_bytes:.0f}%), "
                    f"{done / (now - started) / 1e6:.1f} MB/s",
                )
        writer.join()
        write_seconds = time.monotonic() - started
        result["write_seconds"] = round(write_seconds, 3)
        result["write_mb_per_s"] = round(total_bytes / write_seconds / 1e6, 2)
        result["write_retries"] = writer.retries
        if writer.failure is not None:
            result["error"] = f"writing at a failed: {writer.failure}"
            return result
        status_a = _status(endpoints["a"])
        result["dirty_keys_before_restart"] = None if status_a is None else status_a.dirty_keys
        _say(
            progress,
            f"wrote {total_bytes / MIB:.1f} MiB in {write_seconds:.2f} s ({result['write_mb_per_s']} MB/s); "
            f"a: {_state_name(status_a)}, {result['dirty_keys_before_restart']} dirty keys",
        )
        b_bytes_before = _tree_bytes(path / "data" / "b")

        offsets = _log_offsets(cluster)
        wall0, mono0 = time.time(), time.monotonic()
        cluster.start_process("b", wait=False)
        outcome = _watch_resync(cluster, endpoints, mono0, result, progress, stall_timeout_s, sync_timeout_s)
        if outcome is not None:
            result["error"] = outcome
            result["logs"] = {name: _summarise(_log_events(cluster, name, offsets[name])) for name in SITES}
            return result
        # SYNC must also last: the pair staying SYNC in one epoch for 2 s (a pair that falls out again is a bug).
        try:
            held = _wait_stable_sync(endpoints, mono0, 2.0, 60, "the pair to stay SYNC")
            result["stable_sync_seconds"] = held["stable_sync_seconds"]
            result["sync_lost_again"] = held["sync_lost_again"]
        except BenchmarkError as error:
            result["error"] = str(error)
            result["logs"] = {name: _summarise(_log_events(cluster, name, offsets[name])) for name in SITES}
            return result
        result["completed"] = True
        result["b_disk_growth_bytes"] = _tree_bytes(path / "data" / "b") - b_bytes_before
        for name in SITES:
            roles = [
                (round(_event_seconds(e, wall0, mono0) or 0.0, 3), e.get("new"))
                for e in _log_events(cluster, name, offsets[name])
                if e.get("event") == "role"
            ]
            result.setdefault("roles_after_restart", {})[name] = roles[:40]
            result.setdefault("role_changes_after_restart", {})[name] = len(roles)
        # A resync that had to start over (the link dropped while a was the source) is slower than one pass.
        result["resync_interruptions"] = sum(
            1
            for e in _log_events(cluster, "a", offsets["a"])
            if e.get("event") == "role" and e.get("reason") == "resync target lost"
        )
        result["witness_changes"] = [
            (round(_event_seconds(e, wall0, mono0) or 0.0, 3), e.get("epoch"), e.get("mode"), e.get("holder"))
            for e in _log_events(cluster, "witness", offsets["witness"])
            if e.get("event") == "state_changed"
        ]
        if result["resync_interruptions"]:
            _say(
                progress,
                f"note: the resync was interrupted {result['resync_interruptions']} times (link dropped; see "
                f"a.log / b.log peer_drop events) and the witness changed state {len(result['witness_changes'])} times",
            )

        _say(progress, "verifying: a sample of keys read at b alone, then the online verify from a")
        try:
            result["verify"] = _verify_resync(endpoints, keys, value_size, pool, sample_keys)
        except ClientError as error:
            result["error"] = f"verification could not run: {type(error).__name__}: {error}"
            result["verify"] = {"ok": False, "sample_keys": 0, "sample_mismatches": None, "keys_compared": None, "differing_count": None}
        result["verified"] = result["verify"]["ok"]
        _say(
            progress,
            f"{'verified' if result['verified'] else 'VERIFICATION FAILED'}: {result['verify']['sample_keys']} keys "
            f"read at b, {result['verify']['sample_mismatches']} mismatched; verify compared "
            f"{result['verify']['keys_compared']} keys, {result['verify']['differing_count']} differ",
        )
        result["disk_bytes"] = {name: _tree_bytes(path / "data" / name) for name in SITES}
    return result


def _watch_resync(
    cluster: LocalCluster,
    endpoints: dict[str, str],
    mono0: float,
    result: dict[str, Any],
    progress: Progress | None,
    stall_timeout_s: float,
    sync_timeout_s: float,
) -> str | None:
    """Poll b's health and both states from b's start until SYNC; fill `result`; an error text or None."""
    healthy_at: float | None = None
    source_at: float | None = None
    initial_dirty = result.get("dirty_keys_before_restart") or 0
    lowest_dirty = initial_dirty
    last_progress = mono0  # when a's dirty keys last went down (or b started)
    reported = mono0
    seen: list[tuple[float, str, str]] = []
    changes = 0
    last_names: tuple[str, str] | None = None
    while True:
        now = time.monotonic()
        if not cluster.is_running("b"):
            return f"site b exited during the resync (see {cluster.directory / 'b.log'})"
        if healthy_at is None and grpc_health(endpoints["b"], timeout_s=0.5) == "SERVING":
            healthy_at = time.monotonic()
            result["b_healthy_seconds"] = round(healthy_at - mono0, 3)
        states = _states(endpoints)
        now = time.monotonic()
        names = (_state_name(states["a"]), _state_name(states["b"]))
        if names != last_names:
            last_names = names
            changes += 1
            if len(seen) < 40:  # a resync going round in circles would fill the result
                seen.append((round(now - mono0, 3), *names))
            result["state_changes"] = changes
        if source_at is None and names[0] == "RESYNC_SOURCE":
            source_at = now
        dirty = states["a"].dirty_keys if states["a"] is not None else None
        if dirty is not None and dirty < lowest_dirty:
            lowest_dirty = dirty
            last_progress = now
        result["states_seen"] = seen
        if names == ("SYNC", "SYNC"):
            resync = now - mono0
            result["resync_seconds"] = round(resync, 3)
            result["healthy_to_sync_seconds"] = round(max(0.0, now - (healthy_at or now)), 3)
            result["source_to_sync_seconds"] = None if source_at is None else round(now - source_at, 3)
            result["keys_resynced"] = initial_dirty
            result["bytes_resynced"] = initial_dirty * result["value_size"]
            result["bytes_resynced_from"] = (
                "a's dirty keys before b's start x value size: replicatord leaves SiteStatus.resync_progress "
                "at (0, 0) and has no byte counter for the resync"
            )
            result["mb_per_s"] = round(result["size_bytes"] / resync / 1e6, 2)
            result["mib_per_s"] = round(result["size_bytes"] / resync / MIB, 2)
            if result["healthy_to_sync_seconds"] > 0:
                result["mb_per_s_from_healthy"] = round(result["size_bytes"] / result["healthy_to_sync_seconds"] / 1e6, 2)
            _say(
                progress,
                f"pair SYNC {resync:.2f} s after b's start ({result['healthy_to_sync_seconds']:.2f} s after b was "
                f"healthy): {result['mb_per_s']} MB/s",
            )
            return None
        if now - reported >= 1.0:
            reported = now
            done = "" if not initial_dirty or dirty is None else f" ({100 * (1 - dirty / initial_dirty):.0f}% sent)"
            _say(progress, f"  resync {now - mono0:.1f} s: a {names[0]} ({dirty} dirty keys{done}), b {names[1]}")
        if now - last_progress > stall_timeout_s:
            return (
                f"resync stalled: a's dirty keys stayed at {lowest_dirty} of {initial_dirty} for "
                f"{stall_timeout_s:.0f} s (states a {names[0]}, b {names[1]})"
            )
        if now - mono0 > sync_timeout_s:
            return f"the pair was not SYNC {sync_timeout_s:.0f} s after b's start (states a {names[0]}, b {names[1]})"
        time.sleep(0.05)


class _Patient:
    """Runs checking calls again while the site cannot serve (UNAVAILABLE, deadline), for up to `timeout_s` each."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self.retries = 0

    def __call__(self, call: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return call()
            except (Unavailable, OutcomeUnknown):
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                time.sleep(0.2)


LIST_KEYS_MAX = 2000  # above this the check lists nothing at b: a List page reads 1000 keys one by one


def _verify_resync(endpoints: dict[str, str], keys: int, value_size: int, pool: bytes, sample: int) -> dict[str, Any]:
    """Sample keys read at b alone, b's listing (small runs), and the online verify from a."""
    count = min(keys, sample)
    indexes = sorted({round(i * (keys - 1) / max(1, count - 1)) for i in range(count)})
    mismatches: list[str] = []
    patient = _Patient()
    listed: list[Any] | None = None
    with Client([endpoints["b"]], retry=BULK_RETRY) as at_b:
        for index in indexes:
            try:
                got = patient(lambda index=index: at_b.get(BUCKET, _resync_key(index)))
            except NotFound:
                got = None
            if got != _resync_value(index, value_size, pool):
                mismatches.append(f"{_resync_key(index)}: {'missing' if got is None else f'{len(got)} wrong bytes'}")
        if keys <= LIST_KEYS_MAX:
            listed = patient(lambda: at_b.list_objects(BUCKET, prefix="resync/"))
    wrong_size = None if listed is None else sum(1 for info in listed if info.size_bytes != value_size)
    report: dict[str, Any] = {
        "sample_keys": len(indexes),
        "sample_mismatches": len(mismatches),
        "mismatched": mismatches[:10],
        "keys_listed_at_b": None if listed is None else len(listed),
        "wrong_size_at_b": wrong_size,
    }
    with Client([endpoints["a"]], retry=VERIFY_RETRY) as at_a:
        started = time.monotonic()
        outcome = patient(at_a.verify)
    report.update(
        keys_compared=outcome.keys_compared,
        differing_count=outcome.differing_count,
        differing_keys=[key.decode(errors="replace") for key in outcome.differing_keys[:10]],
        verify_seconds=round(time.monotonic() - started, 3),
        retries=patient.retries,
    )
    report["ok"] = (
        not mismatches
        and (listed is None or (len(listed) == keys and not wrong_size))
        and outcome.keys_compared == keys
        and outcome.differing_count == 0
    )
    return report


# ---------------------------------------------------------------- failover


class _Writer(threading.Thread):
    """Writes `value_size`-byte values to its own keys through a two-site client, one write at a time.

    A write that fails is tried again with the same key and value until it is
    acknowledged, so the writer's writes are sequential and the last
    acknowledged value of a key is the one each site must hold.
    """

    def __init__(
        self, index: int, endpoints: list[str], retry: RetryPolicy, value_size: int, keys: int, clock0: float
    ) -> None:
        super().__init__(daemon=True, name=f"failover-writer-{index}")
        self.index = index
        self.first_site = endpoints[0]
        self.client = Client(endpoints, retry=retry)
        self.value_size = value_size
        self.keys = keys
        self.clock0 = clock0
        self.base = os.urandom(value_size)
        self.acknowledged: dict[str, bytes] = {}
        self.writes: list[tuple[float, float]] = []  # (began, acknowledged), monotonic
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.unconfirmed: tuple[str, bytes] | None = None  # a write still unacknowledged when the writer gave up
        self.halt = threading.Event()  # finish the write in progress, then stop
        self.abandon = threading.Event()  # stop at once, even with a write unacknowledged

    def value(self, count: int) -> bytes:
        head = f"w{self.index}#{count}:".encode()
        return head + self.base[len(head) :]

    def run(self) -> None:
        count = 0
        try:
            while not self.halt.is_set():
                key = f"failover/w{self.index:02d}-{count % self.keys:04d}"
                value = self.value(count)
                began = time.monotonic()
                while True:
                    try:
                        self.client.put(BUCKET, key, value)
                        break
                    except Exception as error:  # noqa: BLE001 - every failure is retried and counted
                        self.errors += 1
                        kind = getattr(getattr(error, "code", None), "name", None) or type(error).__name__
                        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
                        if self.abandon.is_set():
                            self.unconfirmed = (key, value)
                            return
                        time.sleep(0.01)
                self.writes.append((began, time.monotonic()))
                self.acknowledged[key] = value
                count += 1
        finally:
            self.client.close()

    def first_ack_after(self, moment: float) -> float | None:
        """Acknowledgement time of the first write begun at or after `moment`."""
        return next((ack for began, ack in self.writes if began >= moment), None)


def _longest_gap(times: list[float], start: float, end: float) -> float:
    """Longest interval within [start, end] with no time of `times` in it."""
    inside = sorted(t for t in times if start < t < end)
    points = [start, *inside, end]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


def measure_failover(
    directory: str | os.PathLike[str],
    kills: int = 5,
    writers: int = 8,
    progress: Progress | None = print,
    *,
    retry: RetryPolicy | None = None,
    value_size: int = 4 * KIB,
    keys_per_writer: int = 64,
    warmup_s: float = 1.0,
    settle_s: float = 2.0,
    first_victim: str = "a",
    timeouts: str = "demo",
) -> dict[str, Any]:
    """Failover time as clients see it when a site is SIGKILLed under load, `kills` times.

    `timeouts` is the deployment's timeout profile (`LocalCluster(timeouts=...)`): "demo" (short loopback
    timeouts) or "production" (the configuration's shipped defaults). `retry` defaults to METRO_RETRY with
    the demo timeouts and to the client's defaults (PRODUCTION_RETRY) with the production ones.

    `writers` threads write `value_size`-byte values continuously through a
    two-endpoint client with `retry` (half of them list site a first, half
    b). Each round SIGKILLs one site (alternating, `first_victim` first),
    measures per writer the time from the kill until its first acknowledged
    write begun after the kill (rto), and the longest stretch without any
    acknowledgement; then restarts the victim and waits until the pair has
    been SYNC in one epoch for `settle_s` with the load running (a pair that
    falls out of SYNC again meanwhile is counted in `unplanned_failovers`). At the end every writer's last acknowledged
    value of every key is read at a alone and at b alone (lost_writes) and
    the online verify compares the replicas.
    """
    if kills <= 0 or writers <= 0:
        raise ValueError("kills and writers must be positive")
    if first_victim not in SITES:
        raise ValueError(f"first_victim must be one of {SITES}")
    if retry is None:
        retry = METRO_RETRY if timeouts == "demo" else PRODUCTION_RETRY
    path = _fresh_directory(directory)
    result: dict[str, Any] = {
        "benchmark": "failover",
        "directory": str(path),
        "kills": kills,
        "writers": writers,
        "value_size": value_size,
        "keys_per_writer": keys_per_writer,
        "kill_signal": "SIGKILL",
        "retry_policy": dataclasses.asdict(retry),
        "rto_definition": (
            "per writer: seconds from the SIGKILL until the acknowledgement of its first write begun after the "
            "kill; rto_ms[k] is the median over writers of kill k"
        ),
        "completed": False,
        "verified": False,
        "error": None,
    }
    rounds: list[dict[str, Any]] = []
    result["rounds"] = rounds
    result["timeouts"] = timeouts
    with LocalCluster(path, timeouts=timeouts) as cluster:
        endpoints = _start(cluster, progress)
        result["settings"] = _settings(cluster)
        ordered = [endpoints["a"], endpoints["b"]]
        clock0 = time.monotonic()
        threads = [
            _Writer(i, ordered if i % 2 == 0 else ordered[::-1], retry, value_size, keys_per_writer, clock0)
            for i in range(writers)
        ]
        for thread in threads:
            thread.start()
        try:
            time.sleep(warmup_s)
            _say(progress, f"{writers} writers running ({sum(len(t.writes) for t in threads)} writes acknowledged)")
            for number in range(kills):
                victim = SITES[(SITES.index(first_victim) + number) % 2]
                rounds.append(_failover_round(cluster, endpoints, threads, victim, number, progress, settle_s))
        except BenchmarkError as error:
            result["error"] = str(error)
        finally:
            for thread in threads:
                thread.halt.set()
            deadline = time.monotonic() + 30
            for thread in threads:
                thread.join(max(0.1, deadline - time.monotonic()))
            for thread in threads:
                if thread.is_alive():
                    thread.abandon.set()
                    thread.join(10)

        result["acked_writes"] = sum(len(t.writes) for t in threads)
        result["client_errors"] = sum(t.errors for t in threads)
        kinds: dict[str, int] = {}
        for thread in threads:
            for kind, count in thread.error_kinds.items():
                kinds[kind] = kinds.get(kind, 0) + count
        result["client_error_kinds"] = kinds
        measured = [r for r in rounds if r.get("rto_ms_median") is not None]
        result["rto_ms"] = [r["rto_ms_median"] for r in measured]
        result["median_rto_ms"] = round(statistics.median(result["rto_ms"]), 1) if measured else None
        result["worst_rto_ms"] = max((max(r["rto_ms_per_writer"]) for r in measured), default=None)
        result["gap_ms"] = [r["gap_ms"] for r in measured]
        result["resync_seconds"] = [r.get("resync_seconds") for r in rounds]
        result["stable_sync_seconds"] = [r.get("stable_sync_seconds") for r in rounds]
        result["unplanned_failovers"] = sum(r.get("unplanned_failovers", 0) for r in rounds)
        result["solo_after_kill_ms"] = [r.get("solo_after_kill_ms") for r in rounds]

        _say(progress, "checking every acknowledged write at a alone and at b alone")
        try:
            _wait(lambda: _both_sync(endpoints), 60, "both sites in SYNC before the check")
            result.update(_check_writes(endpoints, threads))
        except (BenchmarkError, ClientError) as error:
            result["error"] = result["error"] or f"check failed: {error}"
            result["lost_writes"] = None
        result["completed"] = result["error"] is None and len(measured) == kills
        result["verified"] = bool(result["completed"] and result.get("lost_writes") == 0 and result.get("replicas_identical"))
        _say(
            progress,
            f"{result['acked_writes']} writes acknowledged, {result.get('lost_writes')} lost; RTO median "
            f"{result['median_rto_ms']} ms, worst {result['worst_rto_ms']} ms",
        )
    return result


def _failover_round(
    cluster: LocalCluster,
    endpoints: dict[str, str],
    threads: list[_Writer],
    victim: str,
    number: int,
    progress: Progress | None,
    hold_s: float,
) -> dict[str, Any]:
    survivor = "b" if victim == "a" else "a"
    offsets = _log_offsets(cluster)
    record: dict[str, Any] = {"kill": number + 1, "victim": victim}
    wall0, killed_at = time.time(), time.monotonic()
    cluster.kill(victim, signal.SIGKILL)
    record["victim_exit_ms"] = round(1000 * (time.monotonic() - killed_at), 1)
    _say(progress, f"kill {number + 1}: SIGKILL site {victim} under load")
    _wait(lambda: _state_name(_status(endpoints[survivor])) == "SOLO", 30, f"site {survivor} to go on alone (SOLO)")
    record["solo_after_kill_ms"] = round(1000 * (time.monotonic() - killed_at), 1)  # as polled, every ~50 ms
    _wait(
        lambda: all(t.first_ack_after(killed_at) is not None for t in threads),
        30,
        "every writer's first acknowledged write after the kill",
        poll_s=0.02,
    )
    rtos = [1000 * (t.first_ack_after(killed_at) - killed_at) for t in threads]  # type: ignore[operator]
    record["rto_ms_per_writer"] = [round(r, 1) for r in rtos]
    record["rto_ms_median"] = round(statistics.median(rtos), 1)
    record["rto_ms_max"] = round(max(rtos), 1)
    first_after = [t.first_ack_after(killed_at) or killed_at for t in threads]
    # Longest stretch with no acknowledgement at all, from 1 s before the kill until every writer is back.
    end = max(first_after)
    acks = [ack for t in threads for _, ack in t.writes]
    record["gap_ms"] = round(1000 * _longest_gap(acks, killed_at - 1.0, end), 1)
    events = _log_events(cluster, survivor, offsets[survivor])
    record["survivor_roles"] = [
        (round(1000 * (_event_seconds(e, wall0, killed_at) or 0.0), 1), e.get("new"), e.get("reason"))
        for e in events
        if e.get("event") == "role"
    ]
    _say(
        progress,
        f"  site {survivor} SOLO after {record['solo_after_kill_ms']:.0f} ms (its log: "
        + ", ".join(f"{role} at {ms:.0f} ms" for ms, role, _ in record["survivor_roles"])
        + f"); RTO median {record['rto_ms_median']:.0f} ms, max {record['rto_ms_max']:.0f} ms, "
        f"longest gap without any ack {record['gap_ms']:.0f} ms",
    )
    restarted_at = time.monotonic()
    cluster.restart(victim)
    record["restart_healthy_seconds"] = round(time.monotonic() - restarted_at, 3)
    sync = _wait_stable_sync(endpoints, restarted_at, hold_s, 120, f"the pair back in SYNC after {victim}'s restart")
    record["resync_seconds"] = sync["first_sync_seconds"]
    record["stable_sync_seconds"] = sync["stable_sync_seconds"]
    record["sync_lost_again"] = sync["sync_lost_again"]
    acks = [ack for t in threads for _, ack in t.writes]
    record["recovery_gap_ms"] = round(1000 * _longest_gap(acks, restarted_at, restarted_at + sync["stable_sync_seconds"]), 1)
    # The witness's view of the round: one SOLO grant for the kill and one SYNC after the resync is the
    # plan; every further SOLO grant is a failover no kill caused.
    changes = [e for e in _log_events(cluster, "witness", offsets["witness"]) if e.get("event") == "state_changed"]
    record["witness_changes"] = [
        (round(1000 * (_event_seconds(e, wall0, killed_at) or 0.0), 1), e.get("epoch"), e.get("mode"), e.get("holder"))
        for e in changes
    ]
    record["unplanned_failovers"] = max(0, sum(1 for e in changes if e.get("mode") == "SOLO") - 1)
    _say(
        progress,
        f"  {victim} restarted, healthy after {record['restart_healthy_seconds']:.2f} s, pair SYNC after "
        f"{record['resync_seconds']:.2f} s, stable SYNC (epoch {sync['epoch']}, held {hold_s:.1f} s) from "
        f"{record['stable_sync_seconds']:.2f} s; witness epochs this round: {len(changes)}, unplanned failovers: "
        f"{record['unplanned_failovers']}, longest gap without any ack meanwhile {record['recovery_gap_ms']:.0f} ms",
    )
    return record


def _check_writes(endpoints: dict[str, str], threads: list[_Writer]) -> dict[str, Any]:
    lost: list[str] = []
    uncertain = 0
    checked = 0
    clients = {name: Client([endpoints[name]], retry=BULK_RETRY) for name in SITES}
    patient = _Patient()
    try:
        for thread in threads:
            pending_key, pending_value = thread.unconfirmed or (None, None)
            for key, value in thread.acknowledged.items():
                for name, client in clients.items():
                    try:
                        got = patient(lambda client=client, key=key: client.get(BUCKET, key))
                    except NotFound:
                        got = None
                    checked += 1
                    if got == value:
                        continue
                    if key == pending_key and got == pending_value:
                        uncertain += 1  # the write given up on may have been applied after all
                        continue
                    lost.append(f"{key} at {name}: {'missing' if got is None else 'an older or other value'}")
        with Client([endpoints["a"]], retry=VERIFY_RETRY) as at_a:
            outcome = patient(at_a.verify)
    finally:
        for client in clients.values():
            client.close()
    return {
        "checked_reads": checked,
        "lost_writes": len(lost),
        "lost_examples": lost[:10],
        "uncertain_writes": uncertain,
        "verify_keys_compared": outcome.keys_compared,
        "verify_differing": outcome.differing_count,
        "replicas_identical": outcome.differing_count == 0,
    }


# ---------------------------------------------------------------- command line


def parse_size(text: str) -> int:
    """'1GiB', '8MiB', '512K', '4096': powers of 1024 (K, M, G, T with or without 'iB'); KB, MB, GB: of 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64KiB, 8MiB, 1GiB)")
    number, unit, binary, suffix = match.groups()
    base = 1000 if unit and suffix and not binary else 1024
    return int(float(number) * base ** " kmgt".index(unit.lower() or " "))


@contextlib.contextmanager
def _directory(given: str | None, keep: bool) -> Iterator[Path]:
    if given:
        yield Path(given)
        return
    path = Path(tempfile.mkdtemp(prefix="replicator-bench-"))
    try:
        yield path / "deploy"
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e.recovery",
        description=(
            "Recovery benchmarks on a real local deployment (a witness and sites a and b on 127.0.0.1, "
            "replicator.local demo timeouts). Progress on stderr, the result as JSON on stdout. "
            "Exit 0 when the data checks out, 1 when a write was lost, verification failed or the pair did "
            "not return to SYNC, 2 when the benchmark could not run (disk space, directory in use, start-up)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    resync = commands.add_parser(
        "resync",
        help="time to resync data changed while site b was away (MB/s)",
        description=(
            "Stop site b, write SIZE of new keys at site a, start b again and time it back to SYNC "
            "(from b's process start, and from b being healthy). Then read a sample at b alone and run the "
            "online verify. Needs 3 x SIZE free on the disk of --dir."
        ),
    )
    resync.add_argument("--size", type=parse_size, default=GIB, help="data changed while b is away (default 1GiB)")
    resync.add_argument(
        "--value-size",
        type=parse_size,
        default=MIB,
        help="bytes per key (default 1MiB; the resync source cuts its batches to fit one link frame)",
    )
    resync.add_argument("--writers", type=int, default=4, help="writer threads at a (default 4)")
    resync.add_argument("--kill", action="store_true", help="stop b with SIGKILL (a crash) instead of SIGTERM")
    resync.add_argument("--sample", type=int, default=64, help="keys read back at b alone (default 64)")
    resync.add_argument(
        "--stall-timeout", type=float, default=60.0, help="give up when the resync makes no progress this long (s)"
    )
    failover = commands.add_parser(
        "failover",
        help="failover time (RTO) when a site is SIGKILLed under load",
        description=(
            "WRITERS clients write 4 KiB values through a two-site client; KILLS times a site is SIGKILLed "
            "(a, b, a, ...), the time until each writer's next acknowledged write is measured, the site is "
            "restarted and the pair let back to SYNC. At the end every acknowledged write is read at both sites."
        ),
    )
    failover.add_argument("--kills", type=int, default=5, help="sites killed, alternating (default 5)")
    failover.add_argument("--writers", type=int, default=8, help="client threads (default 8)")
    failover.add_argument("--value-size", type=parse_size, default=4 * KIB, help="bytes per write (default 4KiB)")
    failover.add_argument(
        "--call-timeout-ms",
        type=int,
        default=None,
        help="client deadline per call (default 1000 with the demo timeouts, the client's 5000 with production)",
    )
    failover.add_argument("--first-victim", choices=SITES, default="a", help="site killed first (default a)")
    failover.add_argument(
        "--timeouts",
        choices=TIMEOUT_PROFILES,
        default="demo",
        help="the sites' and witness's timeouts: demo (short, loopback; the default) or production (the shipped"
        " configuration defaults)",
    )
    for command in (resync, failover):
        command.add_argument("--dir", help="deployment directory, new or empty (default: a temporary one, removed)")
        command.add_argument("--keep", action="store_true", help="keep the temporary directory")
        command.add_argument("--output", help="also write the JSON result to this file")
        command.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    report = None if args.quiet else progress
    try:
        with _directory(args.dir, args.keep) as directory:
            if args.command == "resync":
                result = measure_resync(
                    directory,
                    args.size,
                    args.value_size,
                    report,
                    writers=args.writers,
                    stop_signal=signal.SIGKILL if args.kill else signal.SIGTERM,
                    sample_keys=args.sample,
                    stall_timeout_s=args.stall_timeout,
                )
            else:
                retry = METRO_RETRY if args.timeouts == "demo" else PRODUCTION_RETRY
                if args.call_timeout_ms is not None:
                    retry = dataclasses.replace(retry, call_timeout_ms=args.call_timeout_ms)
                result = measure_failover(
                    directory,
                    args.kills,
                    args.writers,
                    report,
                    retry=retry,
                    value_size=args.value_size,
                    first_victim=args.first_victim,
                    timeouts=args.timeouts,
                )
    except (BenchmarkError, ValueError) as error:
        print(f"recovery benchmark: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # LocalClusterError and the like: the message names the process and its log
        print(f"recovery benchmark: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    ok = result["verified"] and (result["benchmark"] != "failover" or result.get("lost_writes") == 0)
    if not ok:
        print(f"recovery benchmark: FAILED: {result.get('error') or 'data check failed'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
