"""Frame codec benchmark: the Cython codec against its pure-Python twin, in the same run.

    python -m benchmarks.bench_framing [--seconds 1] [--records 64] [--value-bytes 4096]

prints GB/s (frame bytes per second) for
- encode: `records` records of one `value-bytes` operation each into a fresh bytearray per frame
  (what the link is handed);
- decode: FrameDecoder.feed of whole frames (checks both CRCs, builds the record views);
- decode+touch: the same, then every operation's key and value view is taken;
for each implementation, and the ratio native / pure. Goal: >= 2 GB/s each way for the native codec.

Under pytest the same measurements run as pytest-benchmark functions.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from replicator._pure import framing as pure_framing
from replicator.core.records import Operation, Record, RecordId

try:
    from replicator._native import framing as native_framing
except ImportError:  # pragma: no cover - not built
    native_framing = None


def make_records(count: int, value_bytes: int) -> list[Record]:
    value = os.urandom(value_bytes)
    return [
        Record(
            RecordId("a", 1, seq), 5, 1_000_000 + seq, b"request-%08d" % seq, (Operation(b"vol/7/%012d" % seq, value),)
        )
        for seq in range(1, count + 1)
    ]


def _rate(operation: Callable[[], int], seconds: float) -> float:
    """Bytes per second of `operation` (which returns the bytes it handled), repeated for `seconds`."""
    operation()  # warm up
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        done += operation()
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def encoder(module, records: list[Record]) -> Callable[[], int]:  # type: ignore[no-untyped-def]
    def encode() -> int:
        out = bytearray()
        return module.encode_records(out, 9, records, (1, 1))

    return encode


def decoder(module, records: list[Record], touch: bool) -> Callable[[], int]:  # type: ignore[no-untyped-def]
    out = bytearray()
    module.encode_records(out, 9, records, (1, 1))
    frame = bytes(out)
    stream = module.FrameDecoder()

    def decode() -> int:
        (decoded,) = stream.feed(frame)
        if touch:
            for record in decoded.body.records:
                for operation in record.operations:
                    operation.key, operation.value  # noqa: B018 - the views are what is measured
        return len(frame)

    return decode


def measure(seconds: float, count: int, value_bytes: int) -> list[tuple[str, float, float]]:
    """Rows of (measure, native GB/s, pure GB/s)."""
    records = make_records(count, value_bytes)
    assert native_framing is not None, "build the extension first: python setup.py build_ext --inplace"
    rows = []
    for name, make in (
        ("encode", lambda module: encoder(module, records)),
        ("decode", lambda module: decoder(module, records, False)),
        ("decode+touch", lambda module: decoder(module, records, True)),
    ):
        native_rate = _rate(make(native_framing), seconds) / 1e9
        pure_rate = _rate(make(pure_framing), seconds) / 1e9
        rows.append((name, native_rate, pure_rate))
    return rows


def format_table(rows: list[tuple[str, float, float]], count: int, value_bytes: int) -> str:
    lines = [
        f"frame codec, {count} records x {value_bytes} B per frame (GB/s of frame bytes)",
        f"{'':14}{'cython':>10}{'pure':>10}{'ratio':>10}",
    ]
    for name, native_rate, pure_rate in rows:
        lines.append(f"{name:14}{native_rate:10.2f}{pure_rate:10.2f}{native_rate / pure_rate:10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--value-bytes", type=int, default=4096)
    arguments = parser.parse_args(argv)
    rows = measure(arguments.seconds, arguments.records, arguments.value_bytes)
    print(format_table(rows, arguments.records, arguments.value_bytes))


# --- pytest-benchmark ------------------------------------------------------------

RECORDS = make_records(64, 4096)


def _benchmark(benchmark, operation: Callable[[], int]) -> None:  # type: ignore[no-untyped-def]
    size = operation()
    benchmark(operation)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gigabytes_per_second"] = size / benchmark.stats.stats.mean / 1e9


def test_encode_native(benchmark):  # type: ignore[no-untyped-def]
    _benchmark(benchmark, encoder(native_framing, RECORDS))


def test_encode_pure(benchmark):  # type: ignore[no-untyped-def]
    _benchmark(benchmark, encoder(pure_framing, RECORDS))


def test_decode_native(benchmark):  # type: ignore[no-untyped-def]
    _benchmark(benchmark, decoder(native_framing, RECORDS, True))


def test_decode_pure(benchmark):  # type: ignore[no-untyped-def]
    _benchmark(benchmark, decoder(pure_framing, RECORDS, True))


if __name__ == "__main__":
    main()
