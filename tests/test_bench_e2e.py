"""The end-to-end benchmark's own machinery (benchmarks/e2e): load generator, CPU accounting, report.

Fast enough for `make test` on 2 cores without etcd or Redis: one short load run against a real
Replicator pair (witness + two site daemons on loopback), the rest on made-up numbers.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from benchmarks.e2e import report
from benchmarks.e2e.__main__ import matrix, parse_args
from benchmarks.e2e.cpu import CpuSampler, cpu_delta, cpu_per_op_us, cpu_seconds
from benchmarks.e2e.loadgen import default_processes, latency_summary_ms, percentile, prefill_count, run_load
from benchmarks.e2e.replicator_system import ReplicatorSystem
from replicator.local import site_daemon_available

# ---------------------------------------------------------------- percentiles and CPU


def test_percentile_is_nearest_rank() -> None:
    samples = list(range(1, 101))  # 1..100
    assert percentile(samples, 50) == 50
    assert percentile(samples, 99) == 99
    assert percentile(samples, 99.9) == 100
    assert percentile(samples, 100) == 100
    assert percentile(samples, 0) == 1
    assert percentile([7], 99) == 7
    assert percentile(list(range(1, 1001)), 99.9) == 999
    with pytest.raises(ValueError):
        percentile(samples, 101)


def test_latency_summary_is_exact_at_a_microsecond() -> None:
    # 1000 samples: 990 of 1.00 ms, 9 of 5.00 ms, one of 20.01 ms (in ns, shuffled)
    samples = [1_000_000] * 990 + [5_000_000] * 9 + [20_010_000]
    samples = samples[::3] + samples[1::3] + samples[2::3]
    summary = latency_summary_ms(samples)
    assert summary["p50"] == 1.0
    assert summary["p99"] == 1.0  # the 990th sample
    assert summary["p999"] == 5.0  # the 999th
    assert summary["max"] == 20.01
    assert summary["min"] == 1.0
    assert summary["mean"] == pytest.approx((990 * 1.0 + 9 * 5.0 + 20.01) / 1000, abs=0.001)
    # 0.01 ms apart stay apart
    assert latency_summary_ms([1_230_000, 1_240_000])["p50"] == 1.23
    assert latency_summary_ms([])["p50"] is None


def test_cpu_accounting_reads_proc() -> None:
    own = cpu_seconds(os.getpid())
    assert own is not None and own > 0
    assert cpu_seconds(2**22 + 12345) is None  # no such process
    sampler = CpuSampler({"me": os.getpid(), "gone": 2**22 + 12345})
    before = sampler.sample()
    sum(i * i for i in range(300_000))
    used = cpu_delta(before, sampler.sample())
    assert used["me"] is not None and used["me"] >= 0 and used["gone"] is None
    per_op = cpu_per_op_us({"a": 0.5, "b": 0.25, "gone": None}, 1000)
    assert per_op == {"a": 500.0, "b": 250.0, "gone": None, "total": 750.0}
    assert cpu_per_op_us({"a": 0.5}, 0)["total"] is None


def test_worker_processes_and_prefill_sizes() -> None:
    assert default_processes(1) == 1
    assert 1 <= default_processes(32) <= 2
    assert prefill_count("get", 4096, 10_000) == 1024
    assert prefill_count("get", 1 << 20, 10_000) == 16
    assert prefill_count("block_read", 65536, 10_000, slots=100) == 100


def test_matrix_and_arguments() -> None:
    quick = matrix(["replicator", "replicator-single", "etcd", "raw"], quick=True)
    assert {r.system for r in quick} == {"replicator", "replicator-single", "etcd"}
    assert any(r.op == "block_write" and r.value_size == 1 << 20 for r in quick if r.system == "replicator")
    assert not any(r.op.startswith("block") for r in quick if r.system == "etcd")
    full = matrix(["replicator", "etcd"], quick=False)
    puts = {(r.value_size, r.concurrency) for r in full if r.system == "etcd" and r.op == "put"}
    assert puts == {(s, c) for s in (1024, 4096, 65536) for c in (1, 8, 32, 128, 256)}
    assert any(r.placement == "one" for r in full if r.system == "replicator")
    production = matrix(["replicator-production"], quick=False)
    assert {(r.op, r.value_size, r.concurrency) for r in production} == {("put", 4096, c) for c in (1, 8, 32, 128, 256)}
    assert {r.concurrency for r in matrix(["replicator-production"], quick=True)} == {1, 32}
    args = parse_args(["--quick"])
    assert args.seconds == 2.0 and args.warmup == 0.5


# ---------------------------------------------------------------- the load generator on a real pair


@pytest.fixture(scope="module")
def replicator_pair(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if not site_daemon_available():
        pytest.skip("the site daemon is not built")
    system = ReplicatorSystem(tmp_path_factory.mktemp("bench-pair") / "cluster", volume_size_bytes=64 << 20)
    try:
        system.start()
        yield system
    finally:
        system.stop()


@pytest.mark.timeout(90)
def test_load_generator_against_the_replicator_pair(replicator_pair: ReplicatorSystem) -> None:
    assert replicator_pair.wait_ready() == "ready"
    pids = replicator_pair.processes()
    assert set(pids) == {"witness", "a", "b"}
    result = run_load(
        replicator_pair.driver_spec("both"), "put", 4096, concurrency=4, seconds=1.0, warmup_s=0.3,
        keys=200, server_pids=pids,
    )
    assert result.errors == 0, result.error_messages
    assert result.ops > 0 and result.ops_per_s > 0 and result.mb_per_s > 0
    assert result.processes == 2
    assert result.latency_ms["p50"] is not None and 0 < result.latency_ms["p50"] <= result.latency_ms["p99"]
    assert len(result.loadgen_cpu_s) == 2 and all(c > 0 for c in result.loadgen_cpu_s)
    assert set(result.server_cpu_s) == {"witness", "a", "b"}
    assert result.server_cpu_s["a"] is not None and result.server_cpu_s["b"] is not None
    assert result.server_cpu_us_per_op["total"] is not None and result.server_cpu_us_per_op["total"] > 0
    assert result.event_loop in ("uvloop", "asyncio")


@pytest.mark.timeout(90)
def test_load_generator_reads_what_the_prefill_wrote(replicator_pair: ReplicatorSystem) -> None:
    spec = replicator_pair.driver_spec("one")
    result = run_load(spec, "get", 1024, concurrency=2, seconds=0.5, warmup_s=0.1, keys=32, processes=1)
    assert result.errors == 0, result.error_messages
    assert result.ops > 0 and result.prefilled == 32
    blocks = run_load(spec, "block_read", 65536, concurrency=2, seconds=0.5, warmup_s=0.1, keys=16, processes=1)
    assert blocks.errors == 0, blocks.error_messages
    assert blocks.ops > 0 and blocks.prefilled == 16 and blocks.mb_per_s > 0


@pytest.mark.timeout(60)
def test_errors_are_reported_not_hidden(replicator_pair: ReplicatorSystem) -> None:
    # A key space the prefill never wrote: every get is "not found", which a read run counts as an error.
    spec = replicator_pair.driver_spec("both")
    result = run_load(spec, "get", 512, concurrency=1, seconds=0.3, warmup_s=0.0, keys=8, prefill=False)
    assert result.errors > 0 and result.ops == 0
    assert any("not found" in message for message in result.error_messages)


# ---------------------------------------------------------------- the report


def _fake_run(series: str, op: str, size: int, c: int, ops_per_s: float, p50: float, p99: float) -> dict:
    system, placement = ("replicator", "one") if series == report.ONE_SITE else (series, "both")
    result = {
        "op": op, "value_size": size, "concurrency": c, "processes": 1 if c == 1 else 2, "seconds": 5.0,
        "warmup_s": 1.0, "ops": int(ops_per_s * 5), "ops_per_s": ops_per_s, "mb_per_s": ops_per_s * size / 1e6,
        "latency_ms": {"min": p50 / 2, "mean": p50, "p50": p50, "p90": p99 / 2, "p99": p99, "p999": p99 * 2,
                       "max": p99 * 3},
        "errors": 0, "error_messages": [], "loadgen_cpu_s": [1.0], "loadgen_cpu_share": [0.2],
        "loadgen_saturated": False, "server_cpu_s": {"a": 1.0, "b": 1.0},
        "server_cpu_us_per_op": {"a": 100.0, "b": 90.0, "total": 190.0},
    }
    return report.run_record(system, placement, result, load_avg=1.0)


def _fake_results() -> dict:
    results = report.new_results(["python", "-m", "benchmarks.e2e"], {"seconds": 5.0, "warmup_s": 1.0})
    for c, scale in ((1, 1), (8, 6), (32, 15), (128, 20)):
        results["runs"] += [
            _fake_run("replicator", "put", 4096, c, 400 * scale, 0.9 + c / 50, 2.0 + c / 10),
            _fake_run(report.ONE_SITE, "put", 4096, c, 380 * scale, 0.9 + c / 50, 2.1 + c / 10),
            _fake_run("replicator-single", "put", 4096, c, 500 * scale, 0.7 + c / 50, 1.5 + c / 10),
            _fake_run("etcd", "put", 4096, c, 150 * scale, 2.0 + c / 20, 6.0 + c / 5),
        ]
    results["runs"].append(_fake_run("replicator", "block_write", 1 << 20, 8, 60, 120.0, 300.0))
    results["runs"].append(report.run_record("redis", "both", None, message="LoadGenError: boom",
                                             op="put", value_size=4096, concurrency=32))
    results["systems"] = {"replicator": {"status": "ok", "version": "0.1.0"},
                          "redis": {"status": "not available", "message": "redis-server: not installed"}}
    results["raw"] = [{"value_size": 1 << 20, "status": "ok", "ops_per_s": 100.0, "mb_per_s": 104.9,
                       "p50_ms": 8.0, "p99_ms": 12.0, "cpu_s": 1.2}]
    results["recovery"] = {"failover": {"median_rto_ms": 1234.5, "rto_ms": [1200.0, 1234.5, 1300.0]},
                           "failover_production": {"median_rto_ms": 3100.0, "rto_ms": [2900.0, 3100.0, 3300.0]},
                           "resync": {"status": "not measured", "message": "skipped"}}
    return results


def test_goals_are_evaluated_from_the_same_run() -> None:
    goals = {g["id"]: g for g in report.evaluate_goals(_fake_results())}
    assert goals["put_vs_etcd"]["ratio"] == pytest.approx(6000 / 2250, abs=0.001)
    assert goals["put_vs_etcd"]["status"] == "pass"  # 2.67x and p99 5.2 < 12.4 ms
    assert goals["put_vs_redis"]["status"] == "not measured"  # the redis run failed
    assert goals["block_vs_raw"]["ratio"] == pytest.approx((60 * (1 << 20) / 1e6) / 104.9, abs=0.001)
    assert goals["block_vs_raw"]["status"] == "pass"
    assert goals["replication_cost"]["ratio"] == pytest.approx(6000 / 7500, abs=0.001)
    assert goals["replication_cost"]["status"] == "pass"
    assert goals["c1_latency"]["ratio"] == pytest.approx(0.2, abs=0.001)
    assert goals["c1_latency"]["status"] == "pass"
    assert goals["failover_rto"]["ratio"] == pytest.approx(1.2345, abs=0.001)
    assert goals["failover_rto"]["status"] == "pass"
    assert goals["failover_rto_production"]["ratio"] == pytest.approx(3.1, abs=0.001)
    assert goals["failover_rto_production"]["status"] == "miss"  # 3.1 s against < 3 s


def test_report_writes_json_markdown_and_png(tmp_path: Path) -> None:
    results = _fake_results()
    written = report.write_report(results, tmp_path / "out")
    loaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert loaded["schema"] == report.SCHEMA
    assert loaded["machine"]["cpu_count"] == os.cpu_count()
    assert len(loaded["goals"]) == 7 and len(loaded["runs"]) == len(results["runs"])
    markdown = written["markdown"].read_text()
    assert "## Goals" in markdown and "| c |" in markdown and "× etcd" in markdown
    assert "not available" in markdown and "failed" in markdown
    assert "![put 4 KiB](plots/put-4096.png)" in markdown
    assert written["plot_error"] is None
    summary = written["summary"].read_text()
    assert "## " not in summary and "| goal |" in summary and "plots/put-4096.png" in summary
    names = sorted(p.name for p in written["plots"])
    assert names == ["block_write-1048576.png", "put-4096.png"]
    for path in written["plots"]:
        head = path.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width > 400 and height > 200


def test_replicator_driver_spreads_coroutines_over_both_sites() -> None:
    import asyncio

    from benchmarks.e2e.common import DriverSpec
    from benchmarks.e2e.loadgen import CLIENT_TASK_PREFIX
    from benchmarks.e2e.replicator_system import ReplicatorDriver

    a, b = "127.0.0.1:1", "127.0.0.1:2"  # never called: only which client a coroutine gets

    async def first_sites(placement: str, worker: int, coroutines: int) -> list[str]:
        driver = ReplicatorDriver(DriverSpec("replicator", (a, b), {"placement": placement}), worker)

        async def first() -> str:
            return str(driver._client().endpoints[0])

        try:
            tasks = [asyncio.create_task(first(), name=f"{CLIENT_TASK_PREFIX}{n}") for n in range(coroutines)]
            return list(await asyncio.gather(*tasks))
        finally:
            await driver.close()

    assert asyncio.run(first_sites("both", 0, 4)) == [a, b, a, b]
    assert asyncio.run(first_sites("both", 1, 4)) == [b, a, b, a]
    assert asyncio.run(first_sites("both", 0, 1)) == [a]  # c=1 starts at a, as "one" does
    assert asyncio.run(first_sites("one", 1, 3)) == [a, a, a]


def test_no_incidents_while_the_pair_is_idle(replicator_pair: ReplicatorSystem) -> None:
    assert "peer_timeout_ms" in replicator_pair.settings()
    mark = replicator_pair.mark()
    assert set(mark) == {"a", "b", "witness"} and mark["a"] > 0
    assert replicator_pair.incidents_since(mark) == []
    assert any("SYNC" in line for line in replicator_pair.incidents_since({"a": 0, "b": 0}))  # the start-up
