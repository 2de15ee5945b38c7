"""Syncs per acknowledged put at each site, and c=1 / c=8 latency, on a real LocalCluster pair.

    .venv/bin/python -m benchmarks.syncs_per_put [PUTS]   (default 2000)

Reads `replicator_sync_seconds_count` from both sites' metrics before and after the puts. Compare two
commits by running it in each checkout, interleaved (docs/performance.md, lever 1).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from replicator.client import Client
from replicator.local import LocalCluster

VALUE = b"x" * 4096


def syncs(address: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("replicator_sync_seconds_count ", "replicator_sync_seconds_count{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def measure(puts: int) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory() as directory, LocalCluster(Path(directory) / "c", peer_timeout_ms=3000) as cluster:
        cluster.start(sites=True)
        sites = cluster.cluster["sites"]
        endpoints = [sites["a"]["grpc"], sites["b"]["grpc"]]
        client = Client(endpoints)
        while client.status().state != "SYNC" or Client([endpoints[1]]).status().state != "SYNC":
            time.sleep(0.1)
        for i in range(200):
            client.put("w", f"warm{i}", VALUE)
        metrics = {name: sites[name]["metrics"] for name in ("a", "b")}

        def per_put(before: dict[str, float], count: int) -> str:
            return ", ".join(f"{name} {(syncs(metrics[name]) - before[name]) / count:.2f}" for name in metrics)

        before = {name: syncs(address) for name, address in metrics.items()}
        latencies = []
        for i in range(puts):
            began = time.perf_counter()
            client.put("w", f"k{i}", VALUE)
            latencies.append(time.perf_counter() - began)
        latencies.sort()
        lines.append(
            f"c=1: {puts} puts, p50 {latencies[puts // 2] * 1e3:.3f} ms, p99 {latencies[int(puts * 0.99)] * 1e3:.3f} ms;"
            f" syncs per put: {per_put(before, puts)}"
        )

        before = {name: syncs(address) for name, address in metrics.items()}
        threaded: list[float] = []
        lock = threading.Lock()

        def writer(number: int) -> None:
            own = Client(endpoints if number % 2 == 0 else endpoints[::-1])
            for i in range(puts // 8):
                began = time.perf_counter()
                own.put("w", f"t{number}-{i}", VALUE)
                with lock:
                    threaded.append(time.perf_counter() - began)

        began = time.perf_counter()
        threads = [threading.Thread(target=writer, args=(number,)) for number in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        threaded.sort()
        count = len(threaded)
        lines.append(
            f"c=8: {count} puts, {count / elapsed:.0f} ops/s, p50 {threaded[count // 2] * 1e3:.3f} ms;"
            f" syncs per put: {per_put(before, count)}"
        )
    return lines


if __name__ == "__main__":
    for line in measure(int(sys.argv[1]) if len(sys.argv) > 1 else 2000):
        print(line)
