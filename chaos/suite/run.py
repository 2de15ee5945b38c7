"""One chaos run: bring up, workload, nemeses (each alone, then a random mix), heal, check, report."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos.checkers.verdict import Verdict, combine
from chaos.suite import analysis, nemeses, report
from chaos.suite.harness import SITES, WITNESS, Deployment, HarnessError
from chaos.suite.workload import Workload, WorkloadConfig, read_state

SMOKE_NEMESES = ("kill", "partition-blackhole", "fsync-fail")
SYNC_POINT_IDLE_S = 30.0  # how long the clients may take to finish what they do when paused
SYNC_POINT_SETTLE_S = 5.0  # how long the sites may differ after SYNC before it counts (the peer's apply lags)


@dataclass
class RunConfig:
    out: Path
    seed: int = 1
    nemeses: list[str] = field(default_factory=lambda: list(SMOKE_NEMESES))  # each alone, in order
    per_nemesis_s: float = 0.0  # repeat each nemesis until this long (at least one episode)
    mix_s: float = 0.0  # then random combinations for this long
    mix_nemeses: list[str] = field(default_factory=lambda: list(nemeses.NEMESES))
    combine_max: int = 2
    hold_min_s: float = 2.0
    hold_max_s: float = 5.0
    settle_s: float = 1.5
    warmup_s: float = 2.0
    liveness_bound_s: float = 60.0
    plant: str = ""
    plant_sites: tuple[str, ...] = SITES
    site_overrides: dict[str, dict[str, int]] = field(default_factory=dict)  # [site] settings per site
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    client_proxies: bool = True  # False: clients talk to the sites directly (no client-link faults)
    command: str = ""  # how to run it again (printed on failure)

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["out"] = str(self.out)
        return document


class _Stop(Exception):
    pass


class Runner:
    def __init__(self, config: RunConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        self.clock = time.monotonic_ns
        self.rng = random.Random(config.seed)
        self.episodes: list[dict[str, Any]] = []
        self.liveness: list[dict[str, Any]] = []
        self.divergences: list[dict[str, Any]] = []  # sync points where the sites differed
        self.harness_errors: list[str] = []
        self.deployment: Deployment | None = None
        self.workload: Workload | None = None
        if not config.command:
            config.command = default_command(config)

    # ------------------------------------------------------------ episodes
    def _hold_s(self) -> float:
        return self.rng.uniform(self.config.hold_min_s, self.config.hold_max_s)

    def _episode(self, group: list[nemeses.Nemesis]) -> None:
        d = self.deployment
        assert d is not None
        names = [n.name for n in group]
        episode: dict[str, Any] = {"index": len(self.episodes), "nemeses": names, "start_ns": self.clock()}
        self.log(f"[{episode['index']:3d}] {' + '.join(names)}: " + "; ".join(
            json.dumps({k: v for k, v in n.describe().items() if k != "nemesis"}) for n in group))
        try:
            for nemesis in group:
                nemesis.inject(d)
            holders = [threading.Thread(target=n.hold, args=(d,), daemon=True) for n in group]
            for holder in holders:
                holder.start()
            for holder in holders:
                holder.join(self.config.hold_max_s + 120)
        finally:
            episode["healed_start_ns"] = self.clock()
            for nemesis in reversed(group):
                nemesis.stop.set()
                nemesis.heal(d)
        episode["healed_ns"] = self.clock()
        episode["details"] = [n.describe() for n in group]
        restarted = d.check_processes(self.clock())
        if restarted:
            episode["unexpected_exits"] = restarted
            self.log(f"      unexpected exit of {restarted}: restarted")
        try:
            took = d.wait_sync(self.config.liveness_bound_s)
            episode["synced_ns"] = self.clock()
            episode["sync_after_heal_ms"] = round(took * 1000, 1)
        except HarnessError as error:
            episode["synced_ns"] = None
            episode["sync_after_heal_ms"] = None
            self.liveness.append({"episode": episode["index"], "nemeses": names, "error": str(error)})
            self.log(f"      LIVENESS: {error}")
            self.episodes.append(episode)
            episode["end_ns"] = self.clock()
            raise _Stop() from None
        self._sync_point(episode)
        time.sleep(self.config.settle_s)
        episode["end_ns"] = self.clock()
        self.episodes.append(episode)
        self.log(f"      healed, SYNC {episode['sync_after_heal_ms']:.0f} ms after healing; {episode['sync_point']}")

    def _sync_point(self, episode: dict[str, Any]) -> None:
        """Right after the pair is back in SYNC: pause the clients, then both sites must hold the same data.

        The final comparison alone misses a divergence that later writes overwrite (a small key space
        is rewritten within a second); this catches it where it appears, as the simulator's sync-point
        check does. The pause is left out of the episode's RTO.
        """
        d, workload = self.deployment, self.workload
        if d is None or workload is None:
            return
        paused = self.clock()
        try:
            if not workload.pause(SYNC_POINT_IDLE_S):
                episode["sync_point"] = "not checked: clients still busy"
                return
            episode["sync_point"] = self._compare_sites(d, workload.keys(), episode["index"])
        finally:
            workload.resume()
            episode["paused_ns"] = [paused, self.clock()]

    def _compare_sites(self, d: Deployment, keys: list[str], index: int) -> str:
        deadline = time.monotonic() + SYNC_POINT_SETTLE_S
        states: dict[str, dict[str, Any]] = {}
        while True:
            try:
                d.wait_sync(SYNC_POINT_SETTLE_S)
                states = {site: read_state(d.direct[site], keys) for site in SITES}
                if states["a"] == states["b"]:
                    return f"sites identical ({len(states['a'])} keys)"
            except Exception as error:  # noqa: BLE001 - left SYNC or unreadable: not a verdict
                if time.monotonic() >= deadline:
                    return f"not checked: {type(error).__name__}: {error}"
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        differing = sorted(k for k in set(states["a"]) | set(states["b"]) if states["a"].get(k) != states["b"].get(k))
        self.divergences.append(
            {
                "episode": index,
                "keys": {k: {site: states[site].get(k) for site in SITES} for k in differing[:20]},
                "differing": len(differing),
            }
        )
        self.log(f"      DIVERGED at the sync point: {len(differing)} key(s) differ, e.g. {differing[:3]}")
        return f"DIVERGED: {len(differing)} key(s) differ"

    def _phases(self) -> None:
        config = self.config
        for name in config.nemeses:
            began = time.monotonic()
            while True:
                self._episode([nemeses.make(name, self.rng, self._hold_s())])
                if time.monotonic() - began >= config.per_nemesis_s:
                    break
        if config.mix_s > 0:
            began = time.monotonic()
            while time.monotonic() - began < config.mix_s:
                group: list[nemeses.Nemesis] = []
                wanted = self.rng.randint(1, max(1, config.combine_max))
                for _ in range(10 * wanted):
                    if len(group) >= wanted:
                        break
                    candidate = nemeses.make(self.rng.choice(config.mix_nemeses), self.rng, self._hold_s())
                    if nemeses.compatible(group, candidate):
                        group.append(candidate)
                self._episode(group)

    # ------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        config = self.config
        out = Path(config.out).resolve()
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        started = time.monotonic()
        finals: dict[str, dict[str, Any]] | None = None
        d = Deployment(out / "deploy", seed=config.seed, plant=config.plant, plant_sites=config.plant_sites,
                       site_overrides=config.site_overrides,
                       clock=self.clock)
        self.deployment = d
        run_start = self.clock()
        try:
            d.bring_up(config.liveness_bound_s)
            self.log(f"deployment up in {out / 'deploy'} (plant: {config.plant or 'none'})")
            endpoints = d.client_endpoints if config.client_proxies else d.direct
            self.workload = Workload(endpoints, config.workload, clock=self.clock)
            run_start = self.clock()
            self.workload.start()
            time.sleep(config.warmup_s)
            try:
                self._phases()
            except _Stop:
                pass
            except (HarnessError, Exception) as error:  # noqa: BLE001 - report it, then judge what we have
                self.harness_errors.append(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
                self.log(f"harness error: {error}")
            # Heal everything, restart whatever is down, wait for SYNC, let the clients see it.
            assert d.hub is not None
            d.hub.heal_all(cut=False)
            for site in SITES:
                d.storage_fault(site, "")
                d.clock_offset(site, 0)
                d.resume(site)
            d.expected_down.clear()
            for name in (WITNESS, *SITES):
                if not d.running(name):
                    d.start(name, wait=name == WITNESS)
            final_heal = self.clock()
            try:
                took = d.wait_sync(config.liveness_bound_s)
                self.log(f"final heal: SYNC after {took:.1f} s")
            except HarnessError as error:
                self.liveness.append({"episode": "final", "error": str(error)})
            time.sleep(config.settle_s)
        except Exception as error:  # noqa: BLE001
            self.harness_errors.append(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
            self.log(f"harness error: {error}")
            final_heal = self.clock()
        finally:
            if self.workload is not None:
                self.workload.stop()
        run_end = self.clock()
        try:
            if not self.liveness and not self.harness_errors:
                finals = self._final_states(d)
        finally:
            d.close()
        logs = {name: d.log_events(name) for name in (WITNESS, *SITES)}
        return self._judge(out, d, logs, finals, run_start, run_end, final_heal, time.monotonic() - started)

    def _final_states(self, d: Deployment) -> dict[str, dict[str, Any]] | None:
        """Both sites' full data once idle and SYNC; re-read while they differ (the peer's apply lags the ack).

        A pair that cannot be read in SYNC within the liveness bound is a liveness violation.
        """
        keys = self.workload.keys() if self.workload else []
        finals: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + self.config.liveness_bound_s
        last_error = ""
        while time.monotonic() < deadline:
            try:
                d.wait_sync(max(1.0, deadline - time.monotonic()))
                finals = {site: read_state(d.direct[site], keys) for site in SITES}
            except Exception as error:  # noqa: BLE001 - left SYNC meanwhile: wait again
                last_error = f"{type(error).__name__}: {error}"
                time.sleep(0.5)
                continue
            if finals["a"] == finals["b"]:
                return finals
            time.sleep(0.5)
        if finals:
            return finals  # they differ: the convergence checker says how
        self.liveness.append({"episode": "final", "error": f"no final state could be read in SYNC: {last_error}"})
        return None

    def _judge(
        self,
        out: Path,
        d: Deployment,
        logs: dict[str, list[dict[str, Any]]],
        finals: dict[str, dict[str, Any]] | None,
        run_start: int,
        run_end: int,
        final_heal: int,
        wall_s: float,
    ) -> dict[str, Any]:
        workload = self.workload
        history = workload.history if workload is not None else None
        samples = workload.snapshot_samples() if workload is not None else []
        events = analysis.site_events(logs)
        verdicts: list[Verdict] = []
        if history is not None:
            verdicts = analysis.run_checkers(history, finals, events)
        sync_points = sync_point_verdict(self.episodes, self.divergences)
        liveness = _verdict(
            "liveness",
            "; ".join(str(x["error"]) for x in self.liveness),
            f"the pair was back in SYNC within {self.config.liveness_bound_s:.0f} s after every heal",
            {"failures": self.liveness},
        )
        exits = _verdict(
            "process_exits",
            f"{len(d.unexpected_exits)} process exit(s) no nemesis caused" if d.unexpected_exits else "",
            "no process exited unless a nemesis made it",
            {"exits": d.unexpected_exits},
        )
        verdicts += [sync_points, liveness, exits]
        for episode in self.episodes:
            episode["metrics"] = analysis.episode_metrics(episode, samples, logs)
        verdict = combine("chaos", verdicts)
        # A violation found is the answer even if the harness also failed; then a harness error.
        verdict_status = verdict.status
        if self.harness_errors and verdict.status != "violation":
            verdict_status = "error"
        ops = [s for s in samples]
        acknowledged = sum(1 for s in ops if s.status == "ok" and s.f != "read")
        summary = {
            "status": verdict_status,
            "passed": verdict_status == "ok",
            "seed": self.config.seed,
            "plant": self.config.plant or None,
            "rerun": self.config.command,
            "duration_s": round(wall_s, 1),
            "workload_s": round((run_end - run_start) / 1e9, 1),
            "operations": {
                "total": len(ops),
                "ok": sum(s.status == "ok" for s in ops),
                "fail": sum(s.status == "fail" for s in ops),
                "info": sum(s.status == "info" for s in ops),
                "reads": sum(s.f == "read" for s in ops),
                "writes": sum(s.f == "write" for s in ops),
                "deletes": sum(s.f == "delete" for s in ops),
                "acknowledged_writes": acknowledged,
                "errors": dict(workload.errors) if workload else {},
            },
            "faults": {"episodes": len(self.episodes), "injections": sum(len(e["nemeses"]) for e in self.episodes)},
            "per_nemesis": analysis.per_nemesis(self.episodes),
            "checks": [v.to_dict() for v in verdicts],
            "harness_errors": self.harness_errors,
            "episodes": self.episodes,
            "role_changes": sum(1 for e in events if e["event"] == "state"),
            "grants": sum(1 for e in events if e["event"] == "grant"),
            "commits_logged": sum(1 for e in events if e["event"] == "commit"),
            "proxies": d.hub.stats() if d.hub is not None else {},
            "config": self.config.to_dict(),
            "time_origin_ns": run_start,
            "final_heal_ns": final_heal,
        }
        report.write(out, summary, history, finals, events, samples, d)
        return summary


def sync_point_verdict(episodes: list[dict[str, Any]], divergences: list[dict[str, Any]]) -> Verdict:
    """Convergence at the sync points: a violation if the sites differed at one; unknown, not ok, if
    there were episodes and not one sync point could be checked (clients never idle, the pair never back
    in SYNC): a run that compared nothing has shown nothing."""
    checked = sum(1 for e in episodes if str(e.get("sync_point", "")).startswith("sites identical"))
    details = {"divergences": divergences, "checked": checked, "episodes": len(episodes)}
    if divergences:
        message = f"the sites differed at {len(divergences)} sync point(s) after a heal"
        return Verdict(checker="convergence_at_sync_points", status="violation", message=message, details=details)
    if episodes and not checked:
        reasons = sorted({str(e.get("sync_point", "none")) for e in episodes})
        message = f"no sync point of {len(episodes)} episode(s) could be checked: {'; '.join(reasons)[:500]}"
        return Verdict(checker="convergence_at_sync_points", status="unknown", message=message, details=details)
    message = f"the sites were identical at every sync point checked ({checked} of {len(episodes)})"
    return Verdict(checker="convergence_at_sync_points", status="ok", message=message, details=details)


def _verdict(checker: str, violation: str, ok: str, details: dict[str, Any]) -> Verdict:
    """A verdict of the run itself: a violation when `violation` says what went wrong, else ok."""
    return Verdict(checker=checker, status="violation" if violation else "ok", message=violation or ok,
                   details=details)


def default_command(config: RunConfig) -> str:
    """A command line that replays this run's fault schedule (the seed decides it)."""
    parts = [f"python -m chaos run --seed {config.seed} --out {config.out}"]
    parts.append(f"--nemeses {','.join(config.nemeses) or 'none'}")
    if config.per_nemesis_s:
        parts.append(f"--per-nemesis {config.per_nemesis_s:g}")
    if config.mix_s:
        parts.append(f"--mix {config.mix_s:g} --combine {config.combine_max}")
    parts.append(f"--hold {config.hold_min_s:g}:{config.hold_max_s:g}")
    parts.append(f"--clients {config.workload.clients_per_site} --keys {config.workload.keys}")
    parts.append(f"--liveness-bound {config.liveness_bound_s:g}")
    if config.plant:
        parts.append(f"--plant {config.plant} --plant-sites {','.join(config.plant_sites)}")
    for site, settings in sorted(config.site_overrides.items()):
        parts += [f"--site-setting {site}.{name}={value}" for name, value in sorted(settings.items())]
    return " ".join(parts)


def run(config: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    return Runner(config, log).run()
