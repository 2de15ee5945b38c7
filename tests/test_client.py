"""The client library against fake sites served by real grpc.aio servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from replicator.api.admission import admitted
from replicator.api.fake import FakeBackend, FakeStore, FakeWitnessBackend, ServerThread, fake_pair
from replicator.api.server import start_site_server, start_witness_server
from replicator.api.witness import PairMode
from replicator.client import (
    AsyncClient,
    AsyncWitnessClient,
    Client,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    Overloaded,
    Refused,
    RetryPolicy,
    Unavailable,
)
from replicator.client._common import RequestIds
from replicator.client.retry import Outcome, RetryPlan
from replicator.config import ApiConfig, TlsFiles

FAST_RETRY = RetryPolicy(attempts_max=4, backoff_initial_ms=1, backoff_ms_max=5, call_timeout_ms=5000)


@pytest.fixture(params=[True, False], ids=["multiplexed", "unary"])
def multiplex(request: pytest.FixtureRequest) -> bool:
    """Both modes of the clients: calls over the site's session stream, or one unary gRPC call each."""
    return bool(request.param)


@pytest.fixture
def servers() -> Iterator[ServerThread]:
    with ServerThread() as thread:
        yield thread


def test_objects_roundtrip_through_both_sites(servers: ServerThread, multiplex: bool) -> None:
    a, b, address_a, address_b = fake_pair(servers)
    with Client([address_a, address_b], retry=FAST_RETRY, multiplex=multiplex) as client:
        ts = client.put("photos", "cat.jpg", b"meow")
        assert ts > 0
        assert client.get("photos", "cat.jpg") == b"meow"
        assert client.head("photos", "cat.jpg").size_bytes == 4
        client.delete("photos", "cat.jpg")
        with pytest.raises(NotFound):
            client.get("photos", "cat.jpg")
        client.put_batch("photos", {"a": b"1", "b": b"2"})
        assert a.store.records_applied == 3


def test_list_follows_pagination(servers: ServerThread) -> None:
    backend = FakeBackend("a")
    address = servers.start_site(backend, ApiConfig(list_page_size_max=7))
    with Client([address]) as client:
        client.put_many("bk", [(f"key-{i:03}", b"") for i in range(50)])
        client.put("other", "key-x", b"")
        assert client.list("bk") == [f"key-{i:03}" for i in range(50)]
        assert client.list("bk", prefix="key-01") == [f"key-{i:03}" for i in range(10, 20)]
        assert client.list("empty") == []


def test_fails_over_when_a_site_cannot_serve(servers: ServerThread, multiplex: bool) -> None:
    a, b, address_a, address_b = fake_pair(servers)
    a.available = False
    with Client([address_a, address_b], retry=FAST_RETRY, multiplex=multiplex) as client:
        client.put("bk", "k", b"v")
        assert b.store.versions[b"obk\x00k"].value == b"v"
        assert client.get("bk", "k") == b"v"
        assert a.writes_seen == 1 and b.writes_seen == 1
        # The client stays on the site that answered.
        client.put("bk", "k2", b"v")
        assert a.writes_seen == 1 and b.writes_seen == 2


def test_fails_over_when_a_site_is_down(servers: ServerThread, multiplex: bool) -> None:
    a, b, address_a, address_b = fake_pair(servers)
    servers.stop_site(address_a)
    with Client([address_a, address_b], retry=FAST_RETRY, multiplex=multiplex) as client:
        client.put("bk", "k", b"v")
        assert client.get("bk", "k") == b"v"
        assert client.status().site == "b"


def test_retry_after_unknown_outcome_applies_the_write_once(servers: ServerThread, multiplex: bool) -> None:
    a, b, address_a, address_b = fake_pair(servers)
    a.unknown_after_apply = 1  # a applies the write, then answers DEADLINE_EXCEEDED
    with Client([address_a, address_b], retry=FAST_RETRY, multiplex=multiplex) as client:
        client.put("bk", "k", b"v")
    # The outcome was unknown, the site alive: retried at the SAME site (the
    # original may still be on its way to the other one), with the same
    # request id: applied once.
    assert a.writes_seen == 2 and b.writes_seen == 0
    assert a.store.records_applied == 1


def test_single_site_client_never_talks_to_another(servers: ServerThread, multiplex: bool) -> None:
    a, b, address_a, _ = fake_pair(servers)
    a.available = False
    with Client([address_a], retry=FAST_RETRY, multiplex=multiplex) as client:
        with pytest.raises(Unavailable) as caught:
            client.put("bk", "k", b"v")
    assert "cannot serve" in caught.value.message and "4 attempts" in caught.value.message
    assert a.writes_seen == FAST_RETRY.attempts_max and b.writes_seen == 0
    assert a.store.records_applied == 0


def test_unknown_outcome_after_every_retry_is_reported(servers: ServerThread, multiplex: bool) -> None:
    backend = FakeBackend("a")
    backend.unknown_after_apply = 100
    address = servers.start_site(backend)
    with Client([address], retry=FAST_RETRY, multiplex=multiplex) as client, pytest.raises(OutcomeUnknown):
        client.put("bk", "k", b"v")
    assert backend.store.records_applied == 1


def test_a_refusal_after_a_timeout_still_reports_the_outcome_unknown(servers: ServerThread, multiplex: bool) -> None:
    """retry.py: a write that timed out at a (twice, so the plan moves on) and was then refused by b
    may be applied at a: the caller gets OutcomeUnknown with maybe_applied, never Unavailable."""
    a, b, address_a, address_b = fake_pair(servers)
    a.unknown_after_apply = 100
    b.available = False
    policy = RetryPolicy(attempts_max=3, backoff_initial_ms=1, backoff_ms_max=5, call_timeout_ms=5000)
    with Client([address_a, address_b], retry=policy, multiplex=multiplex) as client:
        with pytest.raises(OutcomeUnknown, match="earlier attempt") as caught:
            client.put("bk", "k", b"v")
        assert caught.value.maybe_applied
        assert (a.writes_seen, b.writes_seen, a.store.records_applied) == (2, 1, 1)
        a.available = False
        with pytest.raises(Unavailable) as refused:  # a read changes nothing: known, whatever happened
            client.get("bk", "missing")
        assert not refused.value.maybe_applied


def test_maybe_applied_tells_a_refusal_from_a_site_that_could_not_be_reached(
    servers: ServerThread, multiplex: bool
) -> None:
    """What the chaos workload records as fail (nothing applied) or info (maybe applied)."""
    a, _, address_a, _ = fake_pair(servers)
    a.available = False
    with Client([address_a], retry=FAST_RETRY, multiplex=multiplex) as client, pytest.raises(Unavailable) as refused:
        client.put("bk", "k", b"v")
    assert not refused.value.maybe_applied
    address = servers.start_site(FakeBackend("c"))
    servers.stop_site(address)
    with Client([address], retry=FAST_RETRY, multiplex=multiplex) as client, pytest.raises(Unavailable) as unreachable:
        client.delete("bk", "k")
    assert unreachable.value.maybe_applied


def test_a_busy_site_is_retried_in_place_after_its_hint(multiplex: bool) -> None:
    """Admission control answers RESOURCE_EXHAUSTED with `replicator-retry-after-ms`: the client waits
    that long and asks the same site again (never the other); nothing was applied by the refusal."""

    async def main() -> None:
        store = FakeStore()
        a, b = FakeBackend("a", store), FakeBackend("b", store)
        a.write_delay_s = 0.15
        gate: Any = admitted(a, 1, 1 << 20, 0)
        server_a = await start_site_server(gate, "127.0.0.1:0")
        server_b = await start_site_server(b, "127.0.0.1:0")
        patient = RetryPolicy(attempts_max=30, backoff_initial_ms=1, backoff_ms_max=1000)  # >= 290 ms of hints
        try:
            async with AsyncClient([server_a.address, server_b.address], retry=patient, multiplex=multiplex) as client:
                first = asyncio.ensure_future(client.put("bk", "slow", b"1"))
                while gate.admission.stats().ops_in_flight == 0:
                    await asyncio.sleep(0.005)  # it holds a's only permit for 150 ms
                await client.put("bk", "busy", b"2")  # refused at once, retried at a after the hint
                await first
            assert gate.admission.stats().rejected >= 1
            assert b.writes_seen == 0 and a.writes_seen == 2 and store.records_applied == 2
            async with AsyncClient(
                [server_a.address], retry=RetryPolicy(attempts_max=2, backoff_ms_max=5), multiplex=multiplex
            ) as client:
                a.write_delay_s = 1.0
                held = asyncio.ensure_future(client.put("bk", "held", b"3"))
                while gate.admission.stats().ops_in_flight == 0:
                    await asyncio.sleep(0.005)
                with pytest.raises(Overloaded, match="busy") as refused:
                    await client.put("bk", "refused", b"4")
                assert not refused.value.maybe_applied
                await held
            assert "refused" not in {key.decode() for key in store.versions}
        finally:
            await server_a.stop(0)
            await server_b.stop(0)

    asyncio.run(main())


def test_bad_input_is_not_retried(servers: ServerThread, multiplex: bool) -> None:
    a, b, address_a, address_b = fake_pair(servers)
    with Client([address_a, address_b], retry=FAST_RETRY, multiplex=multiplex) as client:
        with pytest.raises(InvalidArgument, match="object key is empty"):
            client.put("bk", "", b"v")
        with pytest.raises(InvalidArgument, match="unknown volume"):
            client.write_blocks("nope", 0, bytes(4096))
    assert a.writes_seen == 0 and b.writes_seen == 0


def test_unreachable_endpoint(servers: ServerThread, multiplex: bool) -> None:
    address = servers.start_site(FakeBackend("a"))
    servers.stop_site(address)
    with Client(
        [address], retry=RetryPolicy(attempts_max=2, backoff_initial_ms=1, call_timeout_ms=2000), multiplex=multiplex
    ) as client:
        with pytest.raises(Unavailable, match=address):
            client.get("bk", "k")


def test_put_many_pipelines_and_fails_over(servers: ServerThread) -> None:
    a, b, address_a, address_b = fake_pair(servers)
    a.available = False
    with Client([address_a, address_b], retry=FAST_RETRY) as client:
        stamps = client.put_many("bk", [(f"k{i}", b"%d" % i) for i in range(300)])
        assert len(stamps) == 300 and len(set(stamps)) == 300
        assert client.list("bk") == sorted(f"k{i}" for i in range(300))
        with pytest.raises(InvalidArgument, match="object key is empty"):
            client.put_many("bk", [("ok", b""), ("", b"")])
    assert a.store.records_applied == 301


def test_blocks_and_volumes(servers: ServerThread) -> None:
    _, _, address_a, address_b = fake_pair(servers)
    with Client([address_a, address_b]) as client:
        volume = client.create_volume("disk", 1 << 20)
        assert (volume.block_size, volume.block_count) == (4096, 256)
        client.write_blocks("disk", 2, b"\x05" * 8192)
        assert client.read_blocks("disk", 0, 4) == bytes(8192) + b"\x05" * 8192
        client.trim_blocks("disk", 3, 1)
        assert client.read_blocks("disk", 2, 2) == b"\x05" * 4096 + bytes(4096)
        assert [v.name for v in client.list_volumes()] == ["disk"]
        client.delete_volume("disk")
        assert client.list_volumes() == []


def test_admin_calls_go_to_the_first_endpoint_only(servers: ServerThread) -> None:
    a, b, address_a, address_b = fake_pair(servers)
    with Client([address_a, address_b]) as client:
        with pytest.raises(Refused, match="split brain"):
            client.failover()
        client.failover(force=True)
        client.resync(full=True)
        progress: list[tuple[int, int]] = []
        report = client.verify(progress=lambda done, total: progress.append((done, total)))
        assert report.differing_count == 0 and progress
    assert a.actions == [("failover", True), ("resync", True), ("verify", False)] and b.actions == []


def test_request_ids_are_unique_and_carry_a_random_prefix() -> None:
    first, second = RequestIds(), RequestIds()
    ids = [first.next() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 24 for i in ids)
    assert ids[0][:16] == ids[-1][:16] != second.next()[:16]


def test_backoff_switches_site_first_then_waits_bounded() -> None:
    plan = RetryPlan(RetryPolicy(backoff_initial_ms=10, backoff_ms_max=40), 2, write=False)
    delays = [plan.start().delay_s] + [plan.record(Outcome.UNREACHABLE).delay_s for _ in range(5)]
    assert plan.tried == [0, 1, 0, 1, 0, 1]
    assert delays[:2] == [0.0, 0.0]
    assert all(0 < d <= 0.040 for d in delays[2:])
    with pytest.raises(ValueError, match="attempts_max"):
        RetryPolicy(attempts_max=0)
    with pytest.raises(ValueError, match="one or two"):
        Client(["a:1", "b:2", "c:3"])


def test_async_client(multiplex: bool) -> None:
    async def main() -> None:
        store = FakeStore()
        a, b = FakeBackend("a", store), FakeBackend("b", store)
        server_a = await start_site_server(a, "127.0.0.1:0")
        server_b = await start_site_server(b, "127.0.0.1:0")
        try:
            async with AsyncClient(
                [server_a.address, server_b.address], retry=FAST_RETRY, multiplex=multiplex
            ) as client:
                await client.put("bk", "k", b"v")
                assert await client.get("bk", "k") == b"v"
                a.available = False
                await client.put("bk", "k2", b"w")
                assert await client.list("bk") == ["k", "k2"]
                stamps = await client.put_many("bk", {f"m{i}": b"" for i in range(100)})
                assert len(stamps) == 100
                await client.create_volume("v", 8192)
                await client.write_blocks("v", 1, b"\x01" * 4096)
                assert await client.read_blocks("v", 0, 2) == bytes(4096) + b"\x01" * 4096
                with pytest.raises(NotFound):
                    await client.get("bk", "missing")
                assert (await client.status()).site in ("a", "b")
            assert b.writes_seen >= 3 and store.records_applied == 104
        finally:
            await server_a.stop(0)
            await server_b.stop(0)

    asyncio.run(main())


def test_async_witness_client() -> None:
    async def main() -> None:
        server = await start_witness_server(FakeWitnessBackend(), "127.0.0.1:0")
        client = AsyncWitnessClient(server.address)
        try:
            granted = await client.arbitrate("p", "a", 1)
            assert granted.granted and granted.epoch == 2 and granted.mode is PairMode.SOLO
            denied = await client.arbitrate("p", "b", 1)
            assert not denied.granted and denied.holder == "a"
            assert (await client.mark_synced("p", "a", 2)).mode is PairMode.SYNC
            assert [s.epoch for s in await client.status()] == [3]
        finally:
            await client.close()
            await server.stop(0)

    asyncio.run(main())


# ---- mutual TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _certificates(directory: Path) -> tuple[TlsFiles, TlsFiles]:
    """A CA, a server certificate for IP 127.0.0.1 and a client certificate, all signed by the CA."""
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *curve,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / f"{name}.ext").write_text(extension)
        _openssl("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            cwd=directory,
        )
    server = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    client = TlsFiles(directory / "ca.crt", directory / "client.crt", directory / "client.key")
    return server, client


def test_mutual_tls(servers: ServerThread, tmp_path: Path) -> None:
    server_tls, client_tls = _certificates(tmp_path)
    backend = FakeBackend("a")
    address = servers.start_site(backend, None, server_tls)
    with Client([address], tls=client_tls) as client:
        client.put("bk", "k", b"secret")
        assert client.get("bk", "k") == b"secret"
    once = RetryPolicy(attempts_max=1, call_timeout_ms=3000)
    # A client that trusts the server but shows no certificate is refused.
    no_certificate = grpc.ssl_channel_credentials(root_certificates=client_tls.ca_file.read_bytes())
    with Client([address], credentials=no_certificate, retry=once) as client, pytest.raises(Unavailable):
        client.get("bk", "k")
    # So is a plaintext client.
    with Client([address], retry=once) as client, pytest.raises(Unavailable):
        client.get("bk", "k")
    assert backend.writes_seen == 1


# ---- the multiplexed mode (client/session.py): one session stream per site for concurrent calls


class RecordingBackend(FakeBackend):
    """Records the request id of every write that reaches it."""

    def __init__(self, site_name: str, store: FakeStore) -> None:
        super().__init__(site_name, store)
        self.request_ids: list[bytes] = []

    async def write(self, operations: Any, request_id: bytes, timeout_s: float) -> Any:
        self.request_ids.append(request_id)
        return await super().write(operations, request_id, timeout_s)


def test_threads_share_one_session_stream_and_each_gets_its_own_answer(servers: ServerThread) -> None:
    a, _, address_a, address_b = fake_pair(servers)
    a.write_delay_s = 0.002  # calls overlap on the stream
    results: dict[str, tuple[int, bytes, bytes]] = {}
    with Client([address_a, address_b], retry=FAST_RETRY) as client:

        def work(thread: int) -> None:
            for n in range(25):
                key = f"t{thread}-{n}"
                ts = client.put("bk", key, key.encode())
                results[key] = (ts, client.get("bk", key), b"")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert client._sessions[0].streams_opened == 1 and client._sessions[1].streams_opened == 0
        listed = client.list("bk")
    assert len(results) == 400 and all(got == key.encode() for key, (_, got, _) in results.items())
    assert len({ts for ts, _, _ in results.values()}) == 400
    assert a.store.records_applied == 400 and sorted(listed) == sorted(results)


def test_unary_mode_opens_no_session(servers: ServerThread) -> None:
    _, _, address_a, _ = fake_pair(servers)
    with Client([address_a], multiplex=False) as client:
        client.put("bk", "k", b"v")
        assert client.get("bk", "k") == b"v"
        assert client._sessions[0].streams_opened == 0


def test_a_call_past_its_deadline_is_outcome_unknown_and_the_session_goes_on(servers: ServerThread) -> None:
    backend = FakeBackend("a")
    address = servers.start_site(backend)
    backend.write_delay_s = 0.5
    policy = RetryPolicy(attempts_max=1, call_timeout_ms=200)
    with Client([address], retry=policy) as client:
        with pytest.raises(OutcomeUnknown) as caught:
            client.put("bk", "slow", b"v")
        assert caught.value.maybe_applied
        backend.write_delay_s = 0
        assert client.put("bk", "fast", b"v") > 0  # the late answer to "slow" is dropped, not mistaken
        assert client.get("bk", "fast") == b"v"
        assert client._sessions[0].streams_opened == 1


def test_a_session_broken_mid_call_retries_every_call_with_its_request_id_and_applies_it_once(
    servers: ServerThread,
) -> None:
    """Site a stops with calls in flight on the session: each is retried at b with the same request id
    (its outcome unknown until then), none is applied twice, and the next call to a opens a new stream."""
    store = FakeStore()
    a, b = RecordingBackend("a", store), RecordingBackend("b", store)
    a.write_delay_s = 0.3  # a applies them after its stream is gone (the items run to completion)
    address_a, address_b = servers.start_site(a), servers.start_site(b)
    stamps: dict[str, int] = {}
    with Client([address_a, address_b], retry=FAST_RETRY) as client:
        threads = [
            threading.Thread(target=lambda n=n: stamps.__setitem__(f"k{n}", client.put("bk", f"k{n}", b"v")))
            for n in range(8)
        ]
        for thread in threads:
            thread.start()
        while len(a.request_ids) < 8:
            time.sleep(0.005)
        servers.stop_site(address_a)
        for thread in threads:
            thread.join()
        assert client._sessions[1].streams_opened == 1
    assert sorted(b.request_ids) == sorted(a.request_ids) and len(set(a.request_ids)) == 8
    time.sleep(0.4)  # a's own applies, after the retries: duplicates of the same request ids
    assert store.records_applied == 8 and len(stamps) == 8
    assert {stamps[f"k{n}"] for n in range(8)} == {store.outcomes[rid].ts for rid in a.request_ids}


def test_async_tasks_share_one_session_and_a_broken_stream_is_retried() -> None:
    async def main() -> None:
        store = FakeStore()
        a, b = RecordingBackend("a", store), RecordingBackend("b", store)
        server_a = await start_site_server(a, "127.0.0.1:0")
        server_b = await start_site_server(b, "127.0.0.1:0")
        try:
            async with AsyncClient([server_a.address, server_b.address], retry=FAST_RETRY) as client:
                keys = [f"k{n}" for n in range(300)]
                stamps = await asyncio.gather(*(client.put("bk", key, key.encode()) for key in keys))
                assert len(set(stamps)) == 300
                got = await asyncio.gather(*(client.get("bk", key) for key in keys))
                assert got == [key.encode() for key in keys]
                assert client._sessions[0].streams_opened == 1 and not b.request_ids
                # Calls in flight when a stops: retried at b with the same request ids, applied once.
                a.write_delay_s = 0.3
                pending = [asyncio.ensure_future(client.put("bk", f"late{n}", b"v")) for n in range(8)]
                while len(a.request_ids) < 308:
                    await asyncio.sleep(0.005)
                await server_a.stop(0)
                late = await asyncio.gather(*pending)
                assert sorted(b.request_ids) == sorted(a.request_ids[300:])
                await asyncio.sleep(0.4)
                assert store.records_applied == 308
                assert set(late) == {store.outcomes[rid].ts for rid in b.request_ids}
                assert client._sessions[1].streams_opened == 1
        finally:
            await server_a.stop(0)
            await server_b.stop(0)

    asyncio.run(main())


def test_a_graceful_stop_answers_the_session_calls_in_flight_and_sends_the_next_ones_to_the_other_site() -> None:
    async def main() -> None:
        store = FakeStore()
        a, b = RecordingBackend("a", store), RecordingBackend("b", store)
        server_a = await start_site_server(a, "127.0.0.1:0")
        server_b = await start_site_server(b, "127.0.0.1:0")
        a.peer_address = server_b.address
        try:
            async with AsyncClient([server_a.address, server_b.address], retry=FAST_RETRY) as client:
                await client.put("bk", "first", b"v")  # the session to a is open
                a.write_delay_s = 0.3
                in_flight = [asyncio.ensure_future(client.put("bk", f"k{n}", b"v")) for n in range(4)]
                while len(a.request_ids) < 5:
                    await asyncio.sleep(0.005)
                began = asyncio.get_running_loop().time()
                await asyncio.gather(server_a.stop(5.0), *in_flight)
                assert asyncio.get_running_loop().time() - began < 2.0  # not the 5 s grace
                assert not b.request_ids  # a answered every call it had started
                await client.put("bk", "after", b"v")  # refused by the ended stream's status: goes to b
                assert len(b.request_ids) == 1 and store.records_applied == 6
        finally:
            await server_a.stop(0)
            await server_b.stop(0)

    asyncio.run(main())


# ---------------------------------------------------------------- packed session messages


def test_packer_bounds_a_pack_by_calls_and_bytes_and_carries_what_did_not_fit() -> None:
    from replicator.client import session as s
    from replicator.v1 import objects_pb2

    def request(tag: int, value_bytes: int) -> objects_pb2.SessionRequest:
        return objects_pb2.SessionRequest(tag=tag, put=objects_pb2.PutRequest(data=b"x" * value_bytes))

    def taker(items: list[Any]) -> Any:
        def take() -> Any:
            if not items:
                raise asyncio.QueueEmpty
            return items.pop(0)

        return take

    packer = s._Packer()
    waiting = [request(n, 10) for n in range(2, 200)]
    packed, ended = packer.pack(request(1, 10), taker(waiting))
    assert (len(packed.more), ended) == (0, False) and len(waiting) == 198  # not enabled: one call a message
    packer.enabled = True
    packed, ended = packer.pack(request(1, 10), taker(waiting))
    assert len(packed.more) + 1 == s.SESSION_PACK_CALLS_MAX and not ended
    assert [r.tag for r in packed.more] == list(range(2, s.SESSION_PACK_CALLS_MAX + 1))
    big = [request(n, 100 * 1024) for n in range(3)] + [None]
    packed, ended = packer.pack(request(0, 10), taker(big))
    assert [r.tag for r in packed.more] == [0, 1] and packed.ByteSize() < 2 * s.SESSION_PACK_BYTES_MAX
    assert packer.next_carried() is not None and packer.next_carried() is None  # the third: next pack
    packed, ended = packer.pack(request(9, 10), taker([request(10, 10), None, request(11, 10)]))
    assert [r.tag for r in packed.more] == [10] and ended  # the end of the stream ends the pack


def test_concurrent_calls_go_packed_and_each_gets_its_own_answer() -> None:
    async def main() -> None:
        backend = FakeBackend("a")
        backend.write_delay_s = 0.002  # calls pile up while the stream's writer is busy
        server = await start_site_server(backend, "127.0.0.1:0")
        try:
            async with AsyncClient([server.address], retry=FAST_RETRY) as client:
                keys = [f"k{n}" for n in range(400)]
                await client.put("bk", "first", b"v")  # the stream is open and its headers are in
                await asyncio.gather(*(client.put("bk", key, key.encode()) for key in keys))
                got = await asyncio.gather(*(client.get("bk", key) for key in keys))
                assert got == [key.encode() for key in keys]
                with pytest.raises(NotFound):
                    await client.get("bk", "missing")  # an error answer inside a pack is its call's own
                packer = client._sessions[0]._stream.packer  # type: ignore[union-attr]
                assert packer.enabled and packer.calls_sent >= 801
                assert packer.packs_sent < packer.calls_sent / 2  # most calls went packed
                assert backend.store.records_applied == 401
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_packs_only_between_sides_that_both_take_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older server (no pack header in its answer) gets one call per message; an older client (no pack
    metadata in its request) gets one answer per message."""
    from replicator.api import objects as server_objects
    from replicator.v1 import objects_pb2, objects_pb2_grpc

    async def main() -> None:
        backend = FakeBackend("a")
        backend.write_delay_s = 0.002
        server = await start_site_server(backend, "127.0.0.1:0")
        try:
            # An older client: the raw stub, no metadata; many calls in flight; every answer comes alone.
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = objects_pb2_grpc.ObjectServiceStub(channel)

                async def calls() -> Any:
                    for n in range(50):
                        put = objects_pb2.PutRequest(
                            bucket="bk", key=f"old{n}", data=b"v", request_id=bytes([n + 1]) * 16
                        )
                        yield objects_pb2.SessionRequest(tag=n + 1, put=put)

                answers = [answer async for answer in stub.Session(calls())]
                assert sorted(a.tag for a in answers) == list(range(1, 51)) and not any(len(a.more) for a in answers)
            # An older server: it sends no pack header, so the client never packs.
            monkeypatch.setattr(server_objects, "SESSION_PACK_METADATA", ("replicator-older-server", "1"))
            async with AsyncClient([server.address], retry=FAST_RETRY) as client:
                await asyncio.gather(*(client.put("bk", f"new{n}", b"v") for n in range(100)))
                packer = client._sessions[0]._stream.packer  # type: ignore[union-attr]
                assert not packer.enabled and packer.packs_sent == packer.calls_sent == 100
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_a_packed_call_that_packs_calls_of_its_own_is_refused_alone() -> None:
    from replicator.v1 import objects_pb2, objects_pb2_grpc

    async def main() -> None:
        server = await start_site_server(FakeBackend("a"), "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = objects_pb2_grpc.ObjectServiceStub(channel)
                get = objects_pb2.GetRequest(bucket="bk", key="k")
                first = objects_pb2.SessionRequest(tag=1, get=get)
                nested = first.more.add(tag=2, get=get)
                nested.more.add(tag=3, get=get)
                first.more.add(tag=4, get=get)

                async def calls() -> Any:
                    yield first

                metadata = (("replicator-session-pack", "1"),)
                answers = []
                async for message in stub.Session(calls(), metadata=metadata):
                    answers += [message, *message.more]
                by_tag = {a.tag: a for a in answers}
                assert sorted(by_tag) == [1, 2, 4]  # 3 was never served
                assert by_tag[2].WhichOneof("result") == "error" and "packs calls of its own" in by_tag[2].error.message
                assert by_tag[1].WhichOneof("result") == by_tag[4].WhichOneof("result") == "error"  # not found
                assert by_tag[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
        finally:
            await server.stop(0)

    asyncio.run(main())
