"""benchmarks/bench_core.py: the core, the driver and the store of a pair in one process."""

from __future__ import annotations

import re

import pytest

from benchmarks import bench_core


def rows(output: str) -> dict[str, tuple[int, float, float]]:
    found = {}
    for line in output.splitlines():
        match = re.fullmatch(r"\| (.+?) \| ([\d,]+) \| ([\d,.]+) \| ([\d,.]+) \|", line)
        if match:
            found[match[1]] = (int(match[2].replace(",", "")), float(match[3].replace(",", "")),
                               float(match[4].replace(",", "")))
    return found


def test_every_workload_runs_on_the_memory_store(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_core.main(["--seconds", "0.05"]) == 0
    measured = rows(capsys.readouterr().out)
    assert set(measured) == set(bench_core.WORKLOADS)
    for name, (operations, site_a, site_b) in measured.items():
        assert operations > 0 and site_a > 0, name
        # A write costs CPU at both sites (the peer persists and applies it); a read only at a.
        assert (site_b > 0) == (not name.startswith("get")), name


def test_the_rocksdb_store_replicates_a_block_write(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_core.main(["--rocks", "--seconds", "0.05", "--only", "block write 1 MiB, 1 a turn"]) == 0
    ((operations, site_a, site_b),) = rows(capsys.readouterr().out).values()
    assert operations >= 1 and site_a > 0 and site_b > 0


def test_a_pair_that_does_not_answer_a_write_fails_the_run() -> None:
    # The benchmark refuses to report a figure for writes that were not acknowledged.
    pair = bench_core.Pair(None)
    assert pair.sites["a"].core is not None
    pair.sites["a"].core.stop("test")
    with pytest.raises(SystemExit, match="never answered"):
        pair.write_turn([(bench_core.Operation(b"k", b"v"),)])
