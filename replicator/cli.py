"""replicatorctl: the operator's command line for a Replicator site pair and the witness.

Every command talks to a site (--endpoint, or REPLICATOR_ENDPOINT; several
comma-separated for `status` and `health`, and for data commands, which then
fail over between them) or to the witness (--witness) over gRPC, optionally
with mutual TLS (--ca, --cert, --key, or REPLICATOR_CA, REPLICATOR_CERT,
REPLICATOR_KEY). Output is a human table by default and JSON with --json.
Exit codes:

    0  success (status: every site asked answered; health: serving, in SYNC, witness reachable)
    1  the site refused or failed the request (not found, invalid argument, refused in this state, data loss)
    2  bad command line, or a dangerous command given without its confirmation flag
    3  the site or witness could not be reached, cannot serve, or the outcome is unknown
    4  verify found keys that differ (and did not repair them all)
    5  health: serving, but degraded (SOLO, a resync running, the peer or the witness unreachable)
    6  health: not serving (SUSPENDED, FENCED, STARTING, RESYNC_TARGET, drained)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import os

# Before grpc is imported: its C core's own lines ("I1202 ... Handshake failed") would mix with ours;
# the errors reach the operator as replicatorctl's messages (with hints) instead.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse  # noqa: E402
import base64
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import grpc

from replicator import __version__
from replicator.api.backend import DEGRADED, HEALTHY, NOT_SERVING, SiteStatus, health_of
from replicator.api.keys import describe_key
from replicator.client import (
    Client,
    ClientError,
    ObjectInfo,
    OutcomeUnknown,
    RetryPolicy,
    Unavailable,
    witness_status,
)
from replicator.client._api import LIST_PAGE_SIZE, OBJECTS, _Call
from replicator.client._common import MESSAGE_BYTES_MAX, channel_credentials, failure
from replicator.config import TlsFiles, parse_address
from replicator.v1 import admin_pb2, admin_pb2_grpc, objects_pb2

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DIFFERENCES = 0, 1, 2, 3, 4
EXIT_DEGRADED, EXIT_NOT_SERVING, EXIT_INTERRUPTED = 5, 6, 130
FAILOVER_TIMEOUT_MS_MIN = 30_000  # a forced failover waits for the witness and the leases
DEFAULT_ENDPOINT = "127.0.0.1:7400"
DEFAULT_WITNESS = "127.0.0.1:7600"

FAILOVER_WARNING = """\
refusing a forced failover without --force.

A forced failover makes this site go on alone although the witness did not
choose it: the site asks the witness for the next epoch with `force`, and the
witness grants it whatever its state (so the witness MUST be reachable; without
it the command fails and nothing changes). If the other site is in fact alive
and serving clients, it goes on serving until it learns of the new epoch, and
what it wrote alone is lost when it returns (it gets a full resync):
split brain. The witness normally decides this safely on its own: use a forced
failover only when you KNOW the other site is down (powered off, fenced at the
network) and the witness will not let this site go on (for example a replaced
witness that lost the pair's state). For a planned move with both sites healthy
use `replicatorctl switchover`; for a planned restart, `replicatorctl drain`.

Run again with --force to proceed."""


class UsageError(Exception):
    pass


class RequestFailed(Exception):
    """Refused by the CLI itself before anything was sent (exit 1, like the site's own refusals)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


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


def _addresses(text: str) -> list[str]:
    """One or more HOST:PORT, comma-separated."""
    found = [part.strip() for part in text.split(",") if part.strip()]
    if not found:
        raise argparse.ArgumentTypeError(f"not an address: {text!r} (HOST:PORT, or several comma-separated)")
    return [_address(part) for part in found]


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value) if value else None


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Connection options, accepted before the command and after it."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--endpoint",
        type=_addresses,
        default=default(_addresses(os.environ.get("REPLICATOR_ENDPOINT", DEFAULT_ENDPOINT))),
        help=f"site gRPC address HOST:PORT, or both sites' comma-separated (env REPLICATOR_ENDPOINT, "
        f"default {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "--witness",
        type=_address,
        default=default(os.environ.get("REPLICATOR_WITNESS") or None),
        help=f"witness gRPC address HOST:PORT (env REPLICATOR_WITNESS; `status` asks the site for it, "
        f"`witness` commands default to {DEFAULT_WITNESS})",
    )
    for option, env, what in (
        ("--ca", "REPLICATOR_CA", "CA certificate (PEM)"),
        ("--cert", "REPLICATOR_CERT", "client certificate (PEM)"),
        ("--key", "REPLICATOR_KEY", "client private key (PEM)"),
    ):
        parser.add_argument(
            option,
            dest=f"tls_{option[2:]}",
            type=Path,
            default=default(_env_path(env)),
            help=f"{what} for mutual TLS (env {env})",
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
        "3 site/witness unreachable or outcome unknown, 4 verify found differences, 5 health: degraded, "
        "6 health: not serving, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"replicatorctl {__version__}")
    _common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(parent: Any, name: str, help_text: str, handler: Callable[..., int]) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    status = command(
        commands,
        "status",
        "Show both sites and the witness side by side: state, epoch, why and since when, role, peer and "
        "witness reachability, replication lag, dirty keys, resync progress (rate, ETA), the preferred "
        "site as the witness holds it, versions. With one --endpoint the peer is found through it. "
        "Exit 0 if every site asked answered, 3 if none did.",
        cmd_status,
    )
    status.add_argument("--local", action="store_true", help="only the site(s) given, not the peer nor the witness")
    command(
        commands,
        "health",
        "Check whether each site serves: exit 0 healthy (SYNC, peer and witness reachable), 5 degraded "
        "(serving without redundancy or witness), 6 not serving, 3 unreachable; several sites: the worst.",
        cmd_health,
    )
    events = command(
        commands,
        "events",
        "Follow the site's events as JSON lines: role changes, failovers, resync start/progress/end, verify "
        "results, witness answers, admin actions with the caller's certificate identity. Ctrl-C stops.",
        cmd_events,
    )
    events.add_argument("--history", action="store_true", help="first the recent events the site kept")
    events.add_argument("--no-follow", action="store_true", help="stop after the history (with --history)")
    events.add_argument("--event", action="append", default=[], help="only events of this name (repeatable)")
    drain = command(
        commands,
        "drain",
        "Planned maintenance: the site refuses new client requests (clients move to the peer at once, "
        "health checks turn NOT_SERVING) and waits for those in flight. Then stop it; --undo serves again.",
        cmd_drain,
    )
    drain.add_argument("--undo", action="store_true", help="serve clients again")

    volume = commands.add_parser("volume", help="Create, list and delete block volumes.")
    volume_commands = volume.add_subparsers(dest="volume_command", metavar="ACTION", required=True)
    create = command(
        volume_commands, "create", "Create a volume of SIZE bytes (suffixes K, M, G, T).", cmd_volume_create
    )
    create.add_argument("name")
    create.add_argument("size", type=_size, help="size in bytes, a multiple of the block size (e.g. 64M, 10GiB)")
    create.add_argument("--block-size", type=_size, default=4096, help="block size in bytes (default 4096)")
    command(volume_commands, "list", "List volumes with their size and block size.", cmd_volume_list)
    delete = command(
        volume_commands, "delete", "Delete a volume and its blocks (asks for its name, or --yes).", cmd_volume_delete
    )
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")

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
    ls.add_argument("--limit", type=_non_negative, default=0, help="at most this many keys (0: all)")
    head = command(object_commands, "head", "Show an object's size and timestamp.", cmd_object_head)
    head.add_argument("bucket")
    head.add_argument("key")
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
    write.add_argument(
        "--quiet", action="store_true", help="no progress bar (data larger than one request goes in chunks)"
    )
    read = command(
        block_commands, "read", "Read COUNT blocks from LBA to standard output (or --output).", cmd_block_read
    )
    read.add_argument("volume")
    read.add_argument("lba", type=_non_negative)
    read.add_argument("count", type=_non_negative)
    read.add_argument("--output", type=Path, help="write the blocks to this file")
    trim = command(
        block_commands, "trim", "Discard COUNT blocks from LBA (they read as zeros afterwards).", cmd_block_trim
    )
    trim.add_argument("volume")
    trim.add_argument("lba", type=_non_negative)
    trim.add_argument("count", type=_non_negative)

    verify = command(
        commands,
        "verify",
        "Compare the two replicas while they serve; show progress on stderr and report the keys that differ.",
        cmd_verify,
    )
    verify.add_argument("--repair", action="store_true", help="also repair the keys that differ")

    resync = command(
        commands,
        "resync",
        "Resync control. Resyncs start on their own when a site returns; this only confirms one is "
        "running (--full is refused: a wiped site gets a full resync by itself).",
        cmd_resync,
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
        "with the peer unreachable, asks the witness for the next epoch and is granted it whatever the "
        "witness's state (the witness must be reachable); the other site gets a full resync when it "
        "returns (what it wrote alone is lost). Risks split brain if the other site is in fact alive "
        "and serving.",
        cmd_failover,
    )
    failover.add_argument("--force", action="store_true", help="confirm that you know the other site is down")

    witness = commands.add_parser("witness", help="Query the witness (--witness HOST:PORT).")
    witness_commands = witness.add_subparsers(dest="witness_command", metavar="ACTION", required=True)
    wstatus = command(
        witness_commands,
        "status",
        "Show each pair's epoch, mode (SYNC or SOLO), holder and preferred site (exit 1 for an unknown --pair).",
        cmd_witness_status,
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


def _client(args: argparse.Namespace, endpoints: Sequence[str] | None = None, timeout_ms: int | None = None) -> Client:
    if args.timeout_ms <= 0:
        raise UsageError(f"--timeout-ms: must be a positive integer, got {args.timeout_ms}")
    chosen = list(endpoints if endpoints is not None else args.endpoint)
    if len(chosen) > 2:
        raise UsageError(f"--endpoint: give one or two sites, got {len(chosen)}")
    retry = RetryPolicy(attempts_max=2, backoff_initial_ms=50, call_timeout_ms=timeout_ms or args.timeout_ms)
    return Client(chosen, tls=_tls(args), retry=retry)


def _channel(args: argparse.Namespace, address: str) -> grpc.Channel:
    tls = _tls(args)
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(tls))


def _since(ms: int, now_ms: int) -> str:
    if not ms:
        return "-"
    seconds = max(now_ms - ms, 0) // 1000
    when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))
    return f"{when} ({_duration(seconds)} ago)"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _resync_text(status: SiteStatus) -> str:
    done, total = status.resync_progress
    if status.resync_kind == "target":
        return "receiving (progress at the source)"
    if not status.resync_kind:
        return "none"
    text = f"{status.resync_kind}: {done}/{total} keys" + (f" ({100 * done // total}%)" if total else "")
    if status.resync_rate_keys_per_s:
        text += f", {status.resync_rate_keys_per_s:.0f} keys/s, ETA {_duration(status.resync_eta_s)}"
    return text


def _status_dict(status: SiteStatus) -> dict[str, Any]:
    data = dataclasses.asdict(status)
    data["health"], data["health_reasons"] = health_of(status)
    return data


def _ask_sites(args: argparse.Namespace, discover: bool) -> list[tuple[str, SiteStatus | None, str]]:
    """(address, status or None, error) for each site asked, and the peer found through the first one."""
    asked = list(args.endpoint)
    found: list[tuple[str, SiteStatus | None, str]] = []
    index = 0
    while index < len(asked):
        address = asked[index]
        index += 1
        try:
            with _client(args, [address]) as client:
                status = client.status()
        except ClientError as error:
            found.append((address, None, _hint(args, error, "site")))
            continue
        found.append((address, status, ""))
        if discover and status.peer_address and status.peer_address not in asked and len(asked) < 2:
            asked.append(status.peer_address)
    return found


def _witness_view(args: argparse.Namespace, sites: list[tuple[str, SiteStatus | None, str]]) -> dict[str, Any]:
    statuses = [s for _, s, _ in sites if s is not None]
    address = args.witness or next((s.details.get("witness", "") for s in statuses if s.details.get("witness")), "")
    pair = next((s.pair for s in statuses if s.pair), "")
    if not address:
        return {"address": "", "error": "unknown (give --witness)"}
    try:
        pairs = witness_status(address, tls=_tls(args), timeout_ms=args.timeout_ms, pair=pair)
    except ClientError as error:
        return {"address": address, "error": _hint(args, error, "witness")}
    if not pairs:
        return {"address": address, "error": f"the witness does not know pair {pair!r}"}
    state = pairs[0]
    return {
        "address": address,
        "pair": state.pair,
        "epoch": state.epoch,
        "mode": state.mode.name,
        "holder": state.holder,
        "preferred": state.preferred,
    }


def cmd_status(args: argparse.Namespace) -> int:
    sites = _ask_sites(args, discover=not args.local)
    witness = None if args.local else _witness_view(args, sites)
    answered = [status for _, status, _ in sites if status is not None]
    now_ms = int(time.time() * 1000)

    def column(address: str, status: SiteStatus | None, error: str) -> dict[str, str]:
        if status is None:
            return {"site": f"? at {address}", "state": "UNREACHABLE", "why": error}
        preferred = status.witness_preferred or status.preferred
        return {
            "site": f"{status.site} at {address}",
            "pair": f"{status.pair or '-'}  peer {status.peer or '-'}"
            + (f" at {status.peer_address}" if status.peer_address else ""),
            "state": f"{status.state}  epoch {status.epoch}" + ("  DRAINED" if status.draining else ""),
            "why": status.state_reason or "-",
            "since": _since(status.state_since_ms, now_ms),
            "role": (status.role or "-") + (" (preferred)" if preferred and preferred == status.site else ""),
            "health": " / ".join([health_of(status)[0], *health_of(status)[1]]),
            "peer": "reachable" if status.peer_reachable else "UNREACHABLE",
            "witness": "reachable" if status.witness_reachable else "UNREACHABLE",
            "preferred": (status.witness_preferred or "-")
            + " (at the witness)"
            + (f", configured {status.preferred}" if status.preferred else ", none configured"),
            "lag": f"{status.lag_records} records, {_human_bytes(status.lag_bytes)}",
            "dirty keys": str(status.dirty_keys),
            "resync": _resync_text(status),
            "version": f"{status.version or '?'}, up {_duration((now_ms - status.started_ms) / 1000)}"
            if status.started_ms
            else status.version or "?",
        }

    def human() -> None:
        columns = [column(*site) for site in sites]
        names = list(dict.fromkeys(name for c in columns for name in c))
        width = max(len(name) for name in [*names, "witness state"])
        widths = [max(len(c.get(name, "")) for name in names) for c in columns]
        for name in names:
            cells = [c.get(name, "").ljust(w) for c, w in zip(columns, widths, strict=True)]
            print(f"{name.ljust(width)}  " + "   ".join(cells).rstrip())
        if witness is not None:
            if "error" in witness:
                print(f"{'witness state'.ljust(width)}  {witness['address'] or '-'}: {witness['error']}")
            else:
                print(
                    f"{'witness state'.ljust(width)}  {witness['address']}: pair {witness['pair']} epoch {witness['epoch']} "
                    f"{witness['mode']} holder {witness['holder'] or '-'} preferred {witness['preferred'] or '-'}"
                )

    data = {
        "sites": [
            {"address": address, **(_status_dict(status) if status is not None else {"error": error})}
            for address, status, error in sites
        ],
        "witness": witness,
    }
    _emit(args, data, human)
    if not answered:
        first = sites[0]
        print(f"replicatorctl: site at {first[0]}: {first[2]}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK


_HEALTH_EXIT = {HEALTHY: EXIT_OK, DEGRADED: EXIT_DEGRADED, NOT_SERVING: EXIT_NOT_SERVING}
_SEVERITY = [EXIT_OK, EXIT_DEGRADED, EXIT_NOT_SERVING, EXIT_UNREACHABLE]


def cmd_health(args: argparse.Namespace) -> int:
    results = []
    for address, status, error in _ask_sites(args, discover=False):
        if status is None:
            results.append({"address": address, "health": "unreachable", "reasons": [error], "exit": EXIT_UNREACHABLE})
            continue
        level, reasons = health_of(status)
        results.append(
            {
                "address": address,
                "site": status.site,
                "state": status.state,
                "epoch": status.epoch,
                "health": level,
                "reasons": reasons,
                "exit": _HEALTH_EXIT[level],
            }
        )

    def human() -> None:
        for result in results:
            what = f"site {result['site']} ({result['state']} epoch {result['epoch']})" if "site" in result else "site"
            print(f"{result['address']}: {what} {result['health']}" + "".join(f"; {r}" for r in result["reasons"]))

    _emit(args, results, human)
    return max((int(result["exit"]) for result in results), key=_SEVERITY.index)


def cmd_events(args: argparse.Namespace) -> int:
    wanted = set(args.event)
    channel = _channel(args, args.endpoint[0])
    try:
        stream = admin_pb2_grpc.AdminServiceStub(channel).Events(
            admin_pb2.EventsRequest(history=args.history or args.no_follow, no_follow=args.no_follow)
        )
        for line in stream:
            if wanted and json.loads(line.json).get("event") not in wanted:
                continue
            print(line.json, flush=True)
    except grpc.RpcError as error:
        raise failure(error, args.endpoint[0], [args.endpoint[0]]) from None
    finally:
        channel.close()
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    channel = _channel(args, args.endpoint[0])
    try:
        answer = admin_pb2_grpc.AdminServiceStub(channel).Drain(
            admin_pb2.DrainRequest(undo=args.undo), timeout=max(args.timeout_ms, 30_000) / 1000
        )
    except grpc.RpcError as error:
        raise failure(error, args.endpoint[0], [args.endpoint[0]]) from None
    finally:
        channel.close()
    if args.undo:
        _emit(args, {"drained": False}, lambda: print(f"site at {args.endpoint[0]} serves clients again"))
        return EXIT_OK
    _emit(
        args,
        {"drained": True, "in_flight": answer.in_flight},
        lambda: print(
            f"site at {args.endpoint[0]} drained: it refuses new requests (clients go to the peer), "
            + (
                "nothing in flight; stop it now"
                if not answer.in_flight
                else f"{answer.in_flight} requests still in flight; stop it when they are done"
            )
        ),
    )
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


def cmd_object_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.get(args.bucket, args.key)
    if args.json:
        _emit(args, {"bucket": args.bucket, "key": args.key, "size_bytes": len(data), "data_base64": data}, print)
    else:
        _write_output(data, args.output)
    return EXIT_OK


def cmd_object_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.bucket, args.key)
    _emit(args, {"removed": f"{args.bucket}/{args.key}"}, lambda: print(f"removed {args.bucket}/{args.key}"))
    return EXIT_OK


def cmd_block_read(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.read_blocks(args.volume, args.lba, args.count)
    if args.json:
        _emit(args, {"volume": args.volume, "lba": args.lba, "count": args.count, "data_base64": data}, print)
    else:
        _write_output(data, args.output)
    return EXIT_OK


def _limit(client: Client, name: str, fallback: int) -> tuple[int, str]:
    """A request limit of the site (its status names them), or `fallback` for a site that does not say."""
    try:
        status = client.status()
    except ClientError:
        return fallback, ""
    value = status.details.get(name, "")
    return (int(value), status.site) if value.isdigit() else (fallback, status.site)


def cmd_volume_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete volume {args.name!r} without --yes (no terminal to ask on)")
        print(f"Delete volume {args.name!r} and all its blocks at both sites? Type its name to confirm: ", end="")
        sys.stdout.flush()
        if sys.stdin.readline().strip() != args.name:
            raise UsageError(f"not confirmed: volume {args.name!r} kept")
    with _client(args) as client:
        client.delete_volume(args.name)
    _emit(args, {"deleted": args.name}, lambda: print(f"deleted volume {args.name}"))
    return EXIT_OK


LARGE_HINT = " (objects larger than that go through the large-object API, PutLarge / put_large, or S3)"


def cmd_object_put(args: argparse.Namespace) -> int:
    with _client(args) as client:
        limit, site = _limit(client, "object_bytes_max", MESSAGE_BYTES_MAX - 64 * 1024)
        where = f" at site {site}" if site else ""
        if args.file is not None:
            try:
                size = args.file.stat().st_size
            except OSError as error:
                raise UsageError(f"cannot read {str(args.file)!r}: {error.strerror}") from None
            if size > limit:
                raise RequestFailed(
                    "invalid_argument",
                    f"object is {size} bytes, the limit (api.object_bytes_max{where}) is {limit}" + LARGE_HINT,
                )
        if args.data is None and args.file is None:
            if sys.stdin.isatty():
                raise UsageError("no input: give --file or --data, or pipe the object on standard input")
            data = sys.stdin.buffer.read(limit + 1)
            if len(data) > limit:
                raise RequestFailed(
                    "invalid_argument",
                    f"standard input holds more than the limit (api.object_bytes_max{where}) of {limit} bytes"
                    + LARGE_HINT,
                )
        else:
            data = _read_input(args.file, args.data)
            if len(data) > limit:
                raise RequestFailed(
                    "invalid_argument",
                    f"object is {len(data)} bytes, the limit (api.object_bytes_max{where}) is {limit}" + LARGE_HINT,
                )
        ts = client.put(args.bucket, args.key, data)
    _emit(
        args,
        {"bucket": args.bucket, "key": args.key, "size_bytes": len(data), "ts": ts},
        lambda: print(f"stored {args.bucket}/{args.key} ({len(data)} bytes)"),
    )
    return EXIT_OK


def cmd_object_head(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.head(args.bucket, args.key)
    _emit(
        args,
        {"bucket": args.bucket, "key": args.key, "size_bytes": info.size_bytes, "ts": info.ts},
        lambda: print(
            f"{args.bucket}/{args.key}: {info.size_bytes} bytes ({_human_bytes(info.size_bytes)}), ts {info.ts}"
        ),
    )
    return EXIT_OK


def _objects(client: Client, bucket: str, prefix: str, limit: int) -> Iterator[ObjectInfo]:
    """Page by page, as they come (a bucket of 300k keys shows its first line at once)."""
    token, shown = b"", 0
    while True:
        page_size = min(LIST_PAGE_SIZE, limit - shown) if limit else LIST_PAGE_SIZE
        request = objects_pb2.ListRequest(bucket=bucket, prefix=prefix, page_size=page_size, page_token=token)
        page = client._run(_Call(OBJECTS, "List", request, lambda r: r))
        for entry in page.objects:
            yield ObjectInfo(entry.key, entry.size_bytes, entry.ts)
            shown += 1
            if limit and shown >= limit:
                return
        token = page.next_page_token
        if not token:
            return


def cmd_object_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        objects = _objects(client, args.bucket, args.prefix, args.limit)
        if args.json:
            print(json.dumps([dataclasses.asdict(o) for o in objects], indent=2, sort_keys=True))
            return EXIT_OK
        print("KEY  SIZE_BYTES")
        for info in objects:
            print(f"{info.key}  {info.size_bytes}", flush=False)
        sys.stdout.flush()
    return EXIT_OK


def _volume(client: Client, name: str) -> Any:
    for volume in client.list_volumes():
        if volume.name == name:
            return volume
    raise RequestFailed("not_found", f"volume {name!r} not found")


def cmd_block_write(args: argparse.Namespace) -> int:
    with _client(args) as client:
        volume = _volume(client, args.volume)
        limit, _ = _limit(client, "block_write_bytes_max", 1 << 20)
        chunk = max(limit // volume.block_size, 1) * volume.block_size
        if args.file is not None:
            try:
                source: IO[bytes] = args.file.open("rb")
                total = args.file.stat().st_size
            except OSError as error:
                raise UsageError(f"cannot read {str(args.file)!r}: {error.strerror}") from None
            if total % volume.block_size:
                raise RequestFailed(
                    "invalid_argument",
                    f"data is {total} bytes, not a whole number of {volume.block_size}-byte blocks of volume "
                    f"{args.volume!r}",
                )
        else:
            if sys.stdin.isatty():
                raise UsageError("no input: give --file, or pipe the data on standard input")
            source, total = sys.stdin.buffer, 0
        bar = ProgressBar(sys.stderr, label="write", unit="bytes")
        written, ts, lba = 0, 0, args.lba
        try:
            with source:
                while True:
                    data = source.read(chunk)
                    if not data:
                        break
                    ts = client.write_blocks(args.volume, lba, data)
                    written += len(data)
                    lba += len(data) // volume.block_size
                    if not args.quiet and (total or written) > chunk:
                        bar(written, total or written)
        finally:
            bar.finish()
    _emit(
        args,
        {"volume": args.volume, "lba": args.lba, "bytes": written, "ts": ts},
        lambda: print(
            f"wrote {written} bytes to {args.volume} at block {args.lba}"
            + (f" in {-(-written // chunk)} requests of at most {chunk} bytes (each atomic)" if written > chunk else "")
        ),
    )
    return EXIT_OK


def cmd_block_trim(args: argparse.Namespace) -> int:
    with _client(args) as client:
        most, _ = _limit(client, "trim_blocks_max", 4096)
        lba, left, ts = args.lba, args.count, 0
        while left:
            count = min(left, most)
            ts = client.trim_blocks(args.volume, lba, count)
            lba, left = lba + count, left - count
    _emit(
        args,
        {"volume": args.volume, "lba": args.lba, "count": args.count, "ts": ts},
        lambda: print(f"trimmed {args.count} blocks of {args.volume} from block {args.lba}"),
    )
    return EXIT_OK


class ProgressBar:
    """One line on stderr, rewritten in place."""

    def __init__(self, stream: IO[str], width: int = 30, label: str = "verify", unit: str = "keys") -> None:
        self.stream = stream
        self.width = width
        self.label = label
        self.unit = unit
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        filled = int(self.width * fraction)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {100 * fraction:5.1f}%  {done}/{total} {self.unit}")
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
    with _client(args, [args.endpoint[0]], timeout_ms=max(args.timeout_ms, FAILOVER_TIMEOUT_MS_MIN)) as client:
        client.failover(force=True)
    _emit(args, {"failover": "forced"}, lambda: print(f"forced failover: site at {args.endpoint} goes on alone"))
    return EXIT_OK


def cmd_witness_status(args: argparse.Namespace) -> int:
    if args.timeout_ms <= 0:
        raise UsageError(f"--timeout-ms: must be a positive integer, got {args.timeout_ms}")
    address = args.witness or DEFAULT_WITNESS
    pairs = witness_status(address, tls=_tls(args), timeout_ms=args.timeout_ms, pair=args.pair)
    if args.pair and not pairs:
        raise RequestFailed(
            "not_found",
            f"the witness at {address} does not know pair {args.pair!r} (it knows a pair once declared in its "
            f"[[pairs]] or once a site of it asked; `replicatorctl witness status` lists them)",
        )
    rows = [
        {"pair": p.pair, "epoch": p.epoch, "mode": p.mode.name, "holder": p.holder, "preferred": p.preferred}
        for p in pairs
    ]

    def human() -> None:
        if not rows:
            print("the witness knows no pair yet")
            return
        _table(
            [(r["pair"], r["epoch"], r["mode"], r["holder"] or "-", r["preferred"] or "-") for r in rows],
            ("PAIR", "EPOCH", "MODE", "HOLDER", "PREFERRED"),
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


TLS_SIGNS = ("socket closed", "ssl", "handshake", "certificate", "connection reset", "tls")


def _hint(args: argparse.Namespace, error: ClientError, what: str) -> str:
    """The error's message, with what to do about the usual causes (TLS, the wrong service)."""
    message = error.message
    lowered = message.lower()
    if error.code == grpc.StatusCode.UNIMPLEMENTED:
        other = (
            "the witness? use `replicatorctl --witness ADDRESS witness status`"
            if what == "site"
            else "a site? use `replicatorctl --endpoint ADDRESS status`"
        )
        return f"this is not a Replicator {what} (the service answered {message!r}); is it {other}"
    if isinstance(error, Unavailable) and any(sign in lowered for sign in TLS_SIGNS):
        if _tls(args) is None:
            message += (
                f" (hint: the {what} may require mutual TLS: give --ca, --cert and --key, or set REPLICATOR_CA, "
                "REPLICATOR_CERT and REPLICATOR_KEY)"
            )
        else:
            message += (
                f" (hint: a TLS handshake failure? the CA must have signed the {what}'s certificate, whose names "
                f"must include the address you gave, and the {what} must trust the CA of your client certificate)"
            )
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except KeyboardInterrupt:
        # Ctrl-C: quietly, with the shell's status for SIGINT (nothing half-done: every call is atomic).
        print("", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as error:
        return _fail(args, EXIT_USAGE, "usage", str(error))
    except RequestFailed as error:
        return _fail(args, EXIT_FAILED, error.kind, error.message)
    except (Unavailable, OutcomeUnknown) as error:
        target = (args.witness or DEFAULT_WITNESS) if args.command == "witness" else args.endpoint[0]
        what = "witness" if args.command == "witness" else "site"
        kind = "unavailable" if isinstance(error, Unavailable) else "outcome_unknown"
        return _fail(args, EXIT_UNREACHABLE, kind, f"{what} at {target}: {_hint(args, error, what)}")
    except ClientError as error:
        what = "witness" if args.command == "witness" else "site"
        kind = error.code.name.lower() if error.code is not None else "error"
        return _fail(args, EXIT_FAILED, kind, _hint(args, error, what))
    except BrokenPipeError:
        return EXIT_OK


def _entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
