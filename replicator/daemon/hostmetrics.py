"""Metrics of the host side of a site: how long its syncs take, how much disk its data directory
uses and has left, and when each of its certificates expires (trial finding 42).

Registered once at start-up by `add_host_metrics`; the disk and certificate values are read at
each scrape (a few stat calls and one small file read per certificate), the sync histogram is
observed by the group committer's syncing thread.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import ssl
import time
from pathlib import Path
from typing import Any

from replicator.config import TlsConfig
from replicator.daemon.metrics import Registry
from replicator.storage.group_commit import GroupCommitter

# Sync times on local disks: from tens of microseconds (a cache) to seconds (a failing device).
SYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


def directory_bytes(directory: Path) -> int:
    """Bytes of the regular files under `directory` (a file removed meanwhile is skipped)."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def certificate_not_after(path: Path) -> float | None:
    """The certificate's notAfter as Unix time, or None when the file cannot be read or parsed.

    Uses the standard library's PEM decoder (`ssl._ssl._test_decode_cert`, CPython's own, present
    since 3.x): the project has no X.509 dependency and this needs none."""
    decode: Any = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        not_after = decode(str(path)).get("notAfter")
        return float(ssl.cert_time_to_seconds(not_after)) if not_after else None
    except (OSError, ValueError, ssl.SSLError):
        return None


def add_host_metrics(registry: Registry, data_dir: Path, tls: TlsConfig, committer: GroupCommitter) -> None:
    sync_seconds = registry.histogram(
        "replicator_sync_seconds", "time of each storage sync (fdatasync of the write-ahead log)", buckets=SYNC_BUCKETS_S
    )
    committer.on_sync = sync_seconds.observe
    used = registry.gauge("replicator_data_dir_bytes", "bytes of the files in the site's data directory")
    free = registry.gauge("replicator_data_dir_free_bytes", "bytes free on the data directory's file system")
    expiry = registry.gauge(
        "replicator_certificate_expiry_timestamp_seconds",
        "when each configured certificate expires (Unix time); alert well before it",
        ["channel"],
    )
    expires_in = registry.gauge(
        "replicator_certificate_expiry_seconds", "seconds until each configured certificate expires", ["channel"]
    )
    channels = [
        (field.name, files.cert_file)
        for field in dataclasses.fields(tls)
        if (files := getattr(tls, field.name)) is not None
    ]

    def collect() -> None:
        used.set(directory_bytes(data_dir))
        try:
            free.set(shutil.disk_usage(data_dir).free)
        except OSError:
            pass
        now = time.time()
        for name, cert_file in channels:
            not_after = certificate_not_after(Path(cert_file))
            if not_after is not None:
                expiry.labels(name).set(not_after)
                expires_in.labels(name).set(not_after - now)

    registry.add_collector(collect)
