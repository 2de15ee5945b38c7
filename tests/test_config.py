"""Configuration: defaults, validation with the key and the reason, TOML round trip."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from replicator.config import (
    ApiConfig,
    ConfigError,
    SiteConfig,
    load_site_config,
    load_witness_config,
    site_config_from_mapping,
    witness_config_from_mapping,
)

MINIMAL_SITE = {"site": {"name": "a", "peer_name": "b", "pair_id": "pair-1", "data_dir": "data/a"}}


def site(environ: dict[str, str] | None = None, **sections: dict[str, object]) -> SiteConfig:
    raw: dict[str, object] = {"site": dict(MINIMAL_SITE["site"])}
    for name, values in sections.items():
        if name == "site":
            raw["site"].update(values)  # type: ignore[attr-defined]
        else:
            raw[name] = values
    return site_config_from_mapping(raw, Path("/etc/replicator"), environ or {})


def refused(message: str, **sections: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as caught:
        site(**sections)
    assert str(caught.value) == message


def test_defaults_are_sane_and_loopback() -> None:
    config = site()
    assert config.site.data_dir == Path("/etc/replicator/data/a")
    assert config.site.peer_timeout_ms == 1000 and config.site.lease_ms == 2000
    assert config.site.static_priority is False
    assert config.listen.grpc.startswith("127.0.0.1:") and config.listen.link.startswith("127.0.0.1:")
    assert config.listen.metrics.startswith("127.0.0.1:") and config.witness.address.startswith("127.0.0.1:")
    assert config.exposed_addresses() == []
    assert config.tls.grpc is None and config.chaos.test_plant == ""
    assert config.api.message_bytes_max > config.api.batch_bytes_max
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.site.name = "b"  # type: ignore[misc]


def test_bad_values_name_the_key_and_the_reason() -> None:
    refused("site.peer_timeout_ms: must be a positive integer, got -5", site={"peer_timeout_ms": -5})
    refused("site.lease_ms: must be a positive integer, got '2s'", site={"lease_ms": "2s"})
    refused("site.static_priority: must be true or false, got 1", site={"static_priority": 1})
    refused("site.inflight_bytes_max: must be a positive integer, got true", site={"inflight_bytes_max": True})
    refused("listen.grpc: must be HOST:PORT, got 'localhost'", listen={"grpc": "localhost"})
    refused("listen.link: port must be at most 65535, got '127.0.0.1:70000'", listen={"link": "127.0.0.1:70000"})
    refused("api.object_bytes_max: must be a positive integer, got 0", api={"object_bytes_max": 0})
    with pytest.raises(ConfigError, match=r"^site\.name: must be 1 to 63 characters"):
        site(site={"name": "a b"})


def test_unknown_and_missing_keys_are_refused() -> None:
    refused("site.peer_timout_ms: unknown key (did you mean peer_timeout_ms?)", site={"peer_timout_ms": 5})
    with pytest.raises(ConfigError, match=r"^listen\.bogus: unknown key \(known: grpc, link, metrics\)"):
        site(listen={"bogus": "x"})
    with pytest.raises(ConfigError, match=r"^witnes: unknown site configuration section \(did you mean witness\?\)"):
        site_config_from_mapping({**MINIMAL_SITE, "witnes": {}}, None, {})
    with pytest.raises(ConfigError, match=r"^site\.pair_id: required, missing"):
        site_config_from_mapping({"site": {"name": "a", "peer_name": "b", "data_dir": "d"}}, None, {})
    with pytest.raises(ConfigError, match=r"^site: required section missing"):
        site_config_from_mapping({}, None, {})


def test_relations_between_keys() -> None:
    refused("site.peer_name: must differ from site.name, both are 'a'", site={"peer_name": "a"})
    refused("site.preferred_site: must be 'a', 'b' or empty, got 'c'", site={"preferred_site": "c"})
    refused("site.static_priority: needs site.preferred_site, which is empty", site={"static_priority": True})
    refused(
        "site.heartbeat_interval_ms: must be less than half of site.peer_timeout_ms (200), got 100",
        site={"peer_timeout_ms": 200},
    )
    with pytest.raises(ConfigError, match=r"^site\.frame_size_bytes_max: must exceed the largest client write"):
        site(site={"frame_size_bytes_max": 1024 * 1024})
    with pytest.raises(ConfigError, match=r"^listen\.link: same address as listen\.grpc"):
        site(listen={"grpc": "127.0.0.1:7000", "link": "127.0.0.1:7000"})
    assert site(site={"preferred_site": "b", "static_priority": True}).site.static_priority


def test_non_loopback_listen_only_when_written() -> None:
    config = site(listen={"grpc": "0.0.0.0:7400"})
    assert config.exposed_addresses() == ["0.0.0.0:7400"]
    assert site(listen={"grpc": "[::1]:7400", "link": "localhost:7500"}).exposed_addresses() == []


def test_test_plant_needs_the_chaos_environment() -> None:
    with pytest.raises(ConfigError, match=r"^chaos\.test_plant: refused.*REPLICATOR_CHAOS=1"):
        site(chaos={"test_plant": "skip-fsync"})
    assert site({"REPLICATOR_CHAOS": "1"}, chaos={"test_plant": "drop_dirty"}).chaos.test_plant == "drop_dirty"
    with pytest.raises(ConfigError, match=r"^chaos\.test_plant: unknown plant 'skip-fsync' \(known: .*drop_dirty"):
        site({"REPLICATOR_CHAOS": "1"}, chaos={"test_plant": "skip-fsync"})
    assert site(chaos={"test_plant": ""}).chaos.test_plant == ""


def test_tls_files_are_resolved_and_must_exist(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    tls = {"grpc": {"ca_file": "ca.pem", "cert_file": "cert.pem", "key_file": "key.pem"}}
    config = site_config_from_mapping({**MINIMAL_SITE, "tls": tls}, tmp_path, {})
    assert config.tls.grpc is not None and config.tls.grpc.ca_file == tmp_path / "ca.pem" and config.tls.link is None
    with pytest.raises(ConfigError, match=r"^tls\.link\.key_file: required, missing"):
        site_config_from_mapping(
            {**MINIMAL_SITE, "tls": {"link": {"ca_file": "ca.pem", "cert_file": "c"}}}, tmp_path, {}
        )
    with pytest.raises(ConfigError, match=r"^tls\.witness\.cert_file: no such file"):
        bad = {"ca_file": "ca.pem", "cert_file": "missing.pem", "key_file": "key.pem"}
        site_config_from_mapping({**MINIMAL_SITE, "tls": {"witness": bad}}, tmp_path, {})
    with pytest.raises(ConfigError, match=r"^tls\.metrics: unknown key"):
        site_config_from_mapping({**MINIMAL_SITE, "tls": {"metrics": {}}}, tmp_path, {})


def test_site_file_round_trip(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "a.toml"
    path.write_text(
        '[site]\nname = "a"\npeer_name = "b"\npair_id = "p"\ndata_dir = "data"\npeer_timeout_ms = 700\n'
        'preferred_site = "a"\nstatic_priority = true\n'
        '[listen]\ngrpc = "127.0.0.1:0"\n'
        "[api]\nkey_bytes_max = 512\n"
        '[tls.link]\nca_file = "ca.pem"\ncert_file = "cert.pem"\nkey_file = "key.pem"\n'
    )
    config = load_site_config(path, environ={})
    assert config.site.peer_timeout_ms == 700 and config.api.key_bytes_max == 512
    assert config.site.data_dir == tmp_path / "data"
    written = tmp_path / "written.toml"
    written.write_text(config.to_toml())
    assert load_site_config(written, environ={}) == config
    tomllib.loads(config.to_toml())  # valid TOML on its own


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_site_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[site\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_site_config(broken)


def test_witness_config(tmp_path: Path) -> None:
    path = tmp_path / "witness.toml"
    path.write_text(
        '[witness]\ndata_dir = "w"\npreferred_grace_ms = 1500\n'
        '[[pairs]]\nid = "pair-1"\nsites = ["a", "b"]\npreferred_site = "a"\n'
    )
    config = load_witness_config(path, environ={})
    assert config.witness.data_dir == tmp_path / "w" and config.witness.preferred_grace_ms == 1500
    assert config.pairs[0].sites == ("a", "b") and config.listen.grpc.startswith("127.0.0.1:")
    written = tmp_path / "again.toml"
    written.write_text(config.to_toml())
    assert load_witness_config(written, environ={}) == config

    def witness(**raw: object) -> None:
        witness_config_from_mapping({"witness": {"data_dir": "w"}, **raw}, tmp_path, {})

    with pytest.raises(ConfigError, match=r"^pairs\[0\]\.sites: must be two different site names"):
        witness(pairs=[{"id": "p", "sites": ["a", "a"]}])
    with pytest.raises(ConfigError, match=r"^pairs\[0\]\.preferred_site: must be one of"):
        witness(pairs=[{"id": "p", "sites": ["a", "b"], "preferred_site": "c"}])
    with pytest.raises(ConfigError, match=r"^pairs\[1\]\.id: duplicate pair id"):
        witness(pairs=[{"id": "p", "sites": ["a", "b"]}, {"id": "p", "sites": ["a", "b"]}])
    with pytest.raises(ConfigError, match=r"^witness\.preferred_grace_ms: must be a non-negative integer, got -1"):
        witness_config_from_mapping({"witness": {"data_dir": "w", "preferred_grace_ms": -1}}, tmp_path, {})
    with pytest.raises(ConfigError, match=r"^tls\.link: unknown key"):
        witness(tls={"link": {}})


def test_api_config_defaults_are_consistent() -> None:
    api = ApiConfig()
    assert api.block_write_bytes_max <= api.message_bytes_max and api.object_bytes_max <= api.batch_bytes_max


def test_s3_inline_bytes_max_is_a_key_bounded_by_the_piece_size() -> None:
    from replicator.api.objects import large_limits

    assert site().s3.inline_bytes_max == 16 * 1024
    config = site(s3={"inline_bytes_max": 0})
    assert large_limits(config.s3, config.api).inline_bytes_max == 0  # the gRPC API's store follows it
    refused(
        "s3.inline_bytes_max: must be at most s3.piece_bytes (65536), got 65537",
        s3={"piece_bytes": 65536, "inline_bytes_max": 65537},
    )
    refused("s3.inline_bytes_max: must be a non-negative integer, got -1", s3={"inline_bytes_max": -1})
