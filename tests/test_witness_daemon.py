"""The witness daemon: as a real process (arbitration, restart, config errors, signals) and in-process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from replicator.api.witness import PairMode
from replicator.client.errors import ClientError, OutcomeUnknown, Unavailable
from replicator.client.witness import AsyncWitnessClient
from replicator.config import PairSpec, WitnessConfig, WitnessListenConfig, WitnessSection
from replicator.core.messages import WitnessMode
from replicator.core.witness import PairState
from replicator.daemon.witness import STATE_FILE, StateError, StateStore, StoredPair, WitnessDaemon
from replicator.local import free_ports, grpc_health

ROOT = Path(__file__).resolve().parent.parent
PAIR = "pair-1"


def _config(data_dir: Path, grpc_port: int = 0, metrics_port: int = 0, **witness: object) -> WitnessConfig:
    settings = {"preferred_grace_ms": 300, "request_timeout_ms": 3000, "shutdown_stage_timeout_ms": 2000}
    settings.update(witness)
    return WitnessConfig(
        witness=WitnessSection(data_dir=data_dir, **settings),  # type: ignore[arg-type]
        listen=WitnessListenConfig(grpc=f"127.0.0.1:{grpc_port}", metrics=f"127.0.0.1:{metrics_port}"),
        pairs=(PairSpec(id=PAIR, sites=("a", "b"), preferred_site="a"),),
    )


class WitnessProcess:
    """One `python -m replicator.daemon.witness` with its config in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        grpc_port, metrics_port = free_ports(2)
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.metrics = f"127.0.0.1:{metrics_port}"
        self.config_path = directory / "witness.toml"
        self.config_path.write_text(_config(Path("data"), grpc_port, metrics_port).to_toml())
        self.log_path = directory / "witness.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "replicator.daemon.witness", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=self.directory,
            )
        deadline = time.monotonic() + 20
        while grpc_health(self.grpc, timeout_s=0.5) != "SERVING":
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.05)

    def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(10)

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def witness(tmp_path: Path) -> Iterator[WitnessProcess]:
    process = WitnessProcess(tmp_path)
    try:
        process.start()
        yield process
    finally:
        process.close()


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def test_arbitration_survives_sigkill_and_restart(witness: WitnessProcess) -> None:
    async def before_crash() -> None:
        client = AsyncWitnessClient(witness.grpc, timeout_ms=3000)
        try:
            # A fresh witness grants nothing before it knows where the pair is (issue 18): site a
            # reports SYNC epoch 1 with its peer connected.
            states, identity = await client.report(PAIR, "a", 1, holds_grant=False, in_sync=True)
            assert states[0].epoch == 0 and len(identity) == 16  # learning; the witness's id
            granted = await client.arbitrate(PAIR, "a", 1)
            assert (granted.granted, granted.epoch, granted.mode, granted.holder) == (True, 2, PairMode.SOLO, "a")
            again = await client.arbitrate(PAIR, "a", 1)  # idempotent retry by the holder
            assert (again.granted, again.epoch, again.holder) == (True, 2, "a")
            other = await client.arbitrate(PAIR, "b", 1)
            assert (other.granted, other.epoch, other.mode, other.holder) == (False, 2, PairMode.SOLO, "a")
            assert not (await client.mark_synced(PAIR, "b", 2)).granted  # not the holder
            synced = await client.mark_synced(PAIR, "a", 2)
            assert (synced.granted, synced.epoch, synced.mode, synced.holder) == (True, 3, PairMode.SYNC, "")
            assert (await client.mark_synced(PAIR, "a", 2)).epoch == 3  # retry of a MarkSynced that went through
            stale = await client.arbitrate(PAIR, "b", 1)
            assert (stale.granted, stale.epoch) == (False, 3)
            # The non-preferred site is held for the preferred site's grace, then granted.
            started = time.monotonic()
            late = await client.arbitrate(PAIR, "b", 3)
            assert time.monotonic() - started >= 0.25
            assert (late.granted, late.epoch, late.holder) == (True, 4, "b")
            [state] = await client.status(PAIR)
            assert (state.epoch, state.mode, state.holder) == (4, PairMode.SOLO, "b")
        finally:
            await client.close()

    asyncio.run(before_crash())
    text = _scrape(witness.metrics)
    assert 'replicator_witness_pair_epoch{pair="pair-1"} 4' in text
    assert 'replicator_witness_pair_mode{pair="pair-1",mode="SOLO"} 1' in text
    assert 'replicator_witness_requests_total{request="arbitrate",verdict="granted"} 3' in text
    assert 'replicator_witness_requests_total{request="arbitrate",verdict="denied"} 2' in text

    assert witness.signal(signal.SIGKILL) == -signal.SIGKILL
    witness.start()

    async def after_restart() -> None:
        client = AsyncWitnessClient(witness.grpc, timeout_ms=3000)
        try:
            [state] = await client.status(PAIR)
            assert (state.epoch, state.mode, state.holder) == (4, PairMode.SOLO, "b")
            assert (await client.arbitrate(PAIR, "b", 3)).granted
            denied = await client.arbitrate(PAIR, "a", 3)
            assert (denied.granted, denied.epoch, denied.holder) == (False, 4, "b")
        finally:
            await client.close()

    asyncio.run(after_restart())
    assert 'replicator_witness_pair_epoch{pair="pair-1"} 4' in _scrape(witness.metrics)

    events = witness.events()
    granted = [e for e in events if e["event"] == "granted"]
    assert granted[0]["pair"] == PAIR and granted[0]["site"] == "a" and granted[0]["epoch"] == 2
    assert all(e["component"] == "witness" and "ts" in e and "level" in e for e in events)
    assert [e["epoch"] for e in events if e["event"] == "state_changed"] == [1, 2, 3, 4]  # 1: learned, durable
    assert sum(1 for e in events if e["event"] == "started") == 2


def test_sigterm_is_a_staged_graceful_shutdown(witness: WitnessProcess) -> None:
    assert witness.signal(signal.SIGTERM) == 0
    events = witness.events()
    names = [e["event"] for e in events]
    assert names[-1] == "stopped" and "signal" in names
    stages = [e["stage"] for e in events if e["event"] == "shutdown_stage"]
    assert stages == ["grpc", "flush_state", "tasks", "metrics", "release_lock"]


def test_second_witness_on_the_same_data_dir_is_refused(witness: WitnessProcess, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    grpc_port, metrics_port = free_ports(2)
    other.write_text(_config(tmp_path / "data", grpc_port, metrics_port).to_toml())
    result = subprocess.run(
        [sys.executable, "-m", "replicator.daemon.witness", "--config", str(other)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert result.returncode == 1
    assert "in use by another witness" in result.stderr


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[witness]\ndata_dri = "d"\n', "witness.data_dri: unknown key (did you mean data_dir?)"),
        ('[witness]\ndata_dir = "d"\npreferred_grace_ms = -1\n', "witness.preferred_grace_ms: must be"),
        ('[witness]\ndata_dir = "d"\n[[pairs]]\nid = "p"\nsites = ["a", "a"]\n', "pairs[0].sites"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "witness.toml"
    path.write_text(body)
    result = subprocess.run(
        [sys.executable, "-m", "replicator.daemon.witness", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith("replicator-witness: bad configuration")


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "replicator.daemon.witness", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert result.returncode == 2 and "cannot read" in result.stderr


# ------------------------------------------------------------------ in-process


def test_state_store_round_trip_and_corruption_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "w")
    assert store.open() == {}
    pairs = {"p": StoredPair(PairState(5, WitnessMode.SOLO, "b"), ("a", "b"))}
    store.write(pairs)
    with pytest.raises(StateError, match="in use by another witness"):
        StateStore(tmp_path / "w").open()
    store.close()
    again = StateStore(tmp_path / "w")
    assert again.open() == pairs
    again.close()
    path = tmp_path / "w" / STATE_FILE
    path.write_text(path.read_text().replace('"epoch": 5', '"epoch": 6'))
    with pytest.raises(StateError, match="checksum mismatch"):
        StateStore(tmp_path / "w").open()
    path.write_text("{")
    with pytest.raises(StateError, match="corrupt witness state"):
        StateStore(tmp_path / "w").open()


async def _health(address: str, service: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _run(config: WitnessConfig, scenario) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        daemon = WitnessDaemon(config)
        await daemon.start()
        client = AsyncWitnessClient(daemon.grpc_address, timeout_ms=3000)
        try:
            if PAIR in daemon.core.fresh:  # type: ignore[union-attr]
                await client.report(PAIR, "a", 1, holds_grant=False, in_sync=True)  # the pair is SYNC 1
            await scenario(daemon, client)
        finally:
            await client.close()
            await daemon.shutdown()

    asyncio.run(main())


def test_undeclared_pair_is_learned_first_come_first_served(tmp_path: Path) -> None:
    async def scenario(daemon: WitnessDaemon, client: AsyncWitnessClient) -> None:
        assert (await client.arbitrate("pair-x", "q", 1)).granted  # no grace for a pair without preferred site
        assert not (await client.arbitrate("pair-x", "r", 1)).granted
        intruder = await client.arbitrate("pair-x", "s", 2)  # a third name
        assert (intruder.granted, intruder.epoch) == (False, 0)
        assert (await client.mark_synced("pair-x", "q", 2)).epoch == 3
        assert (await client.arbitrate("pair-x", "r", 3)).granted
        assert await _health(daemon.grpc_address, "") == "SERVING"
        assert await _health(daemon.grpc_address, "replicator.v1.WitnessService") == "SERVING"

    _run(_config(tmp_path / "data"), scenario)
    store = StateStore(tmp_path / "data")
    stored = store.open()
    store.close()
    assert stored["pair-x"] == StoredPair(PairState(4, WitnessMode.SOLO, "r"), ("q", "r"))
    assert stored[PAIR].state == PairState()

    async def after(daemon: WitnessDaemon, client: AsyncWitnessClient) -> None:  # learned sites survive
        assert not (await client.arbitrate("pair-x", "s", 4)).granted
        assert (await client.arbitrate("pair-x", "r", 3)).granted

    _run(_config(tmp_path / "data"), after)


def test_request_timeout_is_deadline_exceeded_and_grant_still_lands(tmp_path: Path) -> None:
    async def scenario(daemon: WitnessDaemon, client: AsyncWitnessClient) -> None:
        with pytest.raises(OutcomeUnknown) as caught:
            await client.arbitrate(PAIR, "b", 1)  # held 600 ms, timeout 200 ms
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.6)
        retry = await client.arbitrate(PAIR, "b", 1)
        assert (retry.granted, retry.epoch) == (True, 2)
        assert daemon.m_timeouts.value("arbitrate") == 1

    _run(_config(tmp_path / "data", preferred_grace_ms=600, request_timeout_ms=200), scenario)


def test_storage_failure_is_fail_stop(tmp_path: Path) -> None:
    async def scenario(daemon: WitnessDaemon, client: AsyncWitnessClient) -> None:
        def broken(pairs: object) -> None:
            raise OSError(28, "No space left on device")

        daemon.store.write = broken  # type: ignore[method-assign]
        with pytest.raises(ClientError):
            await client.arbitrate(PAIR, "a", 1)
        assert daemon.failed.is_set()
        with pytest.raises(Unavailable):
            await client.arbitrate(PAIR, "a", 1)
        assert daemon.status(PAIR)[0].epoch == 1  # nothing durable, nothing shown

    _run(_config(tmp_path / "data"), scenario)
