"""One configuration derivation (replicator.config.derive): every layer's settings from the TOML,
one name per knob, every documented key read and every key documented, the renamed and removed
keys, and the daemon's bounded queues (replicator/daemon/bounded.py) at their bounds."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from replicator.api import errors
from replicator.config import (
    REMOVED_KEYS,
    RENAMED_KEYS,
    ConfigError,
    SiteConfig,
    SiteSection,
    TlsConfig,
    TlsFiles,
    WitnessClientConfig,
    WitnessConfig,
    derive,
    site_config_from_mapping,
)
from replicator.core.config import CoreConfig
from replicator.core.records import Operation
from replicator.daemon.bounded import FrameQueue, Handles, Overloaded

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REQUIRED = {"name": "a", "peer_name": "b", "pair_id": "pair-1", "data_dir": "data/a"}
# [site] keys the daemon reads itself (identity, addresses, shutdown), not through derive().
READ_BY_THE_DAEMON = {"name", "peer_name", "pair_id", "data_dir", "peer_address", "peer_grpc_address",
                      "shutdown_stage_timeout_ms"}
# Core fields that are not a knob of their own: identity, and values derived from other keys (derive's docstring).
# tick_ms is the daemon's own timer (config.TICK_MS), not a knob.
CORE_NOT_KNOBS = {"site", "peer", "pair", "preferred", "plants", "clock_drift_max", "message_bytes_max", "tick_ms"}


def site(tmp_path: Path, **section: Any) -> SiteConfig:
    return site_config_from_mapping({"site": {**REQUIRED, **section}}, tmp_path, {})


def layers(config: SiteConfig) -> tuple[Any, ...]:
    settings = derive(config)
    return settings.core, settings.link, settings.store, settings.witness, settings.daemon


def changed(value: Any) -> list[Any]:
    """Other valid-looking values of a key's type, to try in turn."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value * 2, value + 1, max(1, value // 2)] if value else [1]
    return []


# ---- one derivation, one name per knob


def test_every_core_bound_is_a_site_key_of_the_same_name() -> None:
    """No hidden core bound: each core field is a [site] key (or the witness client's, prefixed
    witness_), or derived from one (listed, with derive's docstring saying how)."""
    site_keys = {f.name for f in dataclasses.fields(SiteSection)}
    witness_keys = {f"witness_{f.name}" for f in dataclasses.fields(WitnessClientConfig)}
    for spec in dataclasses.fields(CoreConfig):
        if spec.name in CORE_NOT_KNOBS:
            continue
        assert spec.name in site_keys | witness_keys, f"CoreConfig.{spec.name} cannot be configured"


def test_the_core_and_the_toml_default_every_knob_alike(tmp_path: Path) -> None:
    """read_wait_ms_max was 1000 in the TOML and 2000 in the core: one default per knob now."""
    core = derive(site(tmp_path)).core
    defaults = CoreConfig(site="a", peer="b", pair="pair-1", preferred="a")
    for spec in dataclasses.fields(CoreConfig):
        if spec.name in CORE_NOT_KNOBS:
            continue
        assert getattr(core, spec.name) == getattr(defaults, spec.name), spec.name


def test_every_site_and_witness_client_key_reaches_a_layer(tmp_path: Path) -> None:
    """A key that changes nothing in any layer is a dead key (site.preferred_grace_ms was one)."""
    base = site(tmp_path)
    reference = layers(base)
    # The site daemon and the adapters it assembles (daemon/site.py and the modules split from it).
    daemon_modules = ("site.py", "peer.py", "backend.py", "witness_port.py", "site_state.py")
    daemon_source = "".join((ROOT / "replicator" / "daemon" / name).read_text() for name in daemon_modules)
    for section_name, cls in (("site", SiteSection), ("witness", WitnessClientConfig)):
        for spec in dataclasses.fields(cls):
            if section_name == "site" and spec.name in READ_BY_THE_DAEMON:
                assert re.search(rf"\.{spec.name}\b", daemon_source), f"site.{spec.name} is never read"
                continue
            default = getattr(getattr(base, section_name), spec.name)
            candidates = changed(default)
            if spec.name == "preferred_site":
                candidates = ["b"]
            elif spec.name == "static_priority":
                candidates = [True]
            elif spec.name == "address":
                candidates = ["127.0.0.1:7999"]
            moved = False
            for value in candidates:
                raw: dict[str, Any] = {"site": dict(REQUIRED)}
                raw.setdefault(section_name, {})[spec.name] = value
                if spec.name == "static_priority":
                    raw["site"]["preferred_site"] = "a"
                try:
                    config = site_config_from_mapping(raw, tmp_path, {})
                except ConfigError:
                    continue
                if spec.name == "static_priority":
                    reference_for = layers(site(tmp_path, preferred_site="a"))
                else:
                    reference_for = reference
                moved = layers(config) != reference_for
                break
            assert moved, f"{section_name}.{spec.name} changes nothing that derive() builds"


def test_the_daemon_builds_its_layers_only_through_derive() -> None:
    """The settings are built in one place: the daemon constructs no CoreConfig, LinkLimits or StoreOptions."""
    source = (ROOT / "replicator" / "daemon" / "site.py").read_text()
    for name in ("CoreConfig(", "LinkLimits(", "StoreOptions(", "heartbeat_timeout_ms="):
        assert name not in source, name


def test_a_layers_own_refusal_becomes_a_config_error(tmp_path: Path) -> None:
    # The store bounds its dedup table at 2**40 entries; the TOML's check only asks for a positive integer.
    with pytest.raises(ConfigError, match=r"^site: refused by a layer's own check: .*dedup_entries_max"):
        site(tmp_path, dedup_entries_max=1 << 41)


# ---- documented keys, read keys


def _table_keys(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)`", text, re.M)]


def _expand(key: str) -> list[str]:
    """`tls.<grpc|link>.ca_file` -> both channels; `tls.nbd.*` -> its three files."""
    if key.endswith(".*"):
        return [f"{key[:-2]}.{name}" for name in ("ca_file", "cert_file", "key_file")]
    match = re.match(r"^(.*)<([^>]+)>(.*)$", key)
    if match:
        return [match.group(1) + option + match.group(3) for option in match.group(2).split("|")]
    return [key]


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def documented_site_keys() -> set[str]:
    operations = (DOCS / "operations.md").read_text()
    keys = {k for row in _table_keys(_section(operations, "### Site keys", "### Witness keys")) for k in _expand(row)}
    nbd = (DOCS / "nbd.md").read_text()
    for row in _table_keys(nbd):
        keys.update(["tls.nbd.ca_file", "tls.nbd.cert_file", "tls.nbd.key_file"] if row == "tls.nbd.ca_file" else [row])
    s3 = (DOCS / "s3.md").read_text()
    first_table = s3[s3.index("| key |") :].split("\n\n")[0]
    keys.update(f"s3.{row}" for row in _table_keys(first_table))
    return keys


def schema_keys(config_class: type) -> set[str]:
    keys: set[str] = set()
    for section in dataclasses.fields(config_class):
        if section.name == "deprecated":
            continue
        if section.type in ("TlsConfig",) or section.name == "tls":
            for channel in dataclasses.fields(TlsConfig):
                if config_class is WitnessConfig and channel.name != "grpc":
                    continue
                keys.update(f"tls.{channel.name}.{f.name}" for f in dataclasses.fields(TlsFiles))
            continue
        if section.name == "pairs":
            continue
        section_class = section.default.__class__ if section.default is not dataclasses.MISSING else None
        if section_class is None:
            section_class = {"site": SiteSection}.get(section.name)
        if section_class is None:
            from replicator.config import WitnessSection

            section_class = WitnessSection
        keys.update(f"{section.name}.{f.name}" for f in dataclasses.fields(section_class))
    return keys


def test_every_site_key_is_documented_and_every_documented_key_exists() -> None:
    documented, schema = documented_site_keys(), schema_keys(SiteConfig)
    assert not schema - documented, f"read but not documented in docs/: {sorted(schema - documented)}"
    assert not documented - schema, f"documented but never read (no such key): {sorted(documented - schema)}"


def test_every_witness_key_is_documented_and_every_documented_key_exists() -> None:
    operations = (DOCS / "operations.md").read_text()
    witness_part = operations[operations.index("### Witness keys") :]
    witness_part = witness_part[: witness_part.index("\n\n", witness_part.index("| key |"))]
    documented = {k for row in _table_keys(witness_part) for k in _expand(row)}
    documented = {k for k in documented if not k.startswith("pairs[]")}
    schema = schema_keys(WitnessConfig)
    assert not schema - documented, f"read but not documented: {sorted(schema - documented)}"
    assert not documented - schema, f"documented but no such key: {sorted(documented - schema)}"


def test_every_key_outside_site_is_read_somewhere() -> None:
    """The [site] and [witness] keys are proven read above, through derive(); the others (api, nbd,
    s3, listen, chaos) must at least be read as an attribute somewhere outside config.py."""
    sources = "\n".join(
        path.read_text() for path in (ROOT / "replicator").rglob("*.py") if path.name != "config.py"
    ) + inspect.getsource(derive)
    for key in sorted(schema_keys(SiteConfig)):
        section, _, name = key.partition(".")
        if section in ("site", "witness", "tls"):
            continue
        assert re.search(rf"\.{re.escape(name)}\b", sources), f"{key} is documented but nothing reads it"


# ---- renamed and removed keys


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED_KEYS["site"].items()))
def test_a_renamed_key_still_works_under_its_old_name_with_a_warning(tmp_path: Path, old: str, new: str) -> None:
    config = site(tmp_path, **{old: 150})
    assert getattr(config.site, new) == 150
    assert config.deprecated == (f"site.{old}: renamed site.{new}; the old name still works for now, rename it",)
    assert site(tmp_path, **{new: 150}) == config and not site(tmp_path, **{new: 150}).deprecated
    with pytest.raises(ConfigError, match=rf"^site\.{old}: renamed site\.{new}, and both are set"):
        site(tmp_path, **{old: 150, new: 150})
    assert f"\n{new} = 150\n" in config.to_toml() and f"\n{old} =" not in config.to_toml()


def test_the_dead_key_is_refused_naming_it_and_where_the_setting_lives(tmp_path: Path) -> None:
    assert "preferred_grace_ms" in REMOVED_KEYS["site"]
    with pytest.raises(ConfigError, match=r"^site\.preferred_grace_ms: removed: .*witness\.preferred_grace_ms"):
        site(tmp_path, preferred_grace_ms=2000)
    assert "preferred_grace_ms" not in {f.name for f in dataclasses.fields(SiteSection)}


def test_the_daemon_logs_each_old_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from replicator.daemon import site as daemon

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    path = tmp_path / "a.toml"
    path.write_text('[site]\nname = "a"\npeer_name = "b"\npair_id = "p"\ndata_dir = "d"\nread_wait_ms = 800\n'
                    f'[listen]\ngrpc = "127.0.0.1:{port}"\nmetrics = "127.0.0.1:0"\n')
    try:
        # A gRPC port in use fails the start after the configuration and the log are set up.
        assert daemon.main(["--config", str(path)]) == 1
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert "config_deprecated" in err and "site.read_wait_ms: renamed site.read_wait_ms_max" in err


# ---- the bounds between layers


def test_the_bounds_are_checked_against_what_they_must_hold(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^site\.requests_inflight_max: must be at least api\.list_page_size_max"):
        site(tmp_path, requests_inflight_max=999)
    with pytest.raises(ConfigError, match=r"^site\.send_queue_bytes_max: must be at least site\.frame_size_bytes_max"):
        site(tmp_path, send_queue_bytes_max=1024)
    with pytest.raises(ConfigError, match=r"^site\.peer_timeout_ms: must be at most 4 x site\.lease_ms"):
        site(tmp_path, peer_timeout_ms=9000, lease_ms=2000)
    daemon = derive(site(tmp_path, requests_inflight_max=5000, send_queue_bytes_max=32 << 20)).daemon
    assert (daemon.requests_inflight_max, daemon.send_queue_bytes_max) == (5000, 32 << 20)


def test_the_frame_queue_counts_bytes_and_refuses_writes_at_its_bound() -> None:
    async def scenario() -> None:
        queue = FrameQueue(100)
        queue.put(1, bytearray(60))
        queue.check_room()  # 60 < 100
        queue.put(1, bytearray(40))
        with pytest.raises(Overloaded, match=r"100 bytes queued for the peer \(site\.send_queue_bytes_max = 100\)"):
            queue.check_room()
        assert await queue.get() == (1, bytearray(60)) and queue.bytes == 40
        queue.check_room()
        queue.put(1, bytearray(70))
        assert queue.drop_all() == 2 and queue.bytes == 0 and len(queue) == 0  # the session ended
        queue.check_room()

    asyncio.run(scenario())


def test_handles_refuse_one_more_than_their_bound() -> None:
    handles = Handles(2)
    handles[1] = handles[2] = None  # type: ignore[assignment]
    with pytest.raises(Overloaded, match=r"2 requests waiting for the core \(site\.requests_inflight_max = 2\)"):
        handles.check_room()
    del handles[1]
    handles.check_room()


def _daemon(tmp_path: Path, **section: Any) -> Any:
    from replicator.daemon.site import SiteDaemon

    return SiteDaemon(site(tmp_path, peer_grpc_address="127.0.0.1:7401", **section))


def test_the_daemon_refuses_a_request_over_the_inflight_bound_before_the_core_sees_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = _daemon(tmp_path, requests_inflight_max=1000)
        loop = asyncio.get_running_loop()
        for handle in range(1000):
            daemon.handles[handle] = loop.create_future()
        # The daemon was not started: it has no core, so a request that reached the core would fail otherwise.
        for call in (daemon.read(b"k", 1.0), daemon.write([Operation(b"k", b"v")], b"id", 1.0)):
            with pytest.raises(errors.Unavailable, match=r"requests_inflight_max = 1000") as caught:
                await call
            assert caught.value.other_site_address == "127.0.0.1:7401"  # the client is told where to go
        assert not hasattr(daemon, "core")

    asyncio.run(scenario())


def test_the_daemon_refuses_writes_while_the_link_backlog_is_over_its_bound(tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = _daemon(tmp_path, send_queue_bytes_max=8 << 20)
        daemon.send_queue.put(daemon.link_session, bytearray(8 << 20))
        with pytest.raises(errors.Unavailable, match=r"site\.send_queue_bytes_max = 8388608"):
            await daemon.write([Operation(b"k", b"v")], b"id", 1.0)
        assert daemon.m_writes.value("overloaded") == 1
        assert not hasattr(daemon, "core") and not daemon.handles

    asyncio.run(scenario())
