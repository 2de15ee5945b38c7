"""The site daemon's wall clock and its jump hook (the chaos suite's clock-jump nemesis)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from replicator.daemon import clock
from replicator.daemon.clock import WallClock, read_offset


def test_plain_clock_is_the_real_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(clock.CLOCK_ENVIRONMENT_VARIABLE, raising=False)
    wall = WallClock.from_environment()
    assert wall.control_path is None
    assert abs(wall.now_ms() - time.time_ns() // 1_000_000) < 1000


def test_offset_from_the_control_file_steps_the_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    control = tmp_path / "clock"
    control.write_text("-30000\n")
    monkeypatch.setenv(clock.CLOCK_ENVIRONMENT_VARIABLE, str(control))
    monkeypatch.setattr(clock, "POLL_S", 0.0)
    wall = WallClock.from_environment()
    assert abs(wall.now_ms() - (time.time_ns() // 1_000_000 - 30_000)) < 1000
    control.write_text("120000")
    assert abs(wall.now_ms() - (time.time_ns() // 1_000_000 + 120_000)) < 1000
    control.unlink()
    assert abs(wall.now_ms() - time.time_ns() // 1_000_000) < 1000


@pytest.mark.parametrize("text", ["", "soon", "1e9", str(clock.OFFSET_MS_MAX + 1), "\xff"])
def test_bad_or_absurd_offsets_count_as_zero(tmp_path: Path, text: str) -> None:
    control = tmp_path / "clock"
    control.write_text(text, encoding="latin-1")
    assert read_offset(str(control)) == 0
    assert read_offset(str(tmp_path / "missing")) == 0
