"""replicatorctl's conveniences and error discipline (issue 19, findings 27-31, 37, 41, 43), against a
fake site and a fake witness on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import __version__
from replicator.api.fake import FakeBackend, FakeWitnessBackend, ServerThread
from replicator.cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    build_parser,
    main,
)
from replicator.config import ApiConfig


@pytest.fixture
def site() -> Iterator[tuple[FakeBackend, str]]:
    with ServerThread() as thread:
        backend = FakeBackend("a", peer="b")
        # Small limits, as a site names them in its status: the CLI checks inputs against them.
        backend.status_details = {"object_bytes_max": "1000", "block_write_bytes_max": "8192", "trim_blocks_max": "3"}
        config = ApiConfig(block_write_bytes_max=8192, object_bytes_max=1000, trim_blocks_max=3)
        yield backend, thread.start_site(backend, config)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.strip() == f"replicatorctl {__version__}"


def test_tls_files_and_endpoints_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("ca", "cert", "key"):
        (tmp_path / name).write_text("x")
    monkeypatch.setenv("REPLICATOR_CA", str(tmp_path / "ca"))
    monkeypatch.setenv("REPLICATOR_CERT", str(tmp_path / "cert"))
    monkeypatch.setenv("REPLICATOR_KEY", str(tmp_path / "key"))
    monkeypatch.setenv("REPLICATOR_ENDPOINT", "127.0.0.1:1,127.0.0.1:2")
    args = build_parser().parse_args(["status"])
    assert (args.tls_ca, args.tls_cert, args.tls_key) == (tmp_path / "ca", tmp_path / "cert", tmp_path / "key")
    assert args.endpoint == ["127.0.0.1:1", "127.0.0.1:2"]
    args = build_parser().parse_args(["status", "--endpoint", "127.0.0.1:3"])  # the option wins
    assert args.endpoint == ["127.0.0.1:3"]


def test_object_head_and_ls_limit(site: tuple[FakeBackend, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, endpoint = site
    for i in range(5):
        assert run(capsys, "--endpoint", endpoint, "object", "put", "bk", f"k{i}", "--data", "x" * i)[0] == EXIT_OK
    code, out, _ = run(capsys, "--endpoint", endpoint, "--json", "object", "head", "bk", "k3")
    assert code == EXIT_OK and json.loads(out)["size_bytes"] == 3
    code, _, err = run(capsys, "--endpoint", endpoint, "object", "head", "bk", "nope")
    assert code == EXIT_FAILED and "not found" in err
    code, out, _ = run(capsys, "--endpoint", endpoint, "object", "ls", "bk", "--limit", "2")
    assert code == EXIT_OK and out.splitlines() == ["KEY  SIZE_BYTES", "k0  0", "k1  1"]
    code, out, _ = run(capsys, "--endpoint", endpoint, "--json", "object", "ls", "bk")
    assert [o["key"] for o in json.loads(out)] == [f"k{i}" for i in range(5)]


def test_oversized_object_refused_before_it_is_read(
    site: tuple[FakeBackend, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    backend, endpoint = site
    huge = tmp_path / "huge"
    with huge.open("wb") as out:
        out.truncate(3 << 30)  # 3 GiB, sparse: reading it would take seconds and gigabytes
    code, _, err = run(capsys, "--endpoint", endpoint, "object", "put", "bk", "big", "--file", str(huge))
    assert code == EXIT_FAILED
    assert f"object is {3 << 30} bytes, the limit (api.object_bytes_max at site a) is 1000" in err
    code, _, err = run(capsys, "--endpoint", endpoint, "object", "put", "bk", "big", "--data", "y" * 1001)
    assert code == EXIT_FAILED and "api.object_bytes_max" in err
    assert backend.writes_seen == 0


def test_block_write_in_chunks_with_progress_and_trim(
    site: tuple[FakeBackend, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    backend, endpoint = site
    assert run(capsys, "--endpoint", endpoint, "volume", "create", "disk", "64K", "--block-size", "4K")[0] == EXIT_OK
    image = tmp_path / "image"
    image.write_bytes(b"".join(bytes([i]) * 4096 for i in range(1, 6)))  # 5 blocks, 2 per request
    code, out, err = run(capsys, "--endpoint", endpoint, "block", "write", "disk", "2", "--file", str(image))
    assert code == EXIT_OK and "in 3 requests of at most 8192 bytes" in out
    assert "write [" in err and "20480/20480 bytes" in err
    back = tmp_path / "back"
    assert run(capsys, "--endpoint", endpoint, "block", "read", "disk", "0", "8", "--output", str(back))[0] == EXIT_OK
    assert back.read_bytes() == bytes(8192) + image.read_bytes() + bytes(4096)
    # Trim 5 blocks, at most 3 a request (the site's trim_blocks_max).
    code, out, _ = run(capsys, "--endpoint", endpoint, "block", "trim", "disk", "2", "5")
    assert code == EXIT_OK and "trimmed 5 blocks" in out
    assert run(capsys, "--endpoint", endpoint, "block", "read", "disk", "0", "8", "--output", str(back))[0] == EXIT_OK
    assert back.read_bytes() == bytes(8 * 4096)
    # Not a whole number of blocks: refused before anything is written.
    image.write_bytes(b"z" * 5000)
    code, _, err = run(capsys, "--endpoint", endpoint, "block", "write", "disk", "0", "--file", str(image))
    assert code == EXIT_FAILED and "not a whole number of 4096-byte blocks" in err


def test_volume_delete_needs_confirmation(
    site: tuple[FakeBackend, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, endpoint = site
    assert run(capsys, "--endpoint", endpoint, "volume", "create", "disk", "64K")[0] == EXIT_OK
    code, _, err = run(capsys, "--endpoint", endpoint, "volume", "delete", "disk")  # stdin is no terminal here
    assert code == EXIT_USAGE and "without --yes" in err

    class Terminal:
        def __init__(self, answer: str) -> None:
            self.answer = answer

        def isatty(self) -> bool:
            return True

        def readline(self) -> str:
            return self.answer

    monkeypatch.setattr("sys.stdin", Terminal("other\n"))
    code, _, err = run(capsys, "--endpoint", endpoint, "volume", "delete", "disk")
    assert code == EXIT_USAGE and "not confirmed" in err
    monkeypatch.setattr("sys.stdin", Terminal("disk\n"))
    code, out, _ = run(capsys, "--endpoint", endpoint, "volume", "delete", "disk")
    assert code == EXIT_OK and "deleted volume disk" in out
    code, out, _ = run(capsys, "--endpoint", endpoint, "--json", "volume", "list")
    assert json.loads(out) == []


def test_ctrl_c_exits_130_quietly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    parser = build_parser()
    original = parser.parse_args

    def parse(argv: list[str] | None = None) -> argparse.Namespace:
        args = original(argv)
        args.handler = interrupted
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr("replicator.cli.build_parser", lambda: parser)
    code, out, err = run(capsys, "object", "ls", "bk")
    assert code == EXIT_INTERRUPTED and "Traceback" not in err and out == ""


def test_health_json_and_witness_unknown_pair(
    site: tuple[FakeBackend, str], capsys: pytest.CaptureFixture[str]
) -> None:
    backend, endpoint = site
    code, out, _ = run(capsys, "--endpoint", endpoint, "--json", "health")
    assert code == EXIT_OK and json.loads(out)[0]["health"] == "healthy"
    backend.state = "SOLO"
    code, out, _ = run(capsys, "--endpoint", endpoint, "health")
    assert code == 5 and "degraded" in out
    backend.state = "SUSPENDED"
    assert run(capsys, "--endpoint", endpoint, "health")[0] == 6
    with ServerThread() as thread:
        address = thread.start_witness(FakeWitnessBackend())
        code, _, err = run(capsys, "--witness", address, "witness", "status", "--pair", "nope")
        assert code == EXIT_FAILED and "does not know pair 'nope'" in err
    assert os.environ.get("GRPC_VERBOSITY") == "NONE"  # set by the CLI before grpc was imported


def test_every_daemon_has_version_and_replicatord_a_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    from replicator.daemon import site as site_daemon
    from replicator.daemon import witness as witness_daemon

    for entry, name in ((site_daemon.main, "replicatord"), (witness_daemon.main, "replicator-witness")):
        with pytest.raises(SystemExit) as caught:
            entry(["--version"])
        assert caught.value.code == 0 and capsys.readouterr().out.strip() == f"{name} {__version__}"
    with pytest.raises(SystemExit) as caught:
        site_daemon.main(["--config", "x.toml", "--log-level", "loud"])
    assert caught.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_site_command_at_the_witness_names_the_mistake(capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread() as thread:
        witness = thread.start_witness(FakeWitnessBackend())
        site = thread.start_site(FakeBackend())
        code, _, err = run(capsys, "--endpoint", witness, "object", "ls", "bk")
        assert code == EXIT_FAILED and "not a Replicator site" in err and "the witness?" in err
        code, _, err = run(capsys, "--witness", site, "witness", "status")
        assert code == EXIT_FAILED and "not a Replicator witness" in err
