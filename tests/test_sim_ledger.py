"""The long simulator run's ledger (docs/sim-runs/, docs/chaos.md "The simulator at scale").

The chunk files of `make sim-long` are kept in the tree so that a 100,000-seed run can be spread over
sessions. These checks keep the ledger and the table that cites it honest: every chunk of a folder ran
the folder's simulated code, no seed is counted twice, and the table's row for the folder states the
seeds, runs, acknowledged writes, faults and violations its chunk files add up to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chaos.sim.long import VIOLATIONS_KEPT, _summarise

ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "docs" / "sim-runs"
FIELDS = {"first_seed", "last_seed", "runs", "operations", "acknowledged_writes", "protocol_errors",
          "faults_by_kind", "failed_seeds", "violations", "seconds", "code", "commit", "params"}


def folders() -> list[Path]:
    return sorted(path for path in LEDGER.iterdir() if path.is_dir()) if LEDGER.is_dir() else []


def load(folder: Path) -> list[dict]:
    chunks = [json.loads(path.read_text()) for path in sorted(folder.glob("chunk-*.json"))]
    return sorted(chunks, key=lambda chunk: chunk["first_seed"])


def ranges(chunks: list[dict]) -> list[tuple[int, int]]:
    """The chunks' seeds as maximal contiguous ranges."""
    merged: list[tuple[int, int]] = []
    for chunk in chunks:
        if merged and chunk["first_seed"] == merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], chunk["last_seed"])
        else:
            merged.append((chunk["first_seed"], chunk["last_seed"]))
    return merged


def test_the_ledger_exists() -> None:
    assert folders(), "docs/sim-runs/ holds no run (see docs/chaos.md)"


@pytest.mark.parametrize("folder", folders(), ids=lambda folder: folder.name)
def test_every_chunk_ran_the_folders_code_once(folder: Path) -> None:
    chunks = load(folder)
    assert chunks, f"{folder} has no chunk files"
    code = folder.name.replace("-", ":", 1)
    seen: set[int] = set()
    for chunk in chunks:
        assert FIELDS <= chunk.keys(), (chunk.get("first_seed"), FIELDS - chunk.keys())
        assert chunk["code"] == code, (chunk["first_seed"], chunk["code"], code)
        seeds = set(range(chunk["first_seed"], chunk["last_seed"] + 1))
        assert chunk["runs"] == len(seeds), chunk["first_seed"]
        assert not seeds & seen, f"seeds counted twice in {folder.name}: {sorted(seeds & seen)[:5]}"
        seen |= seeds
        assert set(chunk["failed_seeds"]) <= seeds
        assert len(chunk["violations"]) == min(len(chunk["failed_seeds"]), VIOLATIONS_KEPT)
    assert len({json.dumps(c["params"], sort_keys=True) for c in chunks}) == 1, "chunks ran different parameters"


@pytest.mark.parametrize("folder", folders(), ids=lambda folder: folder.name)
def test_the_chaos_table_states_what_the_chunks_add_up_to(folder: Path) -> None:
    chunks = load(folder)
    code = folder.name.replace("-", ":", 1)
    seeds = [seed for chunk in chunks for seed in range(chunk["first_seed"], chunk["last_seed"] + 1)]
    total = _summarise(chunks, seeds, chunks[0]["params"], [])  # what make sim-long's summary.json says
    rows = [line for line in (ROOT / "docs" / "chaos.md").read_text().splitlines()
            if line.startswith("| ") and f"`{code}`" in line and f"docs/sim-runs/{folder.name}/" in line]
    assert len(rows) == 1, f"docs/chaos.md needs exactly one table row citing docs/sim-runs/{folder.name}/"
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    stated_ranges = cells[0]
    expected = ", ".join(f"{first}-{last}" for first, last in ranges(chunks))
    assert stated_ranges == expected, (stated_ranges, expected)
    assert cells[3] == f"{total['runs']:,}", (cells[3], total["runs"])
    assert cells[5] == f"{total['acknowledged_writes'] / 1e6:.1f} M", (cells[5], total["acknowledged_writes"])
    assert cells[6] == f"{total['faults']:,}", (cells[6], total["faults"])
    violations = re.match(r"(\d+)", cells[7])
    assert violations and int(violations.group(1)) == len(total["failed_seeds"]), (cells[7], total["failed_seeds"])
