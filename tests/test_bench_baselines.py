"""The end-to-end benchmark's baselines: raw RocksDB, etcd and Redis on loopback (benchmarks/e2e/baselines.py).

The etcd and Redis tests need the binaries and the redis client (`make tools-bench`, a
dependency of `make test`, installs them; so does `python -m benchmarks.e2e.baselines install
etcd|redis`); the tests never install anything. Without them a test skips, and under CI=true
it fails: a missing tool never turns CI's run into a skip.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.e2e import baselines
from benchmarks.e2e.common import DriverSpec, SystemUnavailable, open_driver

ROOT = Path(__file__).resolve().parent.parent
REDIS_CLIENT = importlib.util.find_spec("redis") is not None

ETCD_MISSING = (
    "etcd is not installed (make tools-bench, apt-get install -y etcd-server, "
    "or python -m benchmarks.e2e.baselines install etcd)"
    if baselines.find_binary("etcd") is None
    else ""
)
REDIS_MISSING = (
    "redis-server or the redis Python client is missing (make tools-bench)"
    if baselines.find_binary("redis") is None or not REDIS_CLIENT
    else ""
)


def require(missing: str) -> None:
    """Skip when a tool is missing, or fail under CI=true (where `make test` installed it)."""
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {missing}")
        pytest.skip(missing)


def _gone(pid: int) -> bool:
    """True once `pid` is no running process (a zombie counts as gone: it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_raw_rocksdict_gives_sane_numbers(tmp_path: Path) -> None:
    directory = tmp_path / "raw"
    result = baselines.raw_rocksdict(directory, value_size=4096, seconds=0.3, threads=2)
    assert result["ops"] > 0
    assert 0.3 <= result["seconds"] < 5
    assert result["ops_per_s"] == pytest.approx(result["ops"] / result["seconds"])
    assert result["mb_per_s"] == pytest.approx(result["ops"] * 4096 / result["seconds"] / 1e6)
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["cpu_s"] > 0
    assert not directory.exists() or not any(directory.iterdir()), "the database is destroyed afterwards"


def test_raw_rocksdict_command_prints_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.e2e.baselines", "raw", "--value-size", "1024", "--seconds", "0.2",
         "--dir", str(tmp_path / "raw")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ops"] > 0 and result["value_size"] == 1024


def test_etcd_proto_is_wire_compatible() -> None:
    pb2, pb2_grpc = baselines.etcd_modules()
    # etcd's field numbers: PutRequest key=1 value=2, RangeRequest serializable=7, KeyValue value=5
    assert pb2.PutRequest(key=b"k", value=b"v").SerializeToString() == b"\x0a\x01k\x12\x01v"
    assert pb2.RangeRequest(key=b"k", serializable=True).SerializeToString() == b"\x0a\x01k\x38\x01"
    answer = pb2.RangeResponse.FromString(b"\x12\x05\x2a\x03abc")
    assert [kv.value for kv in answer.kvs] == [b"abc"]
    assert hasattr(pb2_grpc, "KVStub")


def test_wait_answer_below_the_replicas_raises() -> None:
    assert baselines.check_wait_answer(1) == 1
    assert baselines.check_wait_answer(2, replicas=2) == 2
    for bad in (0, -1, None, b"1", True):
        with pytest.raises(baselines.ReplicaNotAcknowledged):
            baselines.check_wait_answer(bad)


class _Pipeline:
    def __init__(self, answers: list[object]) -> None:
        self.answers = answers
        self.commands: list[tuple[object, ...]] = []

    async def __aenter__(self) -> _Pipeline:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    def set(self, key: str, value: bytes) -> None:
        self.commands.append(("SET", key, value))

    def wait(self, replicas: int, timeout_ms: int) -> None:
        self.commands.append(("WAIT", replicas, timeout_ms))

    async def execute(self) -> list[object]:
        return self.answers


class _Client:
    def __init__(self, answers: list[object]) -> None:
        self.pipe = _Pipeline(answers)

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        assert not transaction
        return self.pipe


def test_redis_put_raises_when_the_replica_did_not_acknowledge() -> None:
    driver = object.__new__(baselines.RedisDriver)  # no server: only put's handling of the answers
    driver._replicas, driver._wait_timeout_ms = 1, 0
    driver._client = _Client([True, 0])
    with pytest.raises(baselines.ReplicaNotAcknowledged):
        asyncio.run(driver.put("k", b"v"))
    assert driver._client.pipe.commands == [("SET", "k", b"v"), ("WAIT", 1, 0)]
    driver._client = _Client([True, 1])
    asyncio.run(driver.put("k", b"v"))


def test_failed_start_raises_unavailable_and_stop_is_safe(tmp_path: Path) -> None:
    cluster = baselines.EtcdCluster(tmp_path, binary="/bin/false", start_timeout_s=5)
    with pytest.raises(SystemUnavailable, match="exited"):
        cluster.start()
    assert cluster.processes() == {}
    cluster.stop()
    cluster.stop()


async def _round_trip(spec: DriverSpec, workers: int) -> None:
    drivers = [await open_driver(spec, worker) for worker in range(workers)]
    try:
        for worker, driver in enumerate(drivers):
            await driver.put(f"key-{worker}", b"value-%d" % worker)
        for worker in range(workers):  # read each key through another worker's driver
            assert await drivers[(worker + 1) % workers].get(f"key-{worker}") == b"value-%d" % worker
        assert await drivers[0].get("missing") is None
    finally:
        for driver in drivers:
            await driver.close()


@pytest.mark.timeout(60)
def test_etcd_cluster_round_trip_and_stop(tmp_path: Path) -> None:
    require(ETCD_MISSING)
    cluster = baselines.EtcdCluster(tmp_path, install=False)
    try:
        cluster.start()
        pids = cluster.processes()
        assert sorted(pids) == ["etcd-1", "etcd-2", "etcd-3"]
        assert cluster.version().startswith("etcd 3.")
        spec = cluster.driver_spec("both")
        assert spec.kind == "etcd" and len(spec.endpoints) == 3
        assert all(endpoint.startswith("127.0.0.1:") for endpoint in spec.endpoints)
        assert cluster.driver_spec("one").endpoints == spec.endpoints[:1]
        asyncio.run(_round_trip(spec, workers=3))
    finally:
        cluster.stop()
    assert all(_gone(pid) for pid in pids.values())
    assert cluster.processes() == {}
    cluster.stop()


@pytest.mark.timeout(60)
def test_redis_pair_round_trip_and_stop(tmp_path: Path) -> None:
    require(REDIS_MISSING)
    import redis

    pair = baselines.RedisPair(tmp_path, install=False)
    try:
        pair.start()
        pids = pair.processes()
        assert sorted(pids) == ["redis-primary", "redis-replica"]
        spec = pair.driver_spec("both")
        assert spec.kind == "redis" and pair.driver_spec("one").endpoints == spec.endpoints
        host, port = spec.endpoints[0].split(":")
        assert host == "127.0.0.1"
        with redis.Redis(host=host, port=int(port)) as primary:
            assert primary.config_get("appendfsync") == {"appendfsync": "always"}
            assert primary.config_get("save") == {"save": ""}
        asyncio.run(_round_trip(spec, workers=2))
    finally:
        pair.stop()
    assert all(_gone(pid) for pid in pids.values())
    assert pair.processes() == {}
    pair.stop()


def test_placement_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        baselines.RedisPair(tmp_path).driver_spec("three")
    with pytest.raises(RuntimeError):
        baselines.EtcdCluster(tmp_path).driver_spec("both")



def test_services_are_held_back_during_an_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(baselines, "POLICY_RC_D", policy)
    with baselines._services_held_back():  # none there: one refusing every start, removed afterwards
        assert subprocess.run([str(policy), "redis-server", "start"]).returncode == 101
    assert not policy.exists()
    policy.write_text("#!/bin/sh\nexit 0\n")
    policy.chmod(0o750)
    with baselines._services_held_back():  # one that allows starts: replaced for the install, then restored
        assert subprocess.run([str(policy), "etcd", "start"]).returncode == 101
    assert policy.read_text() == "#!/bin/sh\nexit 0\n" and policy.stat().st_mode & 0o777 == 0o750
