"""The recovery benchmarks (benchmarks/e2e/recovery.py) in small: a real witness and two sites each.

Fast versions of `python -m benchmarks.e2e.recovery resync|failover`: about
8 MiB resynced and one SIGKILL under load. Each test starts its own
deployment under tmp_path; LocalCluster stops it whatever happens.
"""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

from benchmarks.e2e import recovery
from benchmarks.e2e.recovery import BenchmarkError, main, measure_failover, measure_resync, parse_size

MIB = 1 << 20


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resync_of_8_mib_is_timed_and_verified(tmp_path: Path) -> None:
    result = measure_resync(
        tmp_path / "resync", size_bytes=8 * MIB, value_size=32 << 10, progress=None, writers=2, sample_keys=16
    )
    assert result["error"] is None, result
    assert result["completed"] and result["verified"], result
    assert result["keys"] == 256 and result["keys_resynced"] == 256
    assert result["bytes_resynced"] == 8 * MIB
    assert result["resync_seconds"] > 0 and result["mb_per_s"] > 0
    assert 0 < result["b_healthy_seconds"] <= result["resync_seconds"]
    assert result["healthy_to_sync_seconds"] >= 0
    assert result["b_stopped_with"] == "SIGTERM"
    verify = result["verify"]
    assert verify["sample_mismatches"] == 0 and verify["differing_count"] == 0
    assert verify["keys_listed_at_b"] == 256
    assert result["settings"]["site"]["lease_ms"] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_failover_under_load_loses_nothing(tmp_path: Path) -> None:
    result = measure_failover(tmp_path / "failover", kills=1, writers=4, progress=None, settle_s=1.0)
    assert result["error"] is None, result
    assert result["lost_writes"] == 0, result["lost_examples"]
    assert result["completed"] and result["verified"] and result["replicas_identical"]
    assert result["acked_writes"] > 0
    assert len(result["rto_ms"]) == 1 and result["rto_ms"][0] > 0
    assert 0 < result["median_rto_ms"] <= result["worst_rto_ms"]
    (round_,) = result["rounds"]
    assert round_["victim"] == "a" and len(round_["rto_ms_per_writer"]) == 4
    assert all(r > 0 for r in round_["rto_ms_per_writer"])
    assert round_["resync_seconds"] > 0 and round_["gap_ms"] > 0
    assert result["retry_policy"]["call_timeout_ms"] == 1000
    assert result["settings"]["site"]["peer_timeout_ms"] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resync_of_1_mib_values(tmp_path: Path) -> None:
    """Eight 1 MiB values would exceed a link frame in one resync batch: the source cuts the batch."""
    result = measure_resync(
        tmp_path / "resync", size_bytes=8 * MIB, value_size=MIB, progress=None, writers=2, stall_timeout_s=5
    )
    assert result["verified"], result["error"]


def test_refuses_without_three_times_the_size_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(recovery.shutil, "disk_usage", lambda path: usage(10 * MIB, 0, 2 * MIB))
    with pytest.raises(BenchmarkError, match="not enough disk space"):
        measure_resync(tmp_path / "d", size_bytes=MIB, progress=None)
    assert not (tmp_path / "d").exists()


def test_refuses_a_directory_in_use(tmp_path: Path) -> None:
    (tmp_path / "cluster.json").write_text("{}")
    with pytest.raises(BenchmarkError, match="not an empty directory"):
        measure_failover(tmp_path, kills=1, progress=None)
    assert main(["failover", "--dir", str(tmp_path), "--quiet"]) == 2


def test_sizes() -> None:
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("8MiB") == parse_size("8M") == 8 * MIB
    assert parse_size("4096") == 4096
    assert parse_size("64k") == 64 << 10
    assert parse_size("1MB") == 1_000_000


def test_help_explains_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["resync", "--help"], ["failover", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--size" in text and "--kills" in text and "--dir" in text
