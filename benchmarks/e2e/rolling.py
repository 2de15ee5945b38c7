"""A rolling restart of both sites under load: the write pause and the client errors it costs.

    python -m benchmarks.e2e.rolling --dir D [--writers 4] [--no-drain | --kill] [--production-timeouts]

Starts a witness and sites a and b on 127.0.0.1 (`replicator.local.LocalCluster`), runs `writers`
threads that each write objects without pause through a `Client([a, b])` with the DEFAULT retry
policy, then restarts b and then a the way docs/operations.md ("Upgrades and rolling restarts")
says: `replicatorctl drain` the site, stop it (SIGTERM), start it again, wait for SYNC. With
--no-drain the sites are stopped without draining (the trial's procedure, for comparison); with
--kill they are killed (SIGKILL: an unplanned failover, the failover time with these settings). With
--production-timeouts the sites and the witness run with the configuration defaults instead of the
launcher's short demo timeouts.

The result (stdout, one JSON object): writes acknowledged, client errors (calls that raised after
the client's own retries), the longest time without any acknowledged write per restart and overall,
the epochs before and after, and a final check that every acknowledged write reads back at both
sites. Exit code 1 if a write was lost or the pair did not come back to SYNC.

As a library: measure_rolling_restart(directory, writers=4, drain=True, ...) -> dict
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from replicator.cli import main as replicatorctl
from replicator.client import Client, ClientError, RetryPolicy
from replicator.config import load_site_config, load_witness_config
from replicator.local import DEMO_SITE_SETTINGS, DEMO_WITNESS_CLIENT, DEMO_WITNESS_SETTINGS, LocalCluster

BUCKET = "rolling"


def production_settings(cluster: LocalCluster) -> dict[str, Any]:
    """The timeouts the sites and the witness run with, read back from their configuration files."""
    site = load_site_config(cluster.config_path("a"))
    witness = load_witness_config(cluster.config_path("witness"))
    return {
        "site": {name: getattr(site.site, name) for name in DEMO_SITE_SETTINGS},
        "witness_client": {name: getattr(site.witness, name) for name in DEMO_WITNESS_CLIENT},
        "witness": {name: getattr(witness.witness, name) for name in DEMO_WITNESS_SETTINGS},
    }


class Writers:
    """Threads writing without pause; every acknowledged write and every client error recorded."""

    def __init__(self, endpoints: list[str], count: int) -> None:
        self.endpoints = endpoints
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, bytes] = {}
        self.ack_times: list[float] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def _run(self, index: int) -> None:
        with Client(self.endpoints, retry=RetryPolicy()) as client:
            sequence = 0
            while not self.stop.is_set():
                key, value = f"w{index}-{sequence}", f"value {index} {sequence}".encode()
                sequence += 1
                try:
                    client.put(BUCKET, key, value)
                except ClientError as error:
                    with self.lock:
                        self.errors.append(f"{type(error).__name__}: {error.message[:200]}")
                    continue
                with self.lock:
                    self.acked[key] = value
                    self.ack_times.append(time.monotonic())

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def longest_pause_s(self, start: float, end: float) -> float:
        """The longest time in [start, end] without an acknowledged write."""
        with self.lock:
            times = sorted(t for t in self.ack_times if start <= t <= end)
        edges = [start, *times, end]
        return max(b - a for a, b in zip(edges, edges[1:], strict=False))


def _state(endpoint: str) -> tuple[str, int]:
    with Client([endpoint], retry=RetryPolicy(attempts_max=1, call_timeout_ms=2000)) as client:
        status = client.status()
    return status.state, status.epoch


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except ClientError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def measure_rolling_restart(
    directory: str | Path,
    *,
    writers: int = 4,
    drain: bool = True,
    kill: bool = False,
    production_timeouts: bool = False,
    peer_timeout_ms: int | None = 2000,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    cluster = LocalCluster(
        directory,
        peer_timeout_ms=None if production_timeouts else peer_timeout_ms,
        timeouts="production" if production_timeouts else "demo",
    )
    with cluster:
        cluster.configure()
        settings = production_settings(cluster) if production_timeouts else {"peer_timeout_ms": peer_timeout_ms}
        cluster.start(sites=True)
        endpoints = [cluster.cluster["sites"][name]["grpc"] for name in ("a", "b")]
        _wait(lambda: all(_state(e)[0] == "SYNC" for e in endpoints), 60, "both sites in SYNC")
        epoch_before = _state(endpoints[0])[1]
        restarts = []
        with Writers(endpoints, writers) as load:
            time.sleep(2.0)  # steady state first
            for name, other in (("b", "a"), ("a", "b")):
                index, other_endpoint = "ab".index(name), endpoints["ab".index(other)]
                started = time.monotonic()
                errors_before = len(load.errors)
                if drain and not kill:
                    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the result
                        code = replicatorctl(["--endpoint", endpoints[index], "drain"])
                    if code != 0:
                        raise RuntimeError(f"replicatorctl drain of {name} exited {code}")
                drained = time.monotonic()
                if kill:
                    cluster.kill(name)
                else:
                    cluster.stop_process(name)
                stopped = time.monotonic()
                _wait(lambda endpoint=other_endpoint: _state(endpoint)[0] == "SOLO", 60, f"site {other} SOLO")
                solo = time.monotonic()
                cluster.start_process(name)
                _wait(lambda: all(_state(e)[0] == "SYNC" for e in endpoints), 120, "both sites in SYNC again")
                synced = time.monotonic()
                time.sleep(2.0)  # the load settles on both sites again
                pause = load.longest_pause_s(started, time.monotonic())
                restarts.append(
                    {
                        "site": name,
                        "drain_s": round(drained - started, 3),
                        "stop_s": round(stopped - drained, 3),
                        "peer_solo_after_stop_s": round(solo - stopped, 3),
                        "back_in_sync_s": round(synced - solo, 3),
                        "longest_write_pause_s": round(pause, 3),
                        "client_errors": len(load.errors) - errors_before,
                    }
                )
                progress(f"restarted {name}: {restarts[-1]}")
        epoch_after = _state(endpoints[0])[1]
        lost: list[str] = []
        for endpoint in endpoints:
            with Client([endpoint]) as client:
                for key, value in load.acked.items():
                    try:
                        if client.get(BUCKET, key) != value:
                            lost.append(f"{key} at {endpoint}: wrong value")
                    except ClientError as error:
                        lost.append(f"{key} at {endpoint}: {error.message[:100]}")
        return {
            "drain": drain and not kill,
            "kill": kill,
            "production_timeouts": production_timeouts,
            "settings": settings,
            "writers": writers,
            "writes_acked": len(load.acked),
            "client_errors": len(load.errors),
            "client_error_samples": sorted(set(load.errors))[:5],
            "longest_write_pause_s": max(r["longest_write_pause_s"] for r in restarts),
            "restarts": restarts,
            "epoch_before": epoch_before,
            "epoch_after": epoch_after,
            "lost_writes": len(lost),
            "lost_samples": lost[:5],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e.rolling", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, type=Path, help="a new or empty directory for the deployment")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--no-drain", action="store_true", help="stop each site without draining it first")
    parser.add_argument("--kill", action="store_true", help="SIGKILL each site instead (unplanned failovers)")
    parser.add_argument("--production-timeouts", action="store_true", help="the configuration defaults, not the demo's")
    parser.add_argument("--peer-timeout-ms", type=int, default=2000, help="with the demo timeouts (default 2000)")
    args = parser.parse_args(argv)
    result = measure_rolling_restart(
        args.dir,
        writers=args.writers,
        drain=not args.no_drain,
        kill=args.kill,
        production_timeouts=args.production_timeouts,
        peer_timeout_ms=args.peer_timeout_ms,
    )
    print(json.dumps(result, indent=2))
    return 1 if result["lost_writes"] else 0


if __name__ == "__main__":
    sys.exit(main())
