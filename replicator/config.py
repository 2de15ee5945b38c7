"""Configuration of a site daemon and of the witness, from TOML.

Theory of operation: a configuration file is parsed with `tomllib`, then
every section is built into a frozen dataclass field by field. Each field
declares its type and a check; the first bad value is refused with its full
name and the reason (`site.peer_timeout_ms: must be a positive integer, got
-5`), and so is any key the schema does not know (with a suggestion when it
looks like a typo). Checks that tie several keys together run after the
sections are built. Nothing is read from the environment except
REPLICATOR_CHAOS, which unlocks the chaos-only `chaos.test_plant` setting.

Relative paths (data_dir, TLS files) are resolved against the directory of
the configuration file, so a launcher can write a self-contained tree.

Every listen address defaults to loopback (127.0.0.1). A non-loopback
address is served only when it is written in the file: it is never a
default, and `SiteConfig.exposed_addresses()` names them for the start-up log.

Layout of a site file (every key but the four in [site] marked required has
a default; see docs/operations.md for the full table):

    [site]
    name = "a"                 # required
    peer_name = "b"            # required
    pair_id = "pair-1"         # required
    data_dir = "data/a"        # required
    peer_address = "127.0.0.1:7501"
    peer_timeout_ms = 1000
    ...
    [listen]  grpc, link, metrics
    [witness] address, timeout_ms, retry_interval_ms
    [api]     request limits and timeouts of the gRPC data API
    [s3]      the S3 endpoint: enabled, listen, credentials_file, limits (docs/s3.md)
    [nbd]     listen (empty: no NBD server), connection and in-flight bounds
    [tls.grpc] / [tls.link] / [tls.witness] / [tls.nbd] / [tls.s3]   ca_file, cert_file, key_file
    [chaos]   test_plant (refused unless REPLICATOR_CHAOS=1)
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ApiConfig",
    "ChaosConfig",
    "ConfigError",
    "DaemonBounds",
    "ListenConfig",
    "NbdConfig",
    "PairSpec",
    "S3Config",
    "SiteConfig",
    "SiteSection",
    "SiteSettings",
    "TlsConfig",
    "TlsFiles",
    "WitnessClientConfig",
    "WitnessConfig",
    "WitnessListenConfig",
    "WitnessClientSettings",
    "WitnessSection",
    "derive",
    "load_site_config",
    "load_witness_config",
    "parse_address",
    "site_config_from_mapping",
    "witness_config_from_mapping",
]

CHAOS_ENVIRONMENT_VARIABLE = "REPLICATOR_CHAOS"
KIB = 1024
MIB = 1024 * KIB
TICK_MS = 10  # the site daemon's timer: it steps its core at least this often (CoreConfig.tick_ms)


class ConfigError(ValueError):
    """A configuration value was refused; the message names the key and the reason."""


# --------------------------------------------------------------------------
# Checks. Each returns the (possibly normalised) value or raises _Refused
# with the reason; the builder prefixes the key's full name.


class _Refused(Exception):
    pass


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _check_positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Refused(f"must be a positive integer, got {_describe(value)}")
    return value


def _check_non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Refused(f"must be a non-negative integer, got {_describe(value)}")
    return value


def _check_boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Refused(f"must be true or false, got {_describe(value)}")
    return value


def _check_string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Refused(f"must be a string, got {_describe(value)}")
    return value


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _check_name(value: Any) -> str:
    _check_string(value)
    if not _NAME.match(value):
        raise _Refused(
            f"must be 1 to 63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit, "
            f"got {_describe(value)}"
        )
    return str(value)


def _check_optional_name(value: Any) -> str:
    return "" if value == "" else _check_name(value)


def parse_address(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port") into (host, port); raise ValueError if malformed."""
    if value.startswith("["):
        host, separator, port_text = value[1:].partition("]:")
    else:
        host, separator, port_text = value.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be at most 65535, got {value!r}")
    return host, port


def _check_address(value: Any) -> str:
    _check_string(value)
    try:
        parse_address(value)
    except ValueError as error:
        raise _Refused(str(error)) from None
    return str(value)


def _check_optional_address(value: Any) -> str:
    return "" if value == "" else _check_address(value)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _field(default: Any = dataclasses.MISSING, *, check: Callable[[Any], Any], doc: str, path: bool = False) -> Any:
    metadata = {"check": check, "doc": doc, "path": path}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------
# Sections.


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for mutual TLS: the CA that signs the other side, our certificate and key."""

    ca_file: Path = _field(check=_check_string, doc="CA certificate (PEM) that signs the other side", path=True)
    cert_file: Path = _field(check=_check_string, doc="this process's certificate (PEM)", path=True)
    key_file: Path = _field(check=_check_string, doc="this process's private key (PEM)", path=True)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Return (ca, cert, key) bytes."""
        return self.ca_file.read_bytes(), self.cert_file.read_bytes(), self.key_file.read_bytes()


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Optional TLS per channel; None means plaintext (loopback or a trusted network only)."""

    grpc: TlsFiles | None = None
    link: TlsFiles | None = None
    witness: TlsFiles | None = None
    nbd: TlsFiles | None = None  # when set, NBD clients must STARTTLS with a certificate this CA signed
    s3: TlsFiles | None = None  # HTTPS on the S3 endpoint (a client certificate is not required)


@dataclass(frozen=True, slots=True)
class SiteSection:
    name: str = _field(check=_check_name, doc="this site's name (required)")
    peer_name: str = _field(check=_check_name, doc="the other site's name (required)")
    pair_id: str = _field(check=_check_name, doc="the pair both sites replicate (required)")
    data_dir: Path = _field(check=_check_string, doc="RocksDB and log directory (required)", path=True)
    peer_address: str = _field("127.0.0.1:7501", check=_check_address, doc="the peer's link address")
    peer_grpc_address: str = _field(
        "", check=_check_optional_address, doc="the peer's gRPC address, named to clients when this site cannot serve"
    )
    peer_timeout_ms: int = _field(1000, check=_check_positive_int, doc="silence from the peer before SUSPENDED")
    heartbeat_interval_ms: int = _field(
        100, check=_check_positive_int, doc="heartbeat interval on an idle link (was heartbeat_ms)"
    )
    lease_ms: int = _field(2000, check=_check_positive_int, doc="read lease granted by each frame")
    lease_drift_ppm: int = _field(1000, check=_check_non_negative_int, doc="clock-rate error allowed for leases")
    preferred_site: str = _field("", check=_check_optional_name, doc="site that wins when both are alive; empty: none")
    static_priority: bool = _field(
        False, check=_check_boolean, doc="preferred site goes on alone if the witness is down"
    )
    static_priority_wait_ms: int = _field(
        3000, check=_check_positive_int, doc="with static_priority: how long the witness is out of reach first"
    )
    inflight_bytes_max: int = _field(64 * MIB, check=_check_positive_int, doc="unacknowledged bytes on the link")
    frame_size_bytes_max: int = _field(8 * MIB, check=_check_positive_int, doc="largest frame on the link")
    dedup_age_ms: int = _field(600_000, check=_check_positive_int, doc="how long a request id is remembered")
    dedup_entries_max: int = _field(1_000_000, check=_check_positive_int, doc="request ids remembered at most")
    read_wait_ms_max: int = _field(
        1000, check=_check_positive_int, doc="how long a read waits for a prepared record (was read_wait_ms)"
    )
    reconnect_backoff_ms_max: int = _field(1000, check=_check_positive_int, doc="longest wait between peer reconnects")
    shutdown_stage_timeout_ms: int = _field(5000, check=_check_positive_int, doc="bound on each shutdown stage")
    # The core's bounds (replicator/core/config.py), under the core's names.
    inflight_records_max: int = _field(
        10_000, check=_check_positive_int, doc="records sent to the peer and not yet acknowledged; more writes wait"
    )
    parked_reads_max: int = _field(
        10_000, check=_check_positive_int, doc="reads waiting for a lease or a prepared record; more are refused"
    )
    resync_batch_keys_max: int = _field(128, check=_check_positive_int, doc="keys in one resync batch")
    resync_batches_inflight_max: int = _field(
        4, check=_check_positive_int, doc="resync batches loading or unacknowledged at once"
    )
    reconcile_records_per_message_max: int = _field(
        256, check=_check_positive_int, doc="records in one reconcile message (also cut to the frame)"
    )
    dedup_entries_per_message_max: int = _field(
        1024, check=_check_positive_int, doc="request ids in one resync dedup message (also cut to the frame)"
    )
    # The daemon's queues between layers.
    send_queue_bytes_max: int = _field(
        64 * MIB, check=_check_positive_int, doc="frames queued for the link; above it new writes are refused"
    )
    requests_inflight_max: int = _field(
        20_000, check=_check_positive_int, doc="client requests waiting for the core; more are refused"
    )


# Keys that were renamed: the old name is still accepted (with a warning in the log at start-up).
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "site": {"heartbeat_ms": "heartbeat_interval_ms", "read_wait_ms": "read_wait_ms_max"},
}
# Keys that were removed, and why: refused with the reason, so that nobody believes they act.
REMOVED_KEYS: dict[str, dict[str, str]] = {
    "site": {
        "preferred_grace_ms": (
            "removed: it was never read; the preferred site's head start is the witness's "
            "witness.preferred_grace_ms (in the witness's configuration). Delete this line"
        ),
    },
}


@dataclass(frozen=True, slots=True)
class ListenConfig:
    grpc: str = _field("127.0.0.1:7400", check=_check_address, doc="client gRPC API (objects, blocks, admin, health)")
    link: str = _field("127.0.0.1:7500", check=_check_address, doc="peer log-shipping link")
    metrics: str = _field("127.0.0.1:9400", check=_check_address, doc="Prometheus metrics over HTTP")


@dataclass(frozen=True, slots=True)
class WitnessClientConfig:
    address: str = _field("127.0.0.1:7600", check=_check_address, doc="the witness's gRPC address")
    # Longer than the witness's preferred_grace_ms (default 2000): the witness holds a non-preferred
    # site's Arbitrate that long before it answers, and a shorter deadline turns every such failover
    # into a `witness_failed Deadline Exceeded` and a retry.
    timeout_ms: int = _field(
        3000, check=_check_positive_int, doc="deadline of one witness call (longer than the witness's grace)"
    )
    retry_interval_ms: int = _field(250, check=_check_positive_int, doc="wait between witness attempts")


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Limits and timeouts of the gRPC data API (see docs/api.md)."""

    request_timeout_ms: int = _field(5000, check=_check_positive_int, doc="server-side bound on one request")
    bucket_bytes_max: int = _field(63, check=_check_positive_int, doc="longest bucket name")
    key_bytes_max: int = _field(1024, check=_check_positive_int, doc="longest object key (UTF-8 bytes)")
    volume_name_bytes_max: int = _field(63, check=_check_positive_int, doc="longest volume name")
    object_bytes_max: int = _field(1 * MIB, check=_check_positive_int, doc="largest object")
    batch_bytes_max: int = _field(4 * MIB, check=_check_positive_int, doc="largest PutBatch (keys and data)")
    batch_items_max: int = _field(1000, check=_check_positive_int, doc="most objects in one PutBatch")
    block_write_bytes_max: int = _field(1 * MIB, check=_check_positive_int, doc="largest WriteBlocks")
    block_read_bytes_max: int = _field(4 * MIB, check=_check_positive_int, doc="largest ReadBlocks answer")
    trim_blocks_max: int = _field(4096, check=_check_positive_int, doc="most blocks in one TrimBlocks")
    volume_size_bytes_max: int = _field(1 << 44, check=_check_positive_int, doc="largest volume (16 TiB)")
    list_page_size_max: int = _field(1000, check=_check_positive_int, doc="most entries in one List page")
    request_id_bytes_max: int = _field(64, check=_check_positive_int, doc="longest request id")
    stream_inflight_max: int = _field(64, check=_check_positive_int, doc="items of one stream processed at once")
    session_inflight_max: int = _field(
        256, check=_check_positive_int, doc="calls of one client session (Session stream) served at once"
    )
    verify_keys_max: int = _field(1000, check=_check_positive_int, doc="most differing keys listed by Verify")
    volume_delete_batch_blocks: int = _field(1024, check=_check_positive_int, doc="blocks erased per write on delete")
    health_refresh_ms: int = _field(500, check=_check_positive_int, doc="how often health status follows state")
    admission_ops_max: int = _field(
        1024, check=_check_positive_int, doc="data requests (gRPC and S3) of a site in flight at once"
    )
    admission_bytes_max: int = _field(
        256 * MIB, check=_check_positive_int, doc="payload bytes of the data requests in flight at once"
    )
    admission_wait_ms: int = _field(
        1000, check=_check_non_negative_int, doc="how long a request waits for room before RESOURCE_EXHAUSTED"
    )

    @property
    def message_bytes_max(self) -> int:
        """gRPC message limit: the largest request or answer plus room for the envelope."""
        return (
            max(self.object_bytes_max, self.batch_bytes_max, self.block_write_bytes_max, self.block_read_bytes_max)
            + 64 * KIB
        )


@dataclass(frozen=True, slots=True)
class NbdConfig:
    """The NBD server of a site (replicator/nbd/, docs/nbd.md): one export per block volume."""

    listen: str = _field("", check=_check_optional_address, doc="NBD server address (HOST:PORT); empty: no NBD server")
    connections_max: int = _field(64, check=_check_positive_int, doc="NBD connections open at once")
    inflight_requests_max: int = _field(64, check=_check_positive_int, doc="requests of one connection in flight")
    site_inflight_requests_max: int = _field(
        256, check=_check_positive_int, doc="requests of all NBD connections in flight"
    )
    request_bytes_max: int = _field(
        1 * MIB, check=_check_positive_int, doc="largest read or write payload (also bounded by api.block_*_bytes_max)"
    )
    handshake_timeout_ms: int = _field(10_000, check=_check_positive_int, doc="bound on one client's negotiation")
    block_status_blocks_max: int = _field(
        4096, check=_check_positive_int, doc="most blocks one NBD_CMD_BLOCK_STATUS answers about"
    )
    exports_listed_max: int = _field(1000, check=_check_positive_int, doc="most volumes NBD_OPT_LIST names")
    state_poll_ms: int = _field(
        50, check=_check_positive_int, doc="how often the server checks whether the site still serves"
    )


@dataclass(frozen=True, slots=True)
class S3Config:
    """The S3 endpoint of a site (replicator/s3, docs/s3.md)."""

    enabled: bool = _field(False, check=_check_boolean, doc="serve S3 on s3.listen")
    listen: str = _field("127.0.0.1:7700", check=_check_address, doc="S3 endpoint (HTTP, HTTPS with [tls.s3])")
    credentials_file: str = _field(
        "", check=_check_string, doc="TOML file of [[credentials]] access_key, secret_key (required when enabled)"
    )
    region: str = _field("us-east-1", check=_check_string, doc="the region the endpoint reports")
    virtual_host_suffix: str = _field("", check=_check_string, doc="serve bucket.SUFFIX virtual-host style too")
    piece_bytes: int = _field(1 * MIB, check=_check_positive_int, doc="an object larger than this goes in pieces")
    inline_bytes_max: int = _field(
        16 * KIB, check=_check_non_negative_int, doc="a body up to this is stored inside its manifest (0: never)"
    )
    object_bytes_max: int = _field(5 * 1024 * MIB, check=_check_positive_int, doc="largest single PUT or part")
    part_bytes_min: int = _field(5 * MIB, check=_check_positive_int, doc="smallest multipart part but the last")
    parts_max: int = _field(10_000, check=_check_positive_int, doc="most parts in one multipart upload")
    pieces_inflight_max: int = _field(4, check=_check_positive_int, doc="pieces of one upload written at once")
    clock_skew_ms_max: int = _field(900_000, check=_check_positive_int, doc="signed request time vs ours")
    garbage_age_ms: int = _field(
        3_600_000, check=_check_positive_int, doc="an unreferenced piece set this old is freed by the sweep"
    )
    garbage_sweep_interval_ms: int = _field(60_000, check=_check_positive_int, doc="time between garbage sweeps")


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    test_plant: str = _field(
        "", check=_check_string, doc="chaos only: a deliberately planted fault, to test the checkers"
    )
    log_commits: bool = _field(
        False, check=_check_boolean, doc="log every commit decision (for the split-brain checker; verbose)"
    )


@dataclass(frozen=True, slots=True)
class SiteConfig:
    site: SiteSection
    listen: ListenConfig = ListenConfig()
    witness: WitnessClientConfig = WitnessClientConfig()
    api: ApiConfig = ApiConfig()
    tls: TlsConfig = TlsConfig()
    chaos: ChaosConfig = ChaosConfig()
    nbd: NbdConfig = NbdConfig()
    s3: S3Config = S3Config()
    # Old key names the file used (accepted, see RENAMED_KEYS): the daemon logs each at start-up.
    deprecated: tuple[str, ...] = field(default=(), compare=False)

    def exposed_addresses(self) -> list[str]:
        """Listen addresses that are not loopback (explicitly configured), for the start-up log."""
        listens = (self.listen.grpc, self.listen.link, self.listen.metrics, self.nbd.listen)
        listens += (self.s3.listen,) if self.s3.enabled else ()
        return [a for a in listens if a and not _is_loopback(a)]

    def to_toml(self) -> str:
        return _to_toml(self)


@dataclass(frozen=True, slots=True)
class WitnessSection:
    data_dir: Path = _field(check=_check_string, doc="RocksDB directory of arbitration state (required)", path=True)
    name: str = _field("witness", check=_check_name, doc="name in logs and status")
    preferred_grace_ms: int = _field(2000, check=_check_non_negative_int, doc="hold on a non-preferred site's request")
    preferred_silence_ms: int = _field(
        1500,
        check=_check_non_negative_int,
        doc="end the hold early once the preferred site has sent nothing this long (sites report every 1 s); 0: never",
    )
    request_timeout_ms: int = _field(5000, check=_check_positive_int, doc="server-side bound on one request")
    shutdown_stage_timeout_ms: int = _field(5000, check=_check_positive_int, doc="bound on each shutdown stage")


@dataclass(frozen=True, slots=True)
class WitnessListenConfig:
    grpc: str = _field("127.0.0.1:7600", check=_check_address, doc="witness gRPC API")
    metrics: str = _field("127.0.0.1:9600", check=_check_address, doc="Prometheus metrics over HTTP")


@dataclass(frozen=True, slots=True)
class PairSpec:
    id: str = _field(check=_check_name, doc="pair id")
    sites: tuple[str, ...] = _field(check=lambda v: v, doc="the two site names")
    preferred_site: str = _field("", check=_check_optional_name, doc="site favoured when both ask")


@dataclass(frozen=True, slots=True)
class WitnessConfig:
    witness: WitnessSection
    listen: WitnessListenConfig = WitnessListenConfig()
    tls: TlsConfig = TlsConfig()
    pairs: tuple[PairSpec, ...] = ()

    def exposed_addresses(self) -> list[str]:
        return [a for a in (self.listen.grpc, self.listen.metrics) if not _is_loopback(a)]

    def to_toml(self) -> str:
        return _to_toml(self)


def _is_loopback(value: str) -> bool:
    return is_loopback_host(parse_address(value)[0])


# --------------------------------------------------------------------------
# Building.


def _build_section(cls: type, raw: Any, prefix: str, base_dir: Path | None) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: must be a table, got {_describe(raw)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1)
            suggestion = f" (did you mean {hint[0]}?)" if hint else f" (known: {', '.join(sorted(known))})"
            raise ConfigError(f"{prefix}.{key}: unknown key{suggestion}")
    values: dict[str, Any] = {}
    for name_, spec in known.items():
        if name_ not in raw:
            if spec.default is dataclasses.MISSING:
                raise ConfigError(f"{prefix}.{name_}: required, missing ({spec.metadata['doc']})")
            continue
        try:
            value = spec.metadata["check"](raw[name_])
        except _Refused as refused:
            raise ConfigError(f"{prefix}.{name_}: {refused}") from None
        if spec.metadata.get("path"):
            if value == "":
                raise ConfigError(f"{prefix}.{name_}: must be a path, got ''")
            path = Path(value).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            value = path
        values[name_] = value
    return cls(**values)


def _build_tls(raw: Any, base_dir: Path | None, channels: tuple[str, ...]) -> TlsConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"tls: must be a table, got {_describe(raw)}")
    for key in raw:
        if key not in channels:
            raise ConfigError(f"tls.{key}: unknown key (known: {', '.join(channels)})")
    built: dict[str, TlsFiles] = {}
    for channel in channels:
        if channel not in raw:
            continue
        files = _build_section(TlsFiles, raw[channel], f"tls.{channel}", base_dir)
        for field_name in ("ca_file", "cert_file", "key_file"):
            path = getattr(files, field_name)
            if not path.is_file():
                raise ConfigError(f"tls.{channel}.{field_name}: no such file {str(path)!r}")
        built[channel] = files
    return TlsConfig(**built)


def _build_chaos(raw: Any, environ: Mapping[str, str]) -> ChaosConfig:
    chaos: ChaosConfig = _build_section(ChaosConfig, raw, "chaos", None)
    if chaos.test_plant and environ.get(CHAOS_ENVIRONMENT_VARIABLE) != "1":
        raise ConfigError(
            f"chaos.test_plant: refused, this plants a deliberate fault and is allowed only when "
            f"{CHAOS_ENVIRONMENT_VARIABLE}=1 is set in the environment (chaos tests), got {chaos.test_plant!r}"
        )
    from replicator.core.config import PLANTS, SIMULATOR_PLANTS  # pure and light, unlike derive's imports

    if chaos.test_plant and chaos.test_plant not in PLANTS and chaos.test_plant not in SIMULATOR_PLANTS:
        raise ConfigError(f"chaos.test_plant: unknown plant {chaos.test_plant!r} (known: {', '.join(sorted(PLANTS))})")
    return chaos


def _check_keys(raw: Mapping[str, Any], known: tuple[str, ...], what: str) -> None:
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1)
            suggestion = f" (did you mean {hint[0]}?)" if hint else f" (known: {', '.join(known)})"
            raise ConfigError(f"{key}: unknown {what} section{suggestion}")


def _upgrade_keys(raw: Any, section: str, deprecated: list[str]) -> Any:
    """Old names of renamed keys read as the new ones (noted in `deprecated`); removed keys refused."""
    if not isinstance(raw, Mapping):
        return raw
    for key, reason in REMOVED_KEYS.get(section, {}).items():
        if key in raw:
            raise ConfigError(f"{section}.{key}: {reason}")
    renamed = RENAMED_KEYS.get(section, {})
    if not any(key in raw for key in renamed):
        return raw
    upgraded = dict(raw)
    for old, new in renamed.items():
        if old not in upgraded:
            continue
        if new in upgraded:
            raise ConfigError(f"{section}.{old}: renamed {section}.{new}, and both are set: keep only {new}")
        upgraded[new] = upgraded.pop(old)
        deprecated.append(f"{section}.{old}: renamed {section}.{new}; the old name still works for now, rename it")
    return upgraded


def site_config_from_mapping(
    raw: Mapping[str, Any], base_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> SiteConfig:
    """Build and validate a SiteConfig from parsed TOML; raise ConfigError naming the first bad key."""
    environ = os.environ if environ is None else environ
    _check_keys(raw, ("site", "listen", "witness", "api", "tls", "chaos", "nbd", "s3"), "site configuration")
    if "site" not in raw:
        raise ConfigError("site: required section missing (name, peer_name, pair_id, data_dir)")
    deprecated: list[str] = []
    config = SiteConfig(
        site=_build_section(SiteSection, _upgrade_keys(raw["site"], "site", deprecated), "site", base_dir),
        listen=_build_section(ListenConfig, raw.get("listen", {}), "listen", base_dir),
        witness=_build_section(WitnessClientConfig, raw.get("witness", {}), "witness", base_dir),
        api=_build_section(ApiConfig, raw.get("api", {}), "api", base_dir),
        tls=_build_tls(raw.get("tls", {}), base_dir, ("grpc", "link", "witness", "nbd", "s3")),
        chaos=_build_chaos(raw.get("chaos", {}), environ),
        nbd=_build_section(NbdConfig, raw.get("nbd", {}), "nbd", base_dir),
        s3=_build_s3(raw.get("s3", {}), base_dir),
        deprecated=tuple(deprecated),
    )
    _check_site_relations(config)
    derive(config)  # every layer's own checks, now: a bad value is refused at start-up, with its key
    return config


def _build_s3(raw: Any, base_dir: Path | None) -> S3Config:
    s3: S3Config = _build_section(S3Config, raw, "s3", base_dir)
    if s3.credentials_file:
        path = Path(s3.credentials_file).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        s3 = dataclasses.replace(s3, credentials_file=str(path))
    if s3.enabled:
        if not s3.credentials_file:
            raise ConfigError("s3.credentials_file: required when s3.enabled is true")
        if not Path(s3.credentials_file).is_file():
            raise ConfigError(f"s3.credentials_file: no such file {s3.credentials_file!r}")
        from replicator.s3.auth import CredentialsError, load_credentials  # here: s3 imports this module

        try:
            load_credentials(s3.credentials_file)
        except CredentialsError as error:
            raise ConfigError(f"s3.credentials_file: {error}") from None
    if s3.part_bytes_min > s3.object_bytes_max:
        raise ConfigError(f"s3.part_bytes_min: must be at most s3.object_bytes_max, got {s3.part_bytes_min}")
    if s3.parts_max > 10_000:
        raise ConfigError(f"s3.parts_max: must be at most 10000, got {s3.parts_max}")
    return s3


def _check_site_relations(config: SiteConfig) -> None:
    site, api = config.site, config.api
    if site.peer_name == site.name:
        raise ConfigError(f"site.peer_name: must differ from site.name, both are {site.name!r}")
    if site.preferred_site and site.preferred_site not in (site.name, site.peer_name):
        raise ConfigError(
            f"site.preferred_site: must be {site.name!r}, {site.peer_name!r} or empty, got {site.preferred_site!r}"
        )
    if site.static_priority and not site.preferred_site:
        raise ConfigError("site.static_priority: needs site.preferred_site, which is empty")
    # A lost heartbeat or two must not make the peer look dead (the link needs timeout > 2 x interval).
    if 2 * site.heartbeat_interval_ms >= site.peer_timeout_ms:
        raise ConfigError(
            f"site.heartbeat_interval_ms: must be less than half of site.peer_timeout_ms ({site.peer_timeout_ms}), "
            f"got {site.heartbeat_interval_ms}"
        )
    # The core suspects the peer only after a lease's worth of silence or less (core/config.py).
    if site.peer_timeout_ms > 4 * site.lease_ms:
        raise ConfigError(
            f"site.peer_timeout_ms: must be at most 4 x site.lease_ms ({4 * site.lease_ms}), got {site.peer_timeout_ms}"
        )
    # A List page reads every key of it through the core at once: a page must fit in the bound.
    if site.requests_inflight_max < api.list_page_size_max:
        raise ConfigError(
            f"site.requests_inflight_max: must be at least api.list_page_size_max ({api.list_page_size_max}), "
            f"got {site.requests_inflight_max}"
        )
    if site.send_queue_bytes_max < site.frame_size_bytes_max:
        raise ConfigError(
            f"site.send_queue_bytes_max: must be at least site.frame_size_bytes_max ({site.frame_size_bytes_max}), "
            f"got {site.send_queue_bytes_max}"
        )
    if site.frame_size_bytes_max > site.inflight_bytes_max:
        raise ConfigError(
            f"site.frame_size_bytes_max: must be at most site.inflight_bytes_max ({site.inflight_bytes_max}), "
            f"got {site.frame_size_bytes_max}"
        )
    # One client write is one record, which must fit in one frame with room for headers.
    largest_write = max(api.object_bytes_max, api.batch_bytes_max, api.block_write_bytes_max)
    if largest_write + 64 * KIB > site.frame_size_bytes_max:
        raise ConfigError(
            f"site.frame_size_bytes_max: must exceed the largest client write (api.*_bytes_max = {largest_write}) "
            f"by 64 KiB, got {site.frame_size_bytes_max}"
        )
    # A piece of an S3 object is one record, like a gRPC object.
    if config.s3.piece_bytes > api.object_bytes_max:
        raise ConfigError(
            f"s3.piece_bytes: must be at most api.object_bytes_max ({api.object_bytes_max}), got {config.s3.piece_bytes}"
        )
    if config.s3.inline_bytes_max > config.s3.piece_bytes:
        raise ConfigError(
            f"s3.inline_bytes_max: must be at most s3.piece_bytes ({config.s3.piece_bytes}), "
            f"got {config.s3.inline_bytes_max}"
        )
    listens = {
        "listen.grpc": config.listen.grpc,
        "listen.link": config.listen.link,
        "listen.metrics": config.listen.metrics,
    }
    if config.nbd.listen:
        listens["nbd.listen"] = config.nbd.listen
    if config.tls.nbd is not None and not config.nbd.listen:
        raise ConfigError("tls.nbd: set, but nbd.listen is empty (there is no NBD server to protect)")
    if config.s3.enabled:
        listens["s3.listen"] = config.s3.listen
    seen: dict[str, str] = {}
    for key, value in listens.items():
        if parse_address(value)[1] != 0 and value in seen:
            raise ConfigError(f"{key}: same address as {seen[value]}, got {value!r}")
        seen[value] = key


def witness_config_from_mapping(
    raw: Mapping[str, Any], base_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> WitnessConfig:
    """Build and validate a WitnessConfig from parsed TOML; raise ConfigError naming the first bad key.

    (`environ` is unused since the witness lost its [chaos] section; kept for the callers.)"""
    if "chaos" in raw:
        raise ConfigError(
            "chaos: removed from the witness's configuration: the witness never read it (the chaos suite plants "
            "faults in the sites only). Delete the [chaos] section"
        )
    _check_keys(raw, ("witness", "listen", "tls", "pairs"), "witness configuration")
    if "witness" not in raw:
        raise ConfigError("witness: required section missing (data_dir)")
    pairs_raw = raw.get("pairs", [])
    if not isinstance(pairs_raw, list):
        raise ConfigError(f"pairs: must be an array of tables ([[pairs]]), got {_describe(pairs_raw)}")
    pairs: list[PairSpec] = []
    for index, pair_raw in enumerate(pairs_raw):
        prefix = f"pairs[{index}]"
        pair = _build_section(PairSpec, pair_raw, prefix, base_dir)
        sites = pair.sites
        if not isinstance(sites, list) or len(sites) != 2 or len(set(sites)) != 2:
            raise ConfigError(f"{prefix}.sites: must be two different site names, got {sites!r}")
        for site_name in sites:
            try:
                _check_name(site_name)
            except _Refused as refused:
                raise ConfigError(f"{prefix}.sites: {refused}") from None
        if pair.preferred_site and pair.preferred_site not in sites:
            raise ConfigError(
                f"{prefix}.preferred_site: must be one of {sites!r} or empty, got {pair.preferred_site!r}"
            )
        if pair.id in (p.id for p in pairs):
            raise ConfigError(f"{prefix}.id: duplicate pair id {pair.id!r}")
        pairs.append(dataclasses.replace(pair, sites=tuple(sites)))
    return WitnessConfig(
        witness=_build_section(WitnessSection, raw["witness"], "witness", base_dir),
        listen=_build_section(WitnessListenConfig, raw.get("listen", {}), "listen", base_dir),
        tls=_build_tls(raw.get("tls", {}), base_dir, ("grpc",)),
        pairs=tuple(pairs),
    )


def _load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    file = Path(path)
    try:
        with file.open("rb") as handle:
            return tomllib.load(handle), file.resolve().parent
    except OSError as error:
        raise ConfigError(f"{file}: cannot read: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{file}: not valid TOML: {error}") from None


def load_site_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> SiteConfig:
    raw, base_dir = _load(path)
    return site_config_from_mapping(raw, base_dir, environ)


def load_witness_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> WitnessConfig:
    raw, base_dir = _load(path)
    return witness_config_from_mapping(raw, base_dir, environ)


# --------------------------------------------------------------------------
# Deriving every layer's settings from a site configuration: the one place where the TOML's keys
# become the core's, the link's, the store's, the witness client's and the daemon's own bounds.


@dataclass(frozen=True, slots=True)
class DaemonBounds:
    """The site daemon's own queues between layers (replicator/daemon/site.py)."""

    # Frames waiting for the link sender. Above this, new client writes are refused (UNAVAILABLE,
    # "overloaded"): writes are what fill it; the core's own messages are bounded by its windows.
    send_queue_bytes_max: int
    # Client requests (reads and writes) waiting for the core's answer; more are refused the same way.
    requests_inflight_max: int
    # The records of one turn of the event loop go out as one frame of at most this many bytes.
    outbox_bytes_max: int


@dataclass(frozen=True, slots=True)
class WitnessClientSettings:
    address: str
    timeout_ms: int
    tls: TlsFiles | None


@dataclass(frozen=True, slots=True)
class SiteSettings:
    """Every layer's settings of one site, from `derive`."""

    core: Any  # replicator.core.config.CoreConfig
    link: Any  # replicator.transport.config.LinkLimits
    link_tls: Any  # replicator.transport.config.TlsConfig | None
    store: Any  # replicator.storage.base.StoreOptions
    witness: WitnessClientSettings
    daemon: DaemonBounds


def derive(config: SiteConfig) -> SiteSettings:
    """Build every layer's settings from a site configuration; raise ConfigError if a layer refuses one.

    One name per knob: each layer's field has the TOML key's name ([site] keys as they are,
    witness.retry_interval_ms as witness_retry_interval_ms), but for these, derived:
    - the core's `clock_drift_max` is site.lease_drift_ppm / 1e6;
    - the core's `message_bytes_max` is site.frame_size_bytes_max less the frame's headroom;
    - the core's `preferred` is site.preferred_site, else the name that sorts first (the tie-break);
    - the link's `heartbeat_timeout_ms` is site.peer_timeout_ms (at least twice the heartbeat, plus 1);
    - the daemon's outbox holds a quarter of a frame.
    """
    # Imported here: the client library imports this module and must not load the storage engine.
    from replicator.core.config import MESSAGE_HEADROOM_BYTES, CoreConfig
    from replicator.storage.base import StoreOptions
    from replicator.transport.config import LinkLimits
    from replicator.transport.config import TlsConfig as LinkTls

    site, witness = config.site, config.witness
    plants = frozenset({config.chaos.test_plant}) if config.chaos.test_plant else frozenset()
    try:
        core = CoreConfig(
            site=site.name,
            peer=site.peer_name,
            pair=site.pair_id,
            preferred=site.preferred_site or min(site.name, site.peer_name),
            lease_ms=site.lease_ms,
            clock_drift_max=site.lease_drift_ppm / 1e6,
            peer_timeout_ms=site.peer_timeout_ms,
            heartbeat_interval_ms=site.heartbeat_interval_ms,
            witness_retry_interval_ms=witness.retry_interval_ms,
            read_wait_ms_max=site.read_wait_ms_max,
            parked_reads_max=site.parked_reads_max,
            inflight_records_max=site.inflight_records_max,
            resync_batch_keys_max=site.resync_batch_keys_max,
            resync_batches_inflight_max=site.resync_batches_inflight_max,
            reconcile_records_per_message_max=site.reconcile_records_per_message_max,
            dedup_entries_per_message_max=site.dedup_entries_per_message_max,
            message_bytes_max=site.frame_size_bytes_max - MESSAGE_HEADROOM_BYTES,
            dedup_age_ms=site.dedup_age_ms,
            dedup_entries_max=site.dedup_entries_max,  # the core's table bounded as the store's
            static_priority=site.static_priority,
            static_priority_wait_ms=site.static_priority_wait_ms,
            tick_ms=TICK_MS,
            plants=plants,
        )
        link = LinkLimits(
            frame_size_bytes_max=site.frame_size_bytes_max,
            inflight_bytes_max=site.inflight_bytes_max,
            heartbeat_interval_ms=site.heartbeat_interval_ms,
            heartbeat_timeout_ms=max(site.peer_timeout_ms, 2 * site.heartbeat_interval_ms + 1),
            reconnect_backoff_ms_max=site.reconnect_backoff_ms_max,
        )
        store = StoreOptions(dedup_entries_max=site.dedup_entries_max)
    except ValueError as error:
        # A layer's own check that the TOML's checks did not anticipate: name the layer's key.
        raise ConfigError(f"site: refused by a layer's own check: {error}") from None
    files = config.tls.link
    link_tls = None if files is None else LinkTls(str(files.ca_file), str(files.cert_file), str(files.key_file))
    return SiteSettings(
        core=core,
        link=link,
        link_tls=link_tls,
        store=store,
        witness=WitnessClientSettings(witness.address, witness.timeout_ms, config.tls.witness),
        daemon=DaemonBounds(
            send_queue_bytes_max=site.send_queue_bytes_max,
            requests_inflight_max=site.requests_inflight_max,
            outbox_bytes_max=max(site.frame_size_bytes_max // 4, 1),
        ),
    )


# --------------------------------------------------------------------------
# Writing TOML (tomllib only reads). Values are str, int, bool, Path and
# tuples of str; every value is written, so a written file is the whole story.


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        escaped = "".join(
            {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, c)
            if c >= " " or c in "\n\t\r"
            else f"\\u{ord(c):04x}"
            for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise AssertionError(f"cannot write {value!r} as TOML")


def _table_lines(header: str, section: Any) -> list[str]:
    lines = [header]
    for spec in dataclasses.fields(section):
        lines.append(f"{spec.name} = {_toml_value(getattr(section, spec.name))}")
    return lines + [""]


def _to_toml(config: SiteConfig | WitnessConfig) -> str:
    lines: list[str] = []
    for spec in dataclasses.fields(config):
        section = getattr(config, spec.name)
        if spec.name == "deprecated":
            continue  # how the file was written, not a setting
        if isinstance(section, TlsConfig):
            for channel in dataclasses.fields(section):
                files = getattr(section, channel.name)
                if files is not None:
                    lines += _table_lines(f"[tls.{channel.name}]", files)
        elif isinstance(section, tuple):
            for item in section:
                lines += _table_lines(f"[[{spec.name}]]", item)
        elif isinstance(section, ChaosConfig) and not section.test_plant:
            continue
        elif isinstance(section, S3Config) and section == S3Config():
            continue
        else:
            lines += _table_lines(f"[{spec.name}]", section)
    return "\n".join(lines)
