"""Daemon helpers: the Prometheus registry and HTTP server, structured logs, staged shutdown."""

from __future__ import annotations

import asyncio
import enum
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from replicator.daemon import logs
from replicator.daemon.metrics import CONTENT_TYPE, REQUEST_BYTES_MAX, Registry, start_metrics_server
from replicator.daemon.runner import Shutdown

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ registry


def test_counter_gauge_histogram_render() -> None:
    registry = Registry()
    requests = registry.counter("app_requests_total", "Requests by verdict", ("verdict",))
    requests.labels("granted").inc()
    requests.labels(verdict="granted").inc(2)
    requests.labels(verdict="denied").inc()
    up = registry.gauge("app_up", "Up")
    up.set(1)
    latency = registry.histogram("app_seconds", "Latency", buckets=(0.1, 1.0))
    for value in (0.05, 0.5, 5.0):
        latency.observe(value)
    text = registry.render()
    assert "# HELP app_requests_total Requests by verdict\n# TYPE app_requests_total counter\n" in text
    assert 'app_requests_total{verdict="denied"} 1\n' in text
    assert 'app_requests_total{verdict="granted"} 3\n' in text
    assert "# TYPE app_up gauge\napp_up 1\n" in text
    assert 'app_seconds_bucket{le="0.1"} 1\n' in text
    assert 'app_seconds_bucket{le="1"} 2\n' in text
    assert 'app_seconds_bucket{le="+Inf"} 3\n' in text
    assert "app_seconds_sum 5.55\n" in text
    assert "app_seconds_count 3\n" in text
    assert text.endswith("\n")


def test_label_escaping_enums_and_errors() -> None:
    class Mode(enum.Enum):
        SOLO = 2

    registry = Registry()
    gauge = registry.gauge("g", "help with \\ and\nnewline", ("a", "b"))
    gauge.labels('quote " back \\ nl \n', Mode.SOLO).set(1.5)
    text = registry.render()
    assert "# HELP g help with \\\\ and\\nnewline\n" in text
    assert 'g{a="quote \\" back \\\\ nl \\n",b="SOLO"} 1.5\n' in text
    with pytest.raises(ValueError):
        registry.gauge("g", "duplicate")
    with pytest.raises(ValueError):
        gauge.labels("only one")
    with pytest.raises(ValueError):
        gauge.set(1)  # labelled metric used without labels
    with pytest.raises(ValueError):
        registry.counter("bad-name", "x")
    with pytest.raises(ValueError):
        registry.counter("c", "x").inc(-1)
    with pytest.raises(ValueError):
        registry.histogram("h", "x", ("le",))


def test_collectors_run_before_render_and_series_can_be_removed() -> None:
    registry = Registry()
    gauge = registry.gauge("pair_epoch", "Epoch", ("pair",))
    state = {"p1": 3}
    registry.add_collector(lambda: [gauge.labels(k).set(v) for k, v in state.items()])
    assert 'pair_epoch{pair="p1"} 3' in registry.render()
    state["p1"] = 4
    assert 'pair_epoch{pair="p1"} 4' in registry.render()
    gauge.remove("p1")
    state.clear()
    assert "pair_epoch{" not in registry.render()


# ------------------------------------------------------------------ HTTP server


async def _http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_metrics_server_serves_metrics_and_health() -> None:
    async def scenario() -> None:
        registry = Registry()
        registry.counter("hits_total", "Hits").inc(7)
        healthy = {"ok": True}
        server = await start_metrics_server(registry, "127.0.0.1:0", health=lambda: healthy["ok"])
        try:
            assert server.address == f"127.0.0.1:{server.port}"
            status, headers, body = await _http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200
            assert headers["Content-Type"] == CONTENT_TYPE
            assert int(headers["Content-Length"]) == len(body)
            assert b"hits_total 7\n" in body
            assert (await _http(server.port, b"GET /healthz HTTP/1.0\r\n\r\n"))[0] == 200
            healthy["ok"] = False
            assert (await _http(server.port, b"GET /healthz HTTP/1.0\r\n\r\n"))[0] == 503
            assert (await _http(server.port, b"GET /nope HTTP/1.0\r\n\r\n"))[0] == 404
            assert (await _http(server.port, b"POST /metrics HTTP/1.0\r\n\r\n"))[0] == 405
            assert (await _http(server.port, b"garbage\r\n\r\n"))[0] == 400
            status, headers, body = await _http(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
            assert status == 200 and body == b""
            huge = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (REQUEST_BYTES_MAX + 10) + b"\r\n\r\n"
            assert (await _http(server.port, huge))[0] == 431
        finally:
            await server.stop()

    asyncio.run(scenario())


# ------------------------------------------------------------------ logs


def test_log_writes_one_json_line_with_converted_fields() -> None:
    class Verdict(enum.Enum):
        GRANTED = "g"

    stream = io.StringIO()
    logs.configure("witness", site="w1", stream=stream, level="info")
    try:
        logs.log("granted", pair="pair-1", key=b"\x01\xff", verdict=Verdict.GRANTED, path=Path("/x"), n=3)
        logs.log("hidden", level="debug")
        logs.log("oops", level="error", event="collides", site="a", error=ValueError("bad"))
    finally:
        logs.configure("", stream=None, level="info")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first)[:5] == ["ts", "level", "component", "site", "event"]
    assert first["level"] == "info" and first["component"] == "witness" and first["site"] == "w1"
    assert first["event"] == "granted"
    assert (first["pair"], first["key"], first["verdict"], first["path"], first["n"]) == (
        "pair-1",
        "01ff",
        "GRANTED",
        "/x",
        3,
    )
    assert first["ts"].endswith("Z")
    assert second["event"] == "oops" and second["event_"] == "collides" and second["site_"] == "a"
    assert second["error"] == "ValueError: bad"


# ------------------------------------------------------------------ runner


def test_shutdown_runs_every_stage_even_after_timeout_and_error() -> None:
    ran: list[str] = []

    async def ok() -> None:
        ran.append("ok")

    async def slow() -> None:
        ran.append("slow")
        await asyncio.sleep(10)

    async def broken() -> None:
        ran.append("broken")
        raise RuntimeError("boom")

    stream = io.StringIO()
    logs.configure("test", stream=stream)
    try:
        shutdown = Shutdown([("first", ok, 1.0), ("slow", slow, 0.05)])
        shutdown.add("broken", broken, 1.0)
        shutdown.add("last", ok, 1.0)
        clean = asyncio.run(shutdown.run())
    finally:
        logs.configure("", stream=None)
    assert clean is False
    assert ran == ["ok", "slow", "broken", "ok"]
    assert [(name, outcome) for name, outcome, _ in shutdown.outcomes] == [
        ("first", "ok"),
        ("slow", "timeout"),
        ("broken", "error"),
        ("last", "ok"),
    ]
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    stages = [e for e in events if e["event"] == "shutdown_stage"]
    assert [s["stage"] for s in stages] == ["first", "slow", "broken", "last"]
    assert stages[1]["level"] == "warning" and stages[1]["duration_ms"] < 1000
    assert "boom" in stages[2]["error"]
    assert events[-1]["event"] == "shutdown_done" and events[-1]["clean"] is False


def test_run_sets_stop_on_sigterm_and_returns_the_exit_code() -> None:
    program = textwrap.dedent(
        """
        import asyncio, sys
        from replicator.daemon.runner import Shutdown, run

        async def amain(stop):
            print(type(asyncio.get_running_loop()).__module__, flush=True)
            await stop.wait()
            async def stage():
                print("stage ran", flush=True)
            await Shutdown([("one", stage, 1.0)]).run()
            return 7

        sys.exit(run(amain))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert process.stdout is not None
        loop_module = process.stdout.readline().strip()
        assert loop_module.startswith("uvloop")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 7
    assert "stage ran" in stdout
    events = [json.loads(line) for line in stderr.splitlines()]
    assert [e["event"] for e in events] == ["signal", "shutdown_stage", "shutdown_done"]
    assert events[0]["signal"] == "SIGTERM"
