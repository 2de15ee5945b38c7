"""The chaos suite against real daemons: a short smoke run must pass every checker, and a
planted bug must be caught. (`make chaos` runs the long version: docs/chaos.md.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.suite import nemeses
from chaos.suite.run import SMOKE_NEMESES, RunConfig, run
from chaos.suite.workload import WorkloadConfig
from replicator.local import site_daemon_available

pytestmark = [
    pytest.mark.skipif(not site_daemon_available(), reason="the site daemon is not available"),
    pytest.mark.timeout(240),
]

REQUIRED_CHECKS = {"linearizability", "corruption", "lost_writes", "convergence", "split_brain", "liveness",
                   "process_exits", "convergence_at_sync_points"}


def _config(out: Path, **changes: object) -> RunConfig:
    config = RunConfig(
        out=out,
        seed=11,
        nemeses=list(SMOKE_NEMESES),
        hold_min_s=2.0,
        hold_max_s=3.0,
        settle_s=1.0,
        warmup_s=1.5,
        liveness_bound_s=45.0,
        workload=WorkloadConfig(clients_per_site=3, keys=6, seed=11),
    )
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def test_smoke_run_passes_every_checker(tmp_path: Path) -> None:
    summary = run(_config(tmp_path / "smoke"), log=lambda line: None)
    failed = [c for c in summary["checks"] if c["status"] != "ok"]
    assert not failed and not summary["harness_errors"], (
        f"chaos smoke run failed (rerun: python -m chaos run --smoke --seed 11): {failed} {summary['harness_errors']}"
    )
    assert summary["passed"] and summary["status"] == "ok"
    assert {c["checker"] for c in summary["checks"]} == REQUIRED_CHECKS
    assert [e["nemeses"] for e in summary["episodes"]] == [[n] for n in SMOKE_NEMESES]
    # The faults really happened and the clients saw them.
    episodes = {e["nemeses"][0]: e for e in summary["episodes"]}
    assert episodes["fsync-fail"]["details"][0]["fail_stopped"] is True
    assert summary["grants"] >= 2  # a site went on alone after the kill and after the partition
    assert summary["operations"]["acknowledged_writes"] > 100
    assert summary["operations"]["reads"] > 50
    for name in SMOKE_NEMESES:
        row = summary["per_nemesis"][name]
        assert row["episodes"] == 1 and row["write_rto_ms"]["worst"] is not None
    assert episodes["kill"]["metrics"]["resync_ms"], "the killed site came back through a resync"
    # Every heal was followed by a sync-point comparison, and the sites logged their commits (rule 3).
    assert all(e["sync_point"].startswith("sites identical") for e in summary["episodes"]), summary["episodes"]
    assert summary["commits_logged"] >= summary["operations"]["acknowledged_writes"]
    out = tmp_path / "smoke"
    for name in ("summary.json", "summary.md", "history.jsonl", "final-a.json", "final-b.json",
                 "site-events.jsonl", "timeline.png", "logs/a.log", "logs/b.log", "logs/witness.log"):
        assert (out / name).is_file(), name
    assert (out / "timeline.png").read_bytes().startswith(b"\x89PNG")
    # The offline checker agrees on the recorded files.
    check = subprocess.run(
        [sys.executable, "-m", "chaos.check", str(out / "history.jsonl"), "--final-a", str(out / "final-a.json"),
         "--final-b", str(out / "final-b.json"), "--site-events", str(out / "site-events.jsonl")],
        capture_output=True, text=True, timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["status"] == "ok"


def test_planted_no_witness_is_caught_as_split_brain(tmp_path: Path) -> None:
    summary = run(
        _config(tmp_path / "plant", nemeses=["kill"], plant="no_witness", liveness_bound_s=10.0),
        log=lambda line: None,
    )
    assert not summary["passed"] and summary["status"] == "violation"
    verdicts = {c["checker"]: c for c in summary["checks"]}
    assert verdicts["split_brain"]["status"] == "violation", verdicts["split_brain"]
    assert "without the witness's grant" in verdicts["split_brain"]["message"]
    assert "--plant no_witness" in summary["rerun"] and "--seed 11" in summary["rerun"]


def test_planted_drop_dirty_is_caught_at_the_sync_point(tmp_path: Path) -> None:
    """Keys written alone but not marked dirty are not resynced: the sites differ right after the heal
    (later writes would hide it from the final comparison; cold keys, rarely rewritten, keep it)."""
    # As `make plants` does (chaos/suite/plants.py), a few seeds: one run may not exercise the plant (on a
    # loaded machine the failover can take the whole kill, so that no write is acknowledged alone, or a
    # sync point cannot be checked in time). Each miss says why.
    misses = []
    for seed in (11, 12, 13):
        workload = WorkloadConfig(clients_per_site=3, keys=6, seed=seed, cold_keys=256, cold_fraction=0.5)
        config = _config(
            tmp_path / f"plant-{seed}", nemeses=["kill"], plant="drop_dirty", liveness_bound_s=20.0, workload=workload
        )
        summary = run(config, log=lambda line: None)
        verdicts = {c["checker"]: c for c in summary["checks"]}
        if verdicts["convergence_at_sync_points"]["status"] == "violation":
            assert summary["status"] == "violation"
            return
        episodes = [(e.get("nemeses"), e.get("sync_point")) for e in summary["episodes"]]
        misses.append(f"seed {seed}: {verdicts['convergence_at_sync_points']['message']}; episodes {episodes}")
    raise AssertionError("drop_dirty was not caught:\n" + "\n".join(misses))


def test_cli_lists_nemeses_and_plants_and_refuses_unknown_names() -> None:
    listed = subprocess.run([sys.executable, "-m", "chaos", "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0
    for name in nemeses.NEMESES:
        assert name in listed.stdout
    assert "no_witness" in listed.stdout and "early_visible" in listed.stdout
    bad = subprocess.run([sys.executable, "-m", "chaos", "run", "--nemeses", "meteor"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "unknown nemesis meteor" in bad.stderr
    # The simulator's and the checker's entry points are untouched.
    sim = subprocess.run([sys.executable, "-m", "chaos.sim", "--list-plants"], capture_output=True, text=True,
                         timeout=60)
    assert sim.returncode == 0 and "no_witness" in sim.stdout
