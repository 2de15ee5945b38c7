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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.suite.run import RunConfig, run
from chaos.suite.workload import WorkloadConfig

READERS = {"readers_per_site": 2}  # pinned readers: a stale read at a cut-off or paused site shows
COLD = {"cold_keys": 256, "cold_fraction": 0.5}  # rarely rewritten keys: a divergence survives to the sync point


@dataclass(frozen=True)
class Aim:
    nemeses: tuple[str, ...]  # run each alone, in order
    why: str
    workload: dict[str, Any] = field(default_factory=dict)  # WorkloadConfig changes
    per_nemesis_s: float | None = None  # longer than the default when one episode rarely hits the window
    sites: dict[str, dict[str, int]] = field(default_factory=dict)  # [site] settings per site
    attempts: int | None = None  # more than the default when one attempt catches it only about half the time


AIMED: dict[str, Aim] = {
    "early_visible": Aim(
        ("delay-kill",),
        "a write visible at its origin before the peer has it (delayed on the link) is lost when the origin dies",
        READERS,
    ),
    "no_witness": Aim(("kill",), "the survivor goes on alone without a grant"),
    "no_lease_wait": Aim(
        ("isolate",),
        "the granted site commits while the cut-off site still serves reads under its lease",
        {**READERS, "home_keys": True},
    ),
    "no_read_lease": Aim(
        ("partition-blackhole",),
        "with asymmetric timeouts (b: peer_timeout_ms 3000, a: 500) b stays SYNC without a peer long after "
        "its lease ran out, while a, granted, goes on alone once the lease it gave b is over",
        {**READERS, "home_keys": True},
        sites={"b": {"peer_timeout_ms": 3000}},
    ),
    "no_read_gate": Aim(("link-delay",), "a delayed commit notice leaves a prepared key readable at the peer", READERS),
    "rejoin_without_resync": Aim(("kill",), "the returning site keeps the values it missed", COLD),
    "drop_dirty": Aim(("kill",), "keys written alone are not resynced", COLD),
    "reconcile_early": Aim(
        ("reconcile-crash",), "a same-epoch reconcile commits records the slow peer then loses in a crash", COLD
    ),
    "skip_rollback_check": Aim(
        ("restore",),
        "a site restored from an older copy of its data rejoins with an incremental resync and lacks what was "
        "written after the copy",
        COLD,
    ),
    "forget_suspect_keys": Aim(
        ("resync-crash",),
        "a resync target drops log records the source committed without reporting their keys",
        {"cold_keys": 2048, "cold_fraction": 0.3},  # the survivor rewrites few of them while it is alone
        per_nemesis_s=60.0,
        attempts=8,
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
    aim = AIMED[plant]
    began = time.monotonic()
    summary: dict[str, Any] = {}
    attempts = max(attempts, aim.attempts or 0)
    for attempt in range(1, attempts + 1):
        attempt_seed = seed * 100 + attempt
        config = RunConfig(
            out=out / f"{plant}-{attempt_seed}",
            seed=attempt_seed,
            nemeses=list(aim.nemeses),
            per_nemesis_s=max(per_nemesis_s, aim.per_nemesis_s or 0.0),
            plant=plant,
            site_overrides=aim.sites,
            liveness_bound_s=30.0,  # a plant may break liveness too: don't wait a minute for it
            workload=WorkloadConfig(clients_per_site=3, keys=8, seed=attempt_seed, **aim.workload),
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
        aim = AIMED[plant]
        log(f"{plant}: {', '.join(aim.nemeses)} ({aim.why})")
        results.append(run_plant(plant, out, seed=seed, attempts=attempts, per_nemesis_s=per_nemesis_s, log=log))
    return results
