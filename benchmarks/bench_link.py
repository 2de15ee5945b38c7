"""Link benchmark: shipping records over the Link against a plain asyncio stream, in the same run.

    python -m benchmarks.bench_link [--megabytes 512] [--records 64] [--value-bytes 4096] [--rounds 3]

Both ends run in this process, on one uvloop event loop, over loopback:
- plain stream: asyncio.open_connection / start_server moving the same number of bytes in
  chunks of one frame's size, the reader reading until it has them all (the baseline);
- link: records of one `value-bytes` operation each are encoded `records` to a frame and sent
  with `Link.send` (sequence numbers, CRCs, back-pressure); the receiving Link decodes every
  frame and the clock stops when the last record has arrived and every frame is acknowledged.
The link window is 2 MiB (about the bandwidth-delay product here; larger windows only add memory
traffic). The receiving end also runs in a child process ("two processes": each end on its own
core, as two sites are). Each is run with and without mutual TLS (openssl CLI certificates), the best of
`rounds` taken, and the ratio link / plain printed. Goal: ratio >= 0.8.

Under pytest the same measurements run as pytest-benchmark functions (smaller volumes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from replicator import framing
from replicator.core import messages as msg
from replicator.core.records import Operation, Record, RecordId
from replicator.daemon.wire import Encoder
from replicator.transport import Link, LinkLimits, LocalHello, TlsConfig, new_event_loop

LIMITS = LinkLimits(frame_size_bytes_max=1024 * 1024, inflight_bytes_max=2 * 1024 * 1024)


def make_records(count: int, value_bytes: int) -> list[Record]:
    value = os.urandom(value_bytes)
    return [
        Record(
            RecordId("a", 1, seq), 5, 1_000_000 + seq, b"request-%08d" % seq, (Operation(b"vol/7/%012d" % seq, value),)
        )
        for seq in range(1, count + 1)
    ]


def make_certificates(directory: Path) -> dict[str, TlsConfig]:
    def openssl(*arguments: str) -> None:
        subprocess.run(["openssl", *arguments], cwd=directory, check=True, capture_output=True)

    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=bench-ca")
    configs = {}
    for name in ("a", "b"):
        (directory / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
        openssl("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
        )  # fmt: skip
        configs[name] = TlsConfig(
            str(directory / "ca.pem"), str(directory / f"{name}.pem"), str(directory / f"{name}.key")
        )
    return configs


async def plain_stream(total_bytes: int, chunk_bytes: int, tls: dict[str, TlsConfig] | None) -> float:
    """Seconds to move total_bytes through a plain asyncio stream."""
    done = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = 0
        while received < total_bytes:
            data = await reader.read(1024 * 1024)
            if not data:
                break
            received += len(data)
        writer.write(b"k")  # one acknowledgement at the end, so both measures end on an ack
        await writer.drain()
        done.set_result(received)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls["b"].server_context() if tls else None)
    port = server.sockets[0].getsockname()[1]
    chunk = os.urandom(chunk_bytes)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=tls["a"].client_context() if tls else None,
        server_hostname="b" if tls else None,
    )
    start = time.perf_counter()
    sent = 0
    while sent < total_bytes:
        writer.write(chunk)
        sent += len(chunk)
        await writer.drain()
    await reader.read(1)
    elapsed = time.perf_counter() - start
    assert await done >= total_bytes
    writer.close()
    server.close()
    await server.wait_closed()
    return elapsed


async def link_shipping(total_bytes: int, records: list[Record], tls: dict[str, TlsConfig] | None) -> tuple[float, int]:
    """Seconds to ship records through a Link until all arrived and were acknowledged, and the bytes."""
    frame = bytearray()
    frame_bytes = framing.encode_records(frame, 5, records)
    frames = max(1, total_bytes // frame_bytes)
    expected_records = frames * len(records)
    received = 0
    all_received = asyncio.get_running_loop().create_future()

    def on_frame(frame: framing.Frame) -> None:
        nonlocal received
        if frame.type != framing.FrameType.RECORDS:
            return
        received += len(frame.body.records)
        if received >= expected_records and not all_received.done():
            all_received.set_result(None)

    acceptor = Link(
        role="accept",
        pair_id="bench",
        local_site="b",
        peer_site="a",
        address=("127.0.0.1", 0),
        hello=lambda: LocalHello(5, 1),
        on_frame=on_frame,
        on_state=lambda event: None,
        limits=LIMITS,
        tls=tls["b"] if tls else None,
    )
    await acceptor.start()
    dialer = Link(
        role="connect",
        pair_id="bench",
        local_site="a",
        peer_site="b",
        address=acceptor.listen_address,
        hello=lambda: LocalHello(5, 1),
        on_frame=lambda frame: None,
        on_state=lambda event: None,
        limits=LIMITS,
        tls=tls["a"] if tls else None,
    )
    await dialer.start()
    await dialer.wait_up()
    start = time.perf_counter()
    for _ in range(frames):
        frame = bytearray()
        framing.encode_records(frame, 5, records)
        await dialer.send(frame)
    await all_received
    while dialer.unacknowledged_bytes:
        await asyncio.sleep(0.0005)
    elapsed = time.perf_counter() - start
    await dialer.close()
    await acceptor.close()
    return elapsed, frames * frame_bytes


async def _serve_in_child(kind: str, total_bytes: int, tls: dict[str, TlsConfig] | None, pipe) -> None:  # type: ignore[no-untyped-def]
    """The receiving end, in its own process: a plain stream server or an accepting Link."""
    finished = asyncio.get_running_loop().create_future()
    if kind == "plain":

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received = 0
            while received < total_bytes:
                data = await reader.read(1024 * 1024)
                if not data:
                    break
                received += len(data)
            writer.write(b"k")
            await writer.drain()
            writer.close()
            finished.set_result(None)

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls["b"].server_context() if tls else None)
        pipe.send(server.sockets[0].getsockname()[1])
        await finished
        server.close()
        return
    link = Link(
        role="accept",
        pair_id="bench",
        local_site="b",
        peer_site="a",
        address=("127.0.0.1", 0),
        hello=lambda: LocalHello(5, 1),
        on_frame=lambda frame: (
            frame.type == framing.FrameType.GOODBYE and not finished.done() and finished.set_result(None)
        ),
        on_state=lambda event: None,
        limits=LIMITS,
        tls=tls["b"] if tls else None,
    )
    await link.start()
    pipe.send(link.listen_address[1])
    await finished
    await link.close()


def _child(kind: str, total_bytes: int, tls: dict[str, TlsConfig] | None, pipe) -> None:  # type: ignore[no-untyped-def]
    run(_serve_in_child(kind, total_bytes, tls, pipe))


async def two_process_sender(kind: str, port: int, total_bytes: int, records: list[Record], tls) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    frame = bytearray()
    frame_bytes = framing.encode_records(frame, 5, records)
    frames = max(1, total_bytes // frame_bytes)
    if kind == "plain":
        chunk = bytes(frame)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls["a"].client_context() if tls else None, server_hostname="b" if tls else None
        )
        start = time.perf_counter()
        for _ in range(frames):
            writer.write(chunk)
            await writer.drain()
        await reader.read(1)
        elapsed = time.perf_counter() - start
        writer.close()
        return elapsed, frames * frame_bytes
    dialer = Link(
        role="connect",
        pair_id="bench",
        local_site="a",
        peer_site="b",
        address=("127.0.0.1", port),
        hello=lambda: LocalHello(5, 1),
        on_frame=lambda frame: None,
        on_state=lambda event: None,
        limits=LIMITS,
        tls=tls["a"] if tls else None,
    )
    await dialer.start()
    await dialer.wait_up()
    start = time.perf_counter()
    for _ in range(frames):
        frame = bytearray()
        framing.encode_records(frame, 5, records)
        await dialer.send(frame)
    while dialer.unacknowledged_bytes:
        await asyncio.sleep(0.0005)
    elapsed = time.perf_counter() - start
    (goodbye,) = Encoder("a").encode(msg.Goodbye(5, msg.GoodbyeReason.SHUTDOWN, "done"))
    await dialer.send(goodbye)
    await dialer.close()
    return elapsed, frames * frame_bytes


def two_processes(kind: str, total_bytes: int, records: list[Record], tls) -> float:  # type: ignore[no-untyped-def]
    """MB/s with the receiving end in a child process (each end on its own core, as two sites are)."""
    import multiprocessing

    frame = bytearray()
    frame_bytes = framing.encode_records(frame, 5, records)
    total_bytes = max(1, total_bytes // frame_bytes) * frame_bytes  # whole frames, as the sender sends
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=_child, args=(kind, total_bytes, tls, child))
    process.start()
    try:
        port = parent.recv()
        seconds, shipped = run(two_process_sender(kind, port, total_bytes, records, tls))
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    return shipped / seconds / 1e6


def run(coroutine):  # type: ignore[no-untyped-def]
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)


def compare(
    megabytes: int, count: int, value_bytes: int, rounds: int, tls: dict[str, TlsConfig] | None
) -> tuple[float, float]:
    """(plain MB/s, link MB/s), best of `rounds` each, alternating."""
    records = make_records(count, value_bytes)
    frame = bytearray()
    frame_bytes = framing.encode_records(frame, 5, records)
    total = megabytes * 1024 * 1024
    plain_best = link_best = 0.0
    for _ in range(rounds):
        seconds = run(plain_stream(total, frame_bytes, tls))
        plain_best = max(plain_best, total / seconds / 1e6)
        seconds, shipped = run(link_shipping(total, records, tls))
        link_best = max(link_best, shipped / seconds / 1e6)
    return plain_best, link_best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--value-bytes", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args(argv)
    print(
        f"link vs plain asyncio stream, loopback, one process, {framing.IMPLEMENTATION} codec, "
        f"{arguments.records} x {arguments.value_bytes} B records a frame, {arguments.megabytes} MiB, "
        f"best of {arguments.rounds}"
    )
    print(f"{'':24}{'plain MB/s':>12}{'link MB/s':>12}{'ratio':>8}")
    records = make_records(arguments.records, arguments.value_bytes)
    total = arguments.megabytes * 1024 * 1024
    with tempfile.TemporaryDirectory() as directory:
        certificates = make_certificates(Path(directory))
        for name, tls in (("tcp", None), ("mtls", certificates)):
            plain, link = compare(arguments.megabytes, arguments.records, arguments.value_bytes, arguments.rounds, tls)
            print(f"{name + ', one process':24}{plain:12.0f}{link:12.0f}{link / plain:8.2f}")
            plain = max(two_processes("plain", total, records, tls) for _ in range(arguments.rounds))
            link = max(two_processes("link", total, records, tls) for _ in range(arguments.rounds))
            print(f"{name + ', two processes':24}{plain:12.0f}{link:12.0f}{link / plain:8.2f}")


# --- pytest-benchmark ------------------------------------------------------------


def test_link_shipping(benchmark):  # type: ignore[no-untyped-def]
    records = make_records(64, 4096)
    benchmark.pedantic(lambda: run(link_shipping(64 * 1024 * 1024, records, None)), rounds=3)


def test_plain_stream(benchmark):  # type: ignore[no-untyped-def]
    benchmark.pedantic(lambda: run(plain_stream(64 * 1024 * 1024, 266_000, None)), rounds=3)


if __name__ == "__main__":
    assert ssl.OPENSSL_VERSION
    main()
