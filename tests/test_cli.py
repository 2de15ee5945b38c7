"""replicatorctl against fake sites and a fake witness on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.api.fake import FakeBackend, FakeWitnessBackend, ServerThread
from replicator.cli import EXIT_DIFFERENCES, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, build_parser, main


@pytest.fixture
def site() -> Iterator[tuple[FakeBackend, str, ServerThread]]:
    with ServerThread() as thread:
        backend = FakeBackend("a", peer="b", peer_address="127.0.0.1:7999")
        yield backend, thread.start_site(backend), thread


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_human_and_json(site: tuple[FakeBackend, str, ServerThread], capsys: pytest.CaptureFixture[str]) -> None:
    _, endpoint, _ = site
    code, out, _ = run(capsys, "--endpoint", endpoint, "status")
    assert code == EXIT_OK
    for fragment in ("SYNC  epoch 3", "peer b at 127.0.0.1:7999", "reachable", "2 records, 512 B", "dirty keys"):
        assert fragment in out
    code, out, _ = run(capsys, "status", "--endpoint", endpoint, "--json")  # options after the command too
    assert code == EXIT_OK
    sites = json.loads(out)["sites"]
    status = sites[0]
    assert (status["site"], status["state"], status["epoch"], status["witness_reachable"]) == ("a", "SYNC", 3, True)
    # The peer the site names (nothing listens there) is shown as unreachable beside it.
    assert sites[1]["address"] == "127.0.0.1:7999" and "error" in sites[1]


def test_objects(
    site: tuple[FakeBackend, str, ServerThread], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, endpoint, _ = site
    assert run(capsys, "--endpoint", endpoint, "object", "put", "bk", "hello.txt", "--data", "hi there")[0] == EXIT_OK
    source = tmp_path / "in.bin"
    source.write_bytes(b"\x00\x01binary")
    assert run(capsys, "--endpoint", endpoint, "object", "put", "bk", "bin", "--file", str(source))[0] == EXIT_OK
    code, out, _ = run(capsys, "--endpoint", endpoint, "object", "ls", "bk")
    assert code == EXIT_OK and "bin" in out and "hello.txt" in out and "KEY" in out
    code, out, _ = run(capsys, "--endpoint", endpoint, "--json", "object", "ls", "bk", "--prefix", "he")
    assert [o["key"] for o in json.loads(out)] == ["hello.txt"]
    target = tmp_path / "out.bin"
    assert run(capsys, "--endpoint", endpoint, "object", "get", "bk", "bin", "--output", str(target))[0] == EXIT_OK
    assert target.read_bytes() == b"\x00\x01binary"
    assert run(capsys, "--endpoint", endpoint, "object", "rm", "bk", "bin")[0] == EXIT_OK
    code, _, err = run(capsys, "--endpoint", endpoint, "object", "get", "bk", "bin")
    assert code == EXIT_FAILED and "not found" in err


def test_volumes_and_blocks(
    site: tuple[FakeBackend, str, ServerThread], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, endpoint, _ = site
    code, out, _ = run(capsys, "--endpoint", endpoint, "volume", "create", "disk", "1M", "--block-size", "4K")
    assert code == EXIT_OK and "256 blocks of 4096 bytes" in out
    code, out, _ = run(capsys, "--endpoint", endpoint, "--json", "volume", "list")
    assert json.loads(out) == [{"name": "disk", "size_bytes": 1 << 20, "block_size": 4096, "block_count": 256}]
    data = tmp_path / "blocks"
    data.write_bytes(b"\x07" * 8192)
    assert run(capsys, "--endpoint", endpoint, "block", "write", "disk", "1", "--file", str(data))[0] == EXIT_OK
    out_file = tmp_path / "read"
    assert run(capsys, "--endpoint", endpoint, "block", "read", "disk", "0", "3", "--output", str(out_file))[0] == 0
    assert out_file.read_bytes() == bytes(4096) + b"\x07" * 8192
    data.write_bytes(b"\x07" * 100)
    code, _, err = run(capsys, "--endpoint", endpoint, "block", "write", "disk", "1", "--file", str(data))
    assert code == EXIT_FAILED and "not a whole number" in err
    assert run(capsys, "--endpoint", endpoint, "volume", "delete", "disk", "--yes")[0] == EXIT_OK
    code, _, err = run(capsys, "--endpoint", endpoint, "--json", "volume", "delete", "disk", "--yes")
    assert code == EXIT_FAILED and json.loads(err)["error"] == "not_found"


def test_verify_shows_progress_and_reports_differences(
    site: tuple[FakeBackend, str, ServerThread], capsys: pytest.CaptureFixture[str]
) -> None:
    backend, endpoint, _ = site
    for i in range(8):
        assert run(capsys, "--endpoint", endpoint, "object", "put", "bk", f"k{i}", "--data", "x")[0] == EXIT_OK
    code, out, err = run(capsys, "--endpoint", endpoint, "verify")
    assert code == EXIT_OK and "compared 8 keys: 0 differ" in out and "verify [" in err and "8/8 keys" in err
    backend.store.differing_keys = (b"obk\x00k3",)
    code, out, _ = run(capsys, "--endpoint", endpoint, "verify")
    assert code == EXIT_DIFFERENCES and "differs: object bk/k3" in out
    code, out, _ = run(capsys, "--endpoint", endpoint, "verify", "--repair", "--json")
    assert code == EXIT_OK and json.loads(out)["repaired"] == 1


def test_resync_switchover_failover(
    site: tuple[FakeBackend, str, ServerThread], capsys: pytest.CaptureFixture[str]
) -> None:
    backend, endpoint, _ = site
    assert run(capsys, "--endpoint", endpoint, "resync", "--full")[0] == EXIT_OK
    assert run(capsys, "--endpoint", endpoint, "switchover")[0] == EXIT_OK
    code, _, err = run(capsys, "--endpoint", endpoint, "failover")
    assert code == EXIT_USAGE and "split brain" in err and "--force" in err
    assert backend.actions == [("resync", True), ("switchover", True)]
    assert run(capsys, "--endpoint", endpoint, "failover", "--force")[0] == EXIT_OK
    assert backend.actions[-1] == ("failover", True)
    backend.state = "SOLO"
    code, _, err = run(capsys, "--endpoint", endpoint, "switchover")
    assert code == EXIT_FAILED and "SYNC" in err and "try site" not in err  # a refusal, not an outage


def test_witness_status(capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread() as thread:
        witness = FakeWitnessBackend()
        address = thread.start_witness(witness)
        code, out, _ = run(capsys, "--witness", address, "witness", "status")
        assert code == EXIT_OK and "knows no pair" in out
        thread.call(witness.arbitrate("pair-1", "a", 1))
        code, out, _ = run(capsys, "witness", "status", "--witness", address)
        assert code == EXIT_OK and "pair-1" in out and "SOLO" in out
        code, out, _ = run(capsys, "--json", "--witness", address, "witness", "status")
        assert json.loads(out) == [{"pair": "pair-1", "epoch": 2, "mode": "SOLO", "holder": "a", "preferred": ""}]


def test_unreachable_endpoint_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread() as thread:
        address = thread.start_site(FakeBackend())
        thread.stop_site(address)
    code, _, err = run(capsys, "--endpoint", address, "--timeout-ms", "2000", "status")
    assert code == EXIT_UNREACHABLE and f"site at {address}" in err
    code, _, err = run(capsys, "--witness", address, "--timeout-ms", "2000", "witness", "status")
    assert code == EXIT_UNREACHABLE and f"witness at {address}" in err


def test_bad_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--endpoint", "no-port", "status"])
    assert caught.value.code == EXIT_USAGE and "HOST:PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["volume", "create", "v", "lots"])
    assert caught.value.code == EXIT_USAGE and "not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == EXIT_USAGE
    code, _, err = run(capsys, "--ca", str(tmp_path / "ca.pem"), "status")
    assert code == EXIT_USAGE and "go together" in err


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for command in ("status", "volume", "object", "block", "verify", "resync", "switchover", "failover", "witness"):
        assert command in out
    parser = build_parser()
    assert parser.prog == "replicatorctl"
    with pytest.raises(SystemExit):
        main(["failover", "--help"])
    assert "split brain" in capsys.readouterr().out
