"""CRC32C throughput: ours (native) against google-crc32c, in the same run.

    python -m benchmarks.bench_checksum      # a table of GB/s and ratios
    pytest benchmarks/bench_checksum.py --benchmark-only
"""

from __future__ import annotations

import os
import time

import google_crc32c
import pytest

from replicator._native import checksum as native

SIZES = {"64B": 64, "4KiB": 4096, "1MiB": 1 << 20}


def _buffer(size: int) -> bytes:
    return os.urandom(size)


@pytest.mark.parametrize("name", list(SIZES))
def test_ours(benchmark, name: str) -> None:
    data = _buffer(SIZES[name])
    benchmark(native.crc32c, data)


@pytest.mark.parametrize("name", list(SIZES))
def test_google(benchmark, name: str) -> None:
    data = _buffer(SIZES[name])
    benchmark(google_crc32c.value, data)


def _rate(function, data: bytes, seconds: float = 0.3) -> float:
    """Best of five rounds, bytes per second."""
    best = 0.0
    for _ in range(5):
        count = 0
        started = time.perf_counter()
        deadline = started + seconds / 5
        while True:
            for _ in range(64):
                function(data)
            count += 64
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, count * len(data) / (now - started))
    return best


def main() -> None:
    print(f"implementation: {native.IMPLEMENTATION}")
    print(f"{'size':>6} {'ours GB/s':>10} {'google GB/s':>12} {'ratio':>6}")
    for name, size in SIZES.items():
        data = _buffer(size)
        ours = _rate(native.crc32c, data)
        google = _rate(google_crc32c.value, data)
        print(f"{name:>6} {ours / 1e9:10.2f} {google / 1e9:12.2f} {ours / google:6.2f}")


if __name__ == "__main__":
    main()
