"""replicatorctl: the operator's command line for a Replicator site and the witness.

Every command talks to one site (--endpoint) or to the witness (--witness)
over gRPC, optionally with mutual TLS (--ca, --cert, --key). Output is a
human table by default and JSON with --json. Exit codes:

    0  success
    1  the site refused or failed the request (not found, invalid argument, refused, data loss)
    2  bad command line, or a dangerous command given without its confirmation flag
    3  the site or witness could not be reached, cannot serve, or the outcome is unknown
    4  verify found keys that differ (and did not repair them all)
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from replicator.api.keys import describe_key
from replicator.client import (
    Client,
    ClientError,
    OutcomeUnknown,
    RetryPolicy,
    Unavailable,
    witness_status,
)
from replicator.config import TlsFiles, parse_address

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DIFFERENCES = 0, 1, 2, 3, 4
DEFAULT_ENDPOINT = "127.0.0.1:7400"
DEFAULT_WITNESS = "127.0.0.1:7600"

FAILOVER_WARNING = """\
refusing a forced failover without --force.

A forced failover makes this site go on alone WITHOUT the witness's grant.
If the other site is in fact alive and still serving clients, the two copies
diverge (split brain) and writes acknowledged by the other site since the
split are lost. The witness normally decides this safely on its own: use a
forced failover only when the witness cannot be reached and you KNOW the
other site is down (powered off, fenced at the network). For a planned move
with both sites healthy use `replicatorctl switchover` instead.

Run again with --force to proceed."""


class UsageError(Exception):
    pass


# ---- argument parsing


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?)(i?b?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64M, 10GiB)")
    number, unit = int(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgtp".index(unit or " "))


def _non_negative(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Connection options, accepted before the command and after it."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--endpoint",
        type=_address,
        default=default(os.environ.get("REPLICATOR_ENDPOINT", DEFAULT_ENDPOINT)),
        help=f"site gRPC address HOST:PORT (env REPLICATOR_ENDPOINT, default {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "--witness",
        type=_address,
        default=default(os.environ.get("REPLICATOR_WITNESS", DEFAULT_WITNESS)),
        help=f"witness gRPC address HOST:PORT for `witness` commands "
        f"(env REPLICATOR_WITNESS, default {DEFAULT_WITNESS})",
    )
    parser.add_argument(
        "--ca", dest="tls_ca", type=Path, default=default(None), help="CA certificate (PEM) for mutual TLS"
    )
    parser.add_argument(
        "--cert", dest="tls_cert", type=Path, default=default(None), help="client certificate (PEM) for mutual TLS"
    )
    parser.add_argument(
        "--key", dest="tls_key", type=Path, default=default(None), help="client private key (PEM) for mutual TLS"
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON for scripts")
    parser.add_argument(
        "--timeout-ms", type=int, default=default(5000), help="deadline of each call in ms (default 5000)"
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog="replicatorctl",
        description="Administer a Replicator site pair and its witness.",
        epilog="Exit codes: 0 ok, 1 request refused or failed, 2 bad usage or missing confirmation, "
        "3 site/witness unreachable or outcome unknown, 4 verify found differences.",
    )
    _common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(parent: Any, name: str, help_text: str, handler: Callable[..., int]) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    command(
        commands,
        "status",
        "Show the site's pair state, epoch, role, peer and witness reachability, replication lag, "
        "dirty keys and resync progress.",
        cmd_status,
    )

    volume = commands.add_parser("volume", help="Create, list and delete block volumes.")
    volume_commands = volume.add_subparsers(dest="volume_command", metavar="ACTION", required=True)
    create = command(
        volume_commands, "create", "Create a volume of SIZE bytes (suffixes K, M, G, T).", cmd_volume_create
    )
    create.add_argument("name")
    create.add_argument("size", type=_size, help="size in bytes, a multiple of the block size (e.g. 64M, 10GiB)")
    create.add_argument("--block-size", type=_size, default=4096, help="block size in bytes (default 4096)")
    command(volume_commands, "list", "List volumes with their size and block size.", cmd_volume_list)
    delete = command(volume_commands, "delete", "Delete a volume and its blocks.", cmd_volume_delete)
    delete.add_argument("name")

    obj = commands.add_parser("object", help="Put, get, list and remove objects.")
    object_commands = obj.add_subparsers(dest="object_command", metavar="ACTION", required=True)
    put = command(object_commands, "put", "Store an object from --file, --data or standard input.", cmd_object_put)
    put.add_argument("bucket")
    put.add_argument("key")
    source = put.add_mutually_exclusive_group()
    source.add_argument("--file", type=Path, help="read the object from this file")
    source.add_argument("--data", help="the object's content as text (UTF-8)")
    get = command(object_commands, "get", "Print an object to standard output (or --output).", cmd_object_get)
    get.add_argument("bucket")
    get.add_argument("key")
    get.add_argument("--output", type=Path, help="write the object to this file")
    ls = command(object_commands, "ls", "List the keys of a bucket, with sizes.", cmd_object_ls)
    ls.add_argument("bucket")
    ls.add_argument("--prefix", default="", help="only keys starting with this prefix")
    rm = command(object_commands, "rm", "Remove an object (succeeds if it is already gone).", cmd_object_rm)
    rm.add_argument("bucket")
    rm.add_argument("key")

    block = commands.add_parser("block", help="Write and read ranges of blocks.")
    block_commands = block.add_subparsers(dest="block_command", metavar="ACTION", required=True)
    write = command(
        block_commands,
        "write",
        "Write whole blocks from LBA, atomically, from --file or standard input "
        "(the data must be a whole number of blocks).",
        cmd_block_write,
    )
    write.add_argument("volume")
    write.add_argument("lba", type=_non_negative)
    write.add_argument("--file", type=Path, help="read the data from this file")
    read = command(
        block_commands, "read", "Read COUNT blocks from LBA to standard output (or --output).", cmd_block_read
    )
    read.add_argument("volume")
    read.add_argument("lba", type=_non_negative)
    read.add_argument("count", type=_non_negative)
    read.add_argument("--output", type=Path, help="write the blocks to this file")

    verify = command(
        commands,
        "verify",
        "Compare the two replicas while they serve; show progress on stderr and report the keys that differ.",
        cmd_verify,
    )
    verify.add_argument("--repair", action="store_true", help="also repair the keys that differ")

    resync = command(
        commands, "resync", "Resync control. Resyncs start on their own when a site returns; this only confirms one is "
        "running (--full is refused: a wiped site gets a full resync by itself).", cmd_resync
    )
    resync.add_argument("--full", action="store_true", help="ship every key (a replaced or wiped peer)")

    command(
        commands,
        "switchover",
        "Planned switchover: make the peer the preferred site at the witness (both sites in SYNC); "
        "it then wins when the link between the sites fails.",
        cmd_switchover,
    )
    failover = command(
        commands,
        "failover",
        "Forced failover: refused without --force. With --force a site that is fenced or suspended, "
        "with the peer unreachable, takes the next epoch from the witness whatever its state; the "
        "other site gets a full resync when it returns (what it wrote alone is lost). Risks split "
        "brain if the other site is in fact alive and serving.",
        cmd_failover,
    )
    failover.add_argument("--force", action="store_true", help="confirm that you know the other site is down")

    witness = commands.add_parser("witness", help="Query the witness (--witness HOST:PORT).")
    witness_commands = witness.add_subparsers(dest="witness_command", metavar="ACTION", required=True)
    wstatus = command(
        witness_commands, "status", "Show each pair's epoch, mode (SYNC or SOLO) and holder.", cmd_witness_status
    )
    wstatus.add_argument("--pair", default="", help="only this pair")
    return parser


# ---- helpers


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise UsageError("--ca, --cert and --key go together (mutual TLS needs all three)")
    for option, path in (("--ca", args.tls_ca), ("--cert", args.tls_cert), ("--key", args.tls_key)):
        if not path.is_file():
            raise UsageError(f"{option}: no such file {str(path)!r}")
    return TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)


def _client(args: argparse.Namespace) -> Client:
    if args.timeout_ms <= 0:
        raise UsageError(f"--timeout-ms: must be a positive integer, got {args.timeout_ms}")
    retry = RetryPolicy(attempts_max=2, backoff_initial_ms=50, call_timeout_ms=args.timeout_ms)
    return Client([args.endpoint], tls=_tls(args), retry=retry)


def _emit(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=_json_default))
    else:
        human()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def _read_input(path: Path | None, text: str | None = None) -> bytes:
    if text is not None:
        return text.encode()
    if path is not None:
        try:
            return path.read_bytes()
        except OSError as error:
            raise UsageError(f"cannot read {str(path)!r}: {error.strerror}") from None
    if sys.stdin.isatty():
        raise UsageError("no input: give --file (or --data), or pipe the data on standard input")
    return sys.stdin.buffer.read()


def _write_output(data: bytes, path: Path | None) -> None:
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        path.write_bytes(data)


# ---- commands


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    done, total = status.resync_progress

    def human() -> None:
        role = status.role + (" (preferred)" if status.preferred == status.site else "")
        resync = f"{done}/{total} keys ({100 * done // total}%)" if total else "none"
        rows = [
            ("site", f"{status.site}  role {role or '-'}"),
            (
                "pair",
                f"{status.pair or '-'}  peer {status.peer or '-'}"
                + (f" at {status.peer_address}" if status.peer_address else ""),
            ),
            ("state", f"{status.state}  epoch {status.epoch}"),
            ("peer", "reachable" if status.peer_reachable else "UNREACHABLE"),
            ("witness", "reachable" if status.witness_reachable else "UNREACHABLE"),
            ("lag", f"{status.lag_records} records, {_human_bytes(status.lag_bytes)}"),
            ("dirty keys", str(status.dirty_keys)),
            ("resync", resync),
        ] + sorted(status.details.items())
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name.ljust(width)}  {value}")

    _emit(args, dataclasses.asdict(status), human)
    return EXIT_OK


def cmd_volume_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        volume = client.create_volume(args.name, args.size, args.block_size)
    _emit(
        args,
        dataclasses.asdict(volume),
        lambda: print(
            f"created volume {volume.name}: {_human_bytes(volume.size_bytes)}, "
            f"{volume.block_count} blocks of {volume.block_size} bytes"
        ),
    )
    return EXIT_OK


def cmd_volume_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        volumes = client.list_volumes()
        # The site names its NBD server (docs/nbd.md) in its status; each volume is an export there.
        nbd = client.status().details.get("nbd", "")
    rows = [dataclasses.asdict(v) | ({"nbd_uri": f"{nbd}/{v.name}"} if nbd else {}) for v in volumes]
    columns = ("NAME", "SIZE_BYTES", "SIZE", "BLOCK_SIZE", "BLOCKS") + (("NBD_URI",) if nbd else ())
    _emit(
        args,
        rows,
        lambda: _table(
            [
                (v.name, v.size_bytes, _human_bytes(v.size_bytes), v.block_size, v.block_count)
                + ((f"{nbd}/{v.name}",) if nbd else ())
                for v in volumes
            ],
            columns,
        ),
    )
    return EXIT_OK


def cmd_volume_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_volume(args.name)
    _emit(args, {"deleted": args.name}, lambda: print(f"deleted volume {args.name}"))
    return EXIT_OK


def cmd_object_put(args: argparse.Namespace) -> int:
    data = _read_input(args.file, args.data)
    with _client(args) as client:
        ts = client.put(args.bucket, args.key, data)
    _emit(
        args,
        {"bucket": args.bucket, "key": args.key, "size_bytes": len(data), "ts": ts},
        lambda: print(f"stored {args.bucket}/{args.key} ({len(data)} bytes)"),
    )
    return EXIT_OK


def cmd_object_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.get(args.bucket, args.key)
    if args.json:
        _emit(args, {"bucket": args.bucket, "key": args.key, "size_bytes": len(data), "data_base64": data}, print)
    else:
        _write_output(data, args.output)
    return EXIT_OK


def cmd_object_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        objects = client.list_objects(args.bucket, args.prefix)
    _emit(
        args,
        [dataclasses.asdict(o) for o in objects],
        lambda: _table([(o.key, o.size_bytes) for o in objects], ("KEY", "SIZE_BYTES")),
    )
    return EXIT_OK


def cmd_object_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.bucket, args.key)
    _emit(args, {"removed": f"{args.bucket}/{args.key}"}, lambda: print(f"removed {args.bucket}/{args.key}"))
    return EXIT_OK


def cmd_block_write(args: argparse.Namespace) -> int:
    data = _read_input(args.file)
    with _client(args) as client:
        ts = client.write_blocks(args.volume, args.lba, data)
    _emit(
        args,
        {"volume": args.volume, "lba": args.lba, "bytes": len(data), "ts": ts},
        lambda: print(f"wrote {len(data)} bytes to {args.volume} at block {args.lba}"),
    )
    return EXIT_OK


def cmd_block_read(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.read_blocks(args.volume, args.lba, args.count)
    if args.json:
        _emit(args, {"volume": args.volume, "lba": args.lba, "count": args.count, "data_base64": data}, print)
    else:
        _write_output(data, args.output)
    return EXIT_OK


class ProgressBar:
    """One line on stderr, rewritten in place."""

    def __init__(self, stream: IO[str], width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        filled = int(self.width * fraction)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\rverify [{bar}] {100 * fraction:5.1f}%  {done}/{total} keys")
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def cmd_verify(args: argparse.Namespace) -> int:
    bar = ProgressBar(sys.stderr)
    with _client(args) as client:
        try:
            report = client.verify(repair=args.repair, progress=bar)
        finally:
            bar.finish()

    def human() -> None:
        print(
            f"compared {report.keys_compared} keys: {report.differing_count} differ"
            + (f", {report.repaired} repaired" if args.repair else "")
        )
        for key in report.differing_keys:
            print(f"  differs: {describe_key(key)}")
        if report.truncated:
            print(f"  ... and {report.differing_count - len(report.differing_keys)} more")

    _emit(
        args,
        {
            "keys_compared": report.keys_compared,
            "differing_count": report.differing_count,
            "differing_keys": [describe_key(k) for k in report.differing_keys],
            "truncated": report.truncated,
            "repaired": report.repaired,
        },
        human,
    )
    return EXIT_DIFFERENCES if report.differing_count > report.repaired else EXIT_OK


def cmd_resync(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.resync(full=args.full)
    kind = "full" if args.full else "incremental"
    _emit(args, {"resync": kind}, lambda: print(f"{kind} resync is running; follow it with `replicatorctl status`"))
    return EXIT_OK


def cmd_switchover(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.switchover()
    _emit(args, {"switchover": "started"}, lambda: print("switchover started; follow it with `replicatorctl status`"))
    return EXIT_OK


def cmd_failover(args: argparse.Namespace) -> int:
    if not args.force:
        print(f"replicatorctl: {FAILOVER_WARNING}", file=sys.stderr)
        return EXIT_USAGE
    with _client(args) as client:
        client.failover(force=True)
    _emit(args, {"failover": "forced"}, lambda: print(f"forced failover: site at {args.endpoint} goes on alone"))
    return EXIT_OK


def cmd_witness_status(args: argparse.Namespace) -> int:
    if args.timeout_ms <= 0:
        raise UsageError(f"--timeout-ms: must be a positive integer, got {args.timeout_ms}")
    pairs = witness_status(args.witness, tls=_tls(args), timeout_ms=args.timeout_ms, pair=args.pair)
    rows = [{"pair": p.pair, "epoch": p.epoch, "mode": p.mode.name, "holder": p.holder} for p in pairs]

    def human() -> None:
        if not rows:
            print("the witness knows no pair yet" if not args.pair else f"the witness does not know pair {args.pair!r}")
            return
        _table(
            [(r["pair"], r["epoch"], r["mode"], r["holder"] or "-") for r in rows], ("PAIR", "EPOCH", "MODE", "HOLDER")
        )

    _emit(args, rows, human)
    return EXIT_OK


# ---- entry point


def _fail(args: argparse.Namespace | None, code: int, kind: str, message: str) -> int:
    if args is not None and getattr(args, "json", False):
        print(json.dumps({"error": kind, "message": message}), file=sys.stderr)
    else:
        print(f"replicatorctl: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except UsageError as error:
        return _fail(args, EXIT_USAGE, "usage", str(error))
    except (Unavailable, OutcomeUnknown) as error:
        target = args.witness if args.command == "witness" else args.endpoint
        what = "witness" if args.command == "witness" else "site"
        kind = "unavailable" if isinstance(error, Unavailable) else "outcome_unknown"
        return _fail(args, EXIT_UNREACHABLE, kind, f"{what} at {target}: {error.message}")
    except ClientError as error:
        kind = error.code.name.lower() if error.code is not None else "error"
        return _fail(args, EXIT_FAILED, kind, error.message)
    except BrokenPipeError:
        return EXIT_OK


def _entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
