"""Every planted bug must be caught by the real suite: `python -m chaos plants`.

Each plant is run with the nemeses that open the window its bug needs (the
simulator finds all of them within 200 seeds; on real daemons the windows are
real-time races, so a plant gets several attempts with fresh seeds). A plant
counts as caught when a run with it ends in a violation; which checkers found
it is reported. Exit status 0 only if every plant was caught.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.suite.run import RunConfig, run
from chaos.suite.workload import WorkloadConfig

# plant -> nemeses that open its window (run each alone, in order), and why.
AIMED: dict[str, tuple[tuple[str, ...], str]] = {
    "early_visible": (("kill",), "a write visible at its origin before the peer has it is lost when the origin dies"),
    "no_witness": (("kill",), "the survivor goes on alone without a grant"),
    "no_lease_wait": (
        ("partition-blackhole",),
        "the granted site commits while the cut-off site still serves reads under its lease",
    ),
    "no_read_lease": (("pause",), "a site resumed after a pause serves reads before it notices its lease ran out"),
    "no_read_gate": (("link-delay",), "a delayed commit notice leaves a prepared key readable at the peer"),
    "rejoin_without_resync": (("kill",), "the returning site keeps the values it missed"),
    "drop_dirty": (("kill",), "keys written alone are not resynced"),
    "reconcile_early": (("partition-close", "restart-loop"), "a reconnect commits records the peer may not hold"),
    "forget_suspect_keys": (
        ("partition-blackhole", "restart-loop"),
        "a resync target drops its log without reporting the keys",
    ),
}


@dataclass
class PlantResult:
    plant: str
    caught: bool
    attempts: int
    seconds: float
    checkers: list[str]
    seed: int | None  # the seed of the catching run
    rerun: str
    report: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_plant(
    plant: str,
    out: Path,
    *,
    seed: int = 1,
    attempts: int = 4,
    per_nemesis_s: float = 30.0,
    log: Callable[[str], None] = print,
    quiet: Callable[[str], None] = lambda line: None,
) -> PlantResult:
    nemeses, _ = AIMED[plant]
    began = time.monotonic()
    summary: dict[str, Any] = {}
    for attempt in range(1, attempts + 1):
        attempt_seed = seed * 100 + attempt
        config = RunConfig(
            out=out / f"{plant}-{attempt_seed}",
            seed=attempt_seed,
            nemeses=list(nemeses),
            per_nemesis_s=per_nemesis_s,
            plant=plant,
            liveness_bound_s=30.0,  # a plant may break liveness too: don't wait a minute for it
            workload=WorkloadConfig(clients_per_site=3, keys=8, seed=attempt_seed),
        )
        summary = run(config, log=quiet)
        if summary["status"] == "violation":
            checkers = [c["checker"] for c in summary["checks"] if c["status"] == "violation"]
            log(f"  {plant}: caught on attempt {attempt} (seed {attempt_seed}) by {', '.join(checkers)}")
            return PlantResult(plant, True, attempt, round(time.monotonic() - began, 1), checkers, attempt_seed,
                               summary["rerun"], str(config.out))
        log(f"  {plant}: attempt {attempt} (seed {attempt_seed}) not caught ({summary['status']})")
    return PlantResult(plant, False, attempts, round(time.monotonic() - began, 1), [], None,
                       summary.get("rerun", ""), "")


def run_plants(
    plants: Sequence[str],
    out: Path,
    *,
    seed: int = 1,
    attempts: int = 4,
    per_nemesis_s: float = 30.0,
    log: Callable[[str], None] = print,
) -> list[PlantResult]:
    results = []
    for plant in plants:
        nemeses, why = AIMED[plant]
        log(f"{plant}: {', '.join(nemeses)} ({why})")
        results.append(run_plant(plant, out, seed=seed, attempts=attempts, per_nemesis_s=per_nemesis_s, log=log))
    return results
