"""A local deployment for the chaos suite: the launcher's witness and two sites, a fault proxy on every link.

Links (proxy names):

    site        a dials b's log-shipping port through it (UP = a -> b)
    witness-a   site a -> witness gRPC          witness-b   site b -> witness gRPC
    client-a    workload clients -> a's gRPC    client-b    workload clients -> b's gRPC

The harness itself (status polls, final reads) talks to the sites directly, so
a fault never blinds the observer. Each site gets a storage fault control file
(REPLICATOR_STORAGE_FAULTS=DIR/faults-<site>) and, when a plant is asked for,
`[chaos] test_plant` in its configuration and REPLICATOR_CHAOS=1 in its
environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from chaos.suite.proxies import ProxyHub
from replicator.client import Client, RetryPolicy
from replicator.config import CHAOS_ENVIRONMENT_VARIABLE, load_site_config
from replicator.daemon.clock import CLOCK_ENVIRONMENT_VARIABLE
from replicator.local import LocalCluster
from replicator.storage.faults import CONTROL_ENVIRONMENT_VARIABLE

SITES = ("a", "b")
WITNESS = "witness"
LINKS = ("site", "witness-a", "witness-b", "client-a", "client-b")
STATUS_RETRY = RetryPolicy(attempts_max=1, call_timeout_ms=1000)


class HarnessError(Exception):
    """The deployment could not be brought to the state a step needs (not a checker verdict)."""


class ChaosCluster(LocalCluster):
    """LocalCluster with a per-process environment (storage fault file, REPLICATOR_CHAOS)."""

    def __init__(self, directory: Path, environment_for: Callable[[str], dict[str, str]], **options: Any) -> None:
        super().__init__(directory, **options)
        self._environment_for = environment_for
        self._starting: str | None = None

    def start_process(self, name: str, wait: bool = True) -> int:
        self._starting = name
        try:
            return super().start_process(name, wait)
        finally:
            self._starting = None

    def _environment(self) -> dict[str, str]:
        environment = super()._environment()
        for variable in (CONTROL_ENVIRONMENT_VARIABLE, CHAOS_ENVIRONMENT_VARIABLE):
            environment.pop(variable, None)
        if self._starting is not None:
            environment.update(self._environment_for(self._starting))
        return environment


def _parse_ts(text: str) -> int:
    """A log line's wall-clock timestamp as Unix nanoseconds."""
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)


class Deployment:
    def __init__(
        self,
        directory: Path,
        *,
        seed: int = 0,
        plant: str = "",
        plant_sites: Iterable[str] = SITES,
        clock: Callable[[], int] = time.monotonic_ns,
        site_overrides: dict[str, dict[str, int]] | None = None,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.seed = seed
        self.plant = plant
        self.plant_sites = tuple(plant_sites) if plant else ()
        self.clock = clock
        # [site] settings that differ from the launcher's, per site (e.g. asymmetric timeouts).
        self.site_overrides = site_overrides or {}
        # wall clock (logs) -> the run's monotonic clock (history)
        self.wall_offset_ns = time.time_ns() - clock()
        self.cluster = ChaosCluster(
            self.directory, self._environment_for, health_timeout_s=30.0, stop_timeout_s=5.0
        )
        self.hub: ProxyHub | None = None
        self.direct: dict[str, str] = {}
        self.client_endpoints: dict[str, str] = {}
        self.paused: set[str] = set()
        self.expected_down: set[str] = set()
        self.unexpected_exits: list[dict[str, Any]] = []

    # ------------------------------------------------------------ set-up
    def fault_file(self, site: str) -> Path:
        return self.directory / f"faults-{site}"

    def clock_file(self, site: str) -> Path:
        return self.directory / f"clock-{site}"

    def _environment_for(self, name: str) -> dict[str, str]:
        if name not in SITES:
            return {}
        environment = {
            CONTROL_ENVIRONMENT_VARIABLE: str(self.fault_file(name)),
            CLOCK_ENVIRONMENT_VARIABLE: str(self.clock_file(name)),
        }
        if name in self.plant_sites:
            environment[CHAOS_ENVIRONMENT_VARIABLE] = "1"
        return environment

    def bring_up(self, sync_timeout_s: float = 60.0) -> None:
        """Configure, put the proxies in place, start everything, wait for SYNC."""
        self.directory.mkdir(parents=True, exist_ok=True)
        cluster = self.cluster
        cluster.configure()
        self.hub = ProxyHub()
        witness_host, witness_port = cluster.processes[WITNESS].grpc.rsplit(":", 1)
        configs = {site: load_site_config(cluster.config_path(site)) for site in SITES}
        link_host, link_port = configs["b"].listen.link.rsplit(":", 1)
        self.hub.add("site", (link_host, int(link_port)), self.seed * 10 + 1)
        for index, site in enumerate(SITES):
            self.hub.add(f"witness-{site}", (witness_host, int(witness_port)), self.seed * 10 + 2 + index)
            grpc_host, grpc_port = configs[site].listen.grpc.rsplit(":", 1)
            self.hub.add(f"client-{site}", (grpc_host, int(grpc_port)), self.seed * 10 + 4 + index)
            self.direct[site] = configs[site].listen.grpc
            self.client_endpoints[site] = self.hub.address(f"client-{site}")
        for site in SITES:
            path = cluster.config_path(site)
            text = path.read_text()
            if site == "a":  # a dials b (the lower name dials)
                text = re.sub(r'(?m)^peer_address = "[^"]*"', f'peer_address = "{self.hub.address("site")}"', text)
            text = re.sub(r'(?m)^address = "[^"]*"', f'address = "{self.hub.address(f"witness-{site}")}"', text)
            text = re.sub(r"(?ms)^\[chaos\].*?(?=^\[|\Z)", "", text)
            for name, value in self.site_overrides.get(site, {}).items():
                text, count = re.subn(rf"(?m)^{re.escape(name)} = .*$", f"{name} = {int(value)}", text, count=1)
                if count != 1:
                    raise HarnessError(f"site {site}: no setting {name!r} in {path} to override")
            text = text.rstrip("\n") + "\n\n[chaos]\nlog_commits = true\n"  # split-brain rule 3
            if site in self.plant_sites:
                text += f'test_plant = "{self.plant}"\n'
            path.write_text(text)
            # Prove it loads as the daemon will load it.
            load_site_config(path, environ=self._environment_for(site))
            self.fault_file(site).write_text("")
            self.clock_file(site).write_text("")
        cluster._write_cluster()
        cluster.start_process(WITNESS, wait=True)
        for site in SITES:
            cluster.start_process(site, wait=False)
        for site in SITES:
            cluster.wait_healthy(site)
        self.wait_sync(sync_timeout_s)

    # ------------------------------------------------------------ observation
    def status(self, site: str) -> tuple[str, int] | None:
        if site in self.paused or not self.cluster.is_running(site):
            return None
        try:
            with Client([self.direct[site]], retry=STATUS_RETRY) as client:
                status = client.status()
            return status.state, status.epoch
        except Exception:  # noqa: BLE001 - starting, stopped, overloaded: no status now
            return None

    def in_sync(self) -> bool:
        states = [self.status(site) for site in SITES]
        return all(s is not None and s[0] == "SYNC" for s in states) and states[0] == states[1]

    def wait_sync(self, timeout_s: float) -> float:
        """Seconds until both sites are SYNC in the same epoch; HarnessError after timeout_s."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.in_sync():
                return time.monotonic() - started
            time.sleep(0.1)
        states = {site: self.status(site) for site in SITES}
        raise HarnessError(f"the pair was not back in SYNC within {timeout_s:.0f} s: {states}")

    def running(self, name: str) -> bool:
        return self.cluster.is_running(name)

    def check_processes(self, now_ns: int) -> list[str]:
        """Restart every process that exited without a nemesis asking for it; returns their names."""
        restarted = []
        for name in (WITNESS, *SITES):
            if name in self.expected_down or name in self.paused or self.running(name):
                continue
            process = self.cluster.processes[name]
            code = process.popen.poll() if process.popen is not None else None
            self.unexpected_exits.append({"process": name, "time": now_ns, "exit_code": code})
            restarted.append(name)
            self.start(name)
        return restarted

    # ------------------------------------------------------------ faults
    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        self.expected_down.add(name)
        self.resume(name)
        self.cluster.kill(name, signum)

    def start(self, name: str, wait: bool = True) -> None:
        """(Re)start a process that is down."""
        if self.running(name):
            self.expected_down.discard(name)
            return
        self.cluster.stop_process(name, 1.0)  # reap
        self.cluster.start_process(name, wait=wait)
        self.expected_down.discard(name)

    def pause(self, site: str) -> None:
        if self.cluster.send_signal(site, signal.SIGSTOP):
            self.paused.add(site)

    def resume(self, site: str) -> None:
        if site in self.paused:
            self.cluster.send_signal(site, signal.SIGCONT)
            self.paused.discard(site)

    def data_dir(self, site: str) -> Path:
        data = load_site_config(self.cluster.config_path(site), environ=self._environment_for(site)).site.data_dir
        return Path(data) if Path(data).is_absolute() else self.directory / data

    def copy_data(self, site: str, to: Path) -> None:
        """Copy a (stopped) site's data directory, as a backup would."""
        assert not self.running(site), "copy a site's data only while it is down"
        shutil.rmtree(to, ignore_errors=True)
        shutil.copytree(self.data_dir(site), to, symlinks=True)

    def restore_data(self, site: str, source: Path) -> None:
        """Put an older copy back in place of a (stopped) site's data directory."""
        assert not self.running(site), "restore a site's data only while it is down"
        shutil.rmtree(self.data_dir(site), ignore_errors=True)
        shutil.copytree(source, self.data_dir(site), symlinks=True)

    def wipe(self, site: str) -> None:
        """Delete a (stopped) site's data directory."""
        assert not self.running(site), "wipe a site only while it is down"
        data = load_site_config(self.cluster.config_path(site), environ=self._environment_for(site)).site.data_dir
        path = Path(data) if Path(data).is_absolute() else self.directory / data
        shutil.rmtree(path, ignore_errors=True)

    def storage_fault(self, site: str, words: str) -> None:
        """Write the site's storage fault control file (empty: no fault)."""
        path = self.fault_file(site)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(words + "\n" if words else "")
        os.replace(temporary, path)

    def clock_offset(self, site: str, offset_ms: int) -> None:
        """Step the site's wall clock to `offset_ms` from the real time (0: back to true time)."""
        path = self.clock_file(site)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(f"{int(offset_ms)}\n")
        os.replace(temporary, path)

    def proxy(self, name: str, control: Callable[[Any], Any]) -> Any:
        assert self.hub is not None
        return self.hub.call(name, control)

    # ------------------------------------------------------------ logs
    def log_path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def log_events(self, name: str) -> list[dict[str, Any]]:
        """Every JSON line of a process's log, with "mono" (the run's clock, ns) added."""
        events = []
        with contextlib.suppress(OSError), self.log_path(name).open(encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if not line.startswith("{"):
                    continue
                try:
                    event = json.loads(line)
                    event["mono"] = _parse_ts(event["ts"]) - self.wall_offset_ns
                except (ValueError, KeyError, TypeError):
                    continue
                events.append(event)
        return events

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        for site in list(self.paused):
            self.resume(site)
        with contextlib.suppress(Exception):
            self.cluster.stop()
        if self.hub is not None:
            self.hub.close()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
