"""Unit tests of the operator-facing pieces (issue 19): health classification, resync progress, the
event bus, log rate limiting, the readiness endpoint, the link's clean goodbye, the defaults that must
agree with each other."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from support import wait_for

from replicator import framing
from replicator.api.backend import DEGRADED, HEALTHY, NOT_SERVING, SiteStatus, health_of
from replicator.client import RetryPolicy
from replicator.client.retry import Outcome, RetryPlan, Step
from replicator.config import SiteSection, WitnessClientConfig, WitnessSection
from replicator.core import messages as msg
from replicator.daemon import logs
from replicator.daemon.metrics import Registry, start_metrics_server
from replicator.daemon.ops import EventBus, ResyncProgress
from replicator.daemon.wire import Decoder, Encoder


def status(**changes: object) -> SiteStatus:
    fields: dict[str, object] = {
        "site": "a",
        "peer": "b",
        "state": "SYNC",
        "epoch": 3,
        "peer_reachable": True,
        "witness_reachable": True,
    }
    fields.update(changes)
    return SiteStatus(**fields)  # type: ignore[arg-type]


def test_health_levels() -> None:
    assert health_of(status()) == (HEALTHY, [])
    level, reasons = health_of(status(state="SOLO", peer_reachable=False))
    assert level == DEGRADED and any("peer b unreachable" in r for r in reasons)
    assert health_of(status(witness_reachable=False))[0] == DEGRADED
    assert health_of(status(state="RESYNC_SOURCE"))[0] == DEGRADED  # serves, without a second copy yet
    for state in ("SUSPENDED", "FENCED", "STARTING", "RESYNC_TARGET"):
        level, reasons = health_of(status(state=state, state_reason="peer silent"))
        assert level == NOT_SERVING and "peer silent" in reasons[0]
    assert health_of(status(draining=True))[0] == NOT_SERVING
    assert not status(draining=True).serving and status(state="RESYNC_SOURCE").serving


def test_resync_progress_rate_and_eta() -> None:
    progress = ResyncProgress()
    assert not progress.active and progress.rate() == 0.0
    progress.begin("incremental", 100, now=10.0)
    progress.set_remaining(60)
    assert (progress.done, progress.total) == (40, 100)
    assert progress.rate(now=12.0) == 20.0 and progress.eta_s(now=12.0) == 3.0
    progress.set_remaining(70)  # keys joined the dirty set: the total grows, done never goes back
    assert (progress.done, progress.total) == (40, 110)
    progress.begin("full", 0, now=0.0)
    progress.advance(500)
    assert (progress.done, progress.total) == (500, 500)
    progress.end()
    assert not progress.active


def test_event_bus_keeps_history_and_follows() -> None:
    async def scenario() -> list[str]:
        bus = EventBus(history_max=3, queue_max=2)
        for i in range(5):
            bus.on_log({"event": "role", "n": i})
        bus.on_log({"event": "commit"})  # not an operator event
        history = [line async for line in bus.follow(history=True, follow=False)]
        assert [json.loads(line)["n"] for line in history] == [2, 3, 4]
        stream = bus.follow(history=False)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        bus.on_log({"event": "verify", "differing": 0})
        for i in range(3):  # the follower's queue holds 2: two of these are lost, and it is told so
            bus.on_log({"event": "role", "n": 10 + i})
        got = [await first]
        got += [await asyncio.wait_for(stream.__anext__(), 5) for _ in range(2)]
        bus.on_log({"event": "role", "n": 20})
        got.append(await asyncio.wait_for(stream.__anext__(), 5))
        await stream.aclose()
        assert not bus.followers
        return got

    got = [json.loads(line) for line in asyncio.run(scenario())]
    assert got[0]["event"] == "verify"
    assert got[1]["n"] == 10
    assert got[2] == {"event": "events_lost", "count": 2, "reason": "the follower fell behind"}
    assert got[3]["n"] == 20
    assert [g["seq"] for g in got if "seq" in g] == sorted(g["seq"] for g in got if "seq" in g)


def test_repeated_log_events_are_rate_limited_with_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(logs, "_repeats", {})
    logs.configure("test", "a", stream=stream)
    seen: list[dict[str, object]] = []
    logs.add_listener(seen.append)
    try:
        for _ in range(100):
            logs.log("witness_failed", level="warning", request="Arbitrate", error="Deadline Exceeded")
            logs.log("role", old="SYNC", new="SUSPENDED")  # never limited
        clock[0] += logs.REPEAT_WINDOW_S
        logs.log("witness_failed", level="warning", request="Arbitrate", error="Deadline Exceeded")
    finally:
        logs.remove_listener(seen.append)
        logs.configure("", "", stream=None)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [line for line in lines if line["event"] == "witness_failed"]
    assert len(failed) == logs.REPEATS_MAX + 1
    assert failed[-1]["suppressed"] == 100 - logs.REPEATS_MAX
    assert len([line for line in lines if line["event"] == "role"]) == 100
    assert len(seen) == len(lines)  # listeners see what the log shows


def test_readyz_beside_healthz() -> None:
    async def scenario() -> list[tuple[int, bytes]]:
        ready = [False]
        server = await start_metrics_server(
            Registry(), "127.0.0.1:0", health=lambda: True, ready=lambda: (ready[0], "why: SUSPENDED")
        )
        try:
            answers = []
            for path, flip in (("/healthz", False), ("/readyz", False), ("/readyz", True)):
                if flip:
                    ready[0] = True
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                reply = await reader.read()
                writer.close()
                head, _, body = reply.partition(b"\r\n\r\n")
                answers.append((int(head.split()[1]), body))
            return answers
        finally:
            await server.stop()

    answers = asyncio.run(scenario())
    assert answers[0] == (200, b"ok\n")
    assert answers[1] == (503, b"why: SUSPENDED\n")
    assert answers[2][0] == 200


def test_a_clean_link_close_is_not_a_stale_epoch() -> None:
    """The link's GOODBYE has a frame type of its own: the core never sees it (its code 1 used to
    decode as the core's STALE_EPOCH)."""
    decoder = Decoder(pair="pair", peer="b")
    out = bytearray()
    framing.encode_link_goodbye(out, 7, 1, "closing")  # what Link.close sends
    assert decoder.decode(framing.decode_frame(bytes(out))) is None
    (frame,) = Encoder("b").encode(msg.Goodbye(7, msg.GoodbyeReason.STALE_EPOCH, "stale epoch"))
    decoded = decoder.decode(framing.decode_frame(bytes(frame)))
    assert isinstance(decoded, msg.Goodbye) and decoded.reason is msg.GoodbyeReason.STALE_EPOCH


def test_default_witness_deadline_outlasts_the_preferred_sites_grace() -> None:
    assert WitnessClientConfig().timeout_ms > WitnessSection.__dataclass_fields__["preferred_grace_ms"].default


def test_default_retry_budget_outlasts_the_default_failover() -> None:
    """The client's retries (with the least jitter) last longer than a failover with the defaults:
    peer_timeout + the preferred site's grace + a witness round trip (docs/operations.md)."""
    site = SiteSection.__dataclass_fields__
    grace_ms = WitnessSection.__dataclass_fields__["preferred_grace_ms"].default
    failover_ms = site["peer_timeout_ms"].default + grace_ms + 500
    policy = RetryPolicy()
    plan = RetryPlan(policy, 2, write=True, random=lambda: 0.0)  # the least jitter: 0.5
    least = plan.start().delay_s
    while (decision := plan.record(Outcome.UNREACHABLE)).step is Step.CALL:
        least += decision.delay_s
    # The plan draws a jitter in [0.5, 1.0]: the budget's floor is half of the no-jitter sum.
    no_jitter = sum(
        min(policy.backoff_ms_max, policy.backoff_initial_ms * 2 ** (rounds - 1))
        for rounds in range(1, policy.attempts_max - 1)
    )
    assert no_jitter / 2 > failover_ms, (no_jitter, failover_ms)
    assert least * 1000 >= no_jitter / 2


def test_grpc_server_certificates_rotate_without_a_restart(tmp_path: Path) -> None:
    """certificates.md: new files in place are used for new connections; a set that does not belong
    together is refused and the previous one stays."""
    import os
    import shutil

    from replicator import tlsutil
    from replicator.api.fake import FakeBackend, ServerThread
    from replicator.client import Client, ClientError, RetryPolicy
    from replicator.config import TlsFiles

    def pki(name: str) -> Path:
        directory = tmp_path / name
        ca = tlsutil.make_ca(directory)
        tlsutil.make_certificate(directory, "server", ca)
        tlsutil.make_certificate(directory, "client", ca, server=False)
        return directory

    old, new = pki("old"), pki("new")
    live = tmp_path / "live"
    live.mkdir()

    def install(source: Path, cert: str = "server", key: str = "server") -> None:
        for name, target in (("ca.pem", "ca.pem"), (f"{cert}.pem", "server.pem"), (f"{key}.key", "server.key")):
            shutil.copy(source / name, live / f".{target}")
            os.replace(live / f".{target}", live / target)  # by rename, as a rotation should

    def works(directory: Path) -> bool:
        tls = TlsFiles(directory / "ca.pem", directory / "client.pem", directory / "client.key")
        try:
            with Client([address], tls=tls, retry=RetryPolicy(attempts_max=1, call_timeout_ms=3000)) as client:
                client.status()
        except ClientError:
            return False
        return True

    install(old)
    with ServerThread() as thread:
        address = thread.start_site(FakeBackend(), None, TlsFiles(live / "ca.pem", live / "server.pem", live / "server.key"))
        assert works(old) and not works(new)
        install(new)
        # gRPC may hold the refused attempt's connection in its reconnect back-off for a moment
        # (subchannels are shared across channels in a process): a few tries, not one.
        wait_for(lambda: works(new), 20, "a connection with the new CA")
        assert not works(old)
        # A certificate with another's key: refused, the new set stays in use.
        shutil.copy(old / "client.key", live / "server.key")
        assert works(new)
