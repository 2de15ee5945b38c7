"""The deterministic simulator: many seeds clean, every plant caught, replays exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chaos.sim.run import run_seed
from chaos.sim.world import SimParams
from replicator.core.config import PLANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM_SEEDS = os.environ.get("REPLICATOR_SIM_SEEDS", "1-300")


def sim(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chaos.sim", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_many_seeds_have_no_violation() -> None:
    result = sim("--seeds", SIM_SEEDS, "--json")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failed_seeds"] == []
    assert summary["faults"] > summary["runs"]  # faults were really injected
    assert summary["acknowledged_writes"] > 0


# Directed scenarios in tests/test_scenarios.py also replay reconcile_early and
# forget_suspect_keys step by step.
@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_every_plant_is_caught(plant: str) -> None:
    result = sim("--plant", plant, "--seeds", "1-200", "--stop-after", "1", "--json")
    assert result.returncode == 1, f"plant {plant} was not caught in 200 seeds: {result.stdout[-2000:]}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failed_seeds"], summary


def test_a_seed_replays_exactly() -> None:
    params = SimParams(safety_ms=4000)
    first = run_seed(7, params)
    second = run_seed(7, params)
    assert (first.operations, first.acknowledged_writes, first.faults) == (
        second.operations,
        second.acknowledged_writes,
        second.faults,
    )


def test_cli_rejects_unknown_plant_and_lists_plants() -> None:
    result = sim("--plant", "nope", "--seeds", "1")
    assert result.returncode == 2 and "unknown plant" in result.stderr
    listed = sim("--list-plants")
    assert listed.returncode == 0
    assert set(line.split()[0] for line in listed.stdout.splitlines()) == set(PLANTS)
