"""The host-side multipath endpoint against a real pair: I/O survives SIGKILL of the preferred site.

fio writes with crc32c verification through `replicator-nbd-multipath` while
site a (the preferred path) is SIGKILLed mid-run: fio must finish without
an I/O error, its verification pass (through the endpoint, now served by b)
must pass, the same verification straight against site b must pass, and,
after a is restarted and resynchronised, straight against site a too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_support import SYSTEM_ENV, require, run, start_pair, state, uri
from support import wait_for

from replicator.client import Client
from replicator.local import LocalCluster, free_ports

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[LocalCluster, dict[str, str]]]:
    with LocalCluster(tmp_path / "deploy", health_timeout_s=30) as cluster:
        yield cluster, start_pair(cluster, peer_timeout_ms=None)  # the demo's fast failover


@pytest.fixture
def multipath(deployment: tuple[LocalCluster, dict[str, str]], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    _, pair = deployment
    (port,) = free_ports(1)
    log = tmp_path / "multipath.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "replicator.nbd.multipath", "--sites", pair["nbd_a"], pair["nbd_b"],
             "--listen", f"127.0.0.1:{port}", "--retry-timeout-s", "60"],
            stdout=output, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    try:
        wait_for(lambda: "serving" in log.read_text(), 20, "the multipath endpoint listening")
        yield f"127.0.0.1:{port}", log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _fio(target: str, extra: list[str]) -> list[str]:
    return [
        "fio", "--name=failover", "--ioengine=nbd", f"--uri={target}", "--rw=randwrite", "--bs=4k",
        "--iodepth=8", "--size=12M", "--verify=crc32c", "--verify_state_save=0", "--randrepeat=1", "--randseed=11",
        "--output-format=json", *extra,
    ]  # fmt: skip


def _report(output: str) -> dict[str, object]:
    start = output.index("{") if output.startswith("{") else output.index("\n{") + 1
    return json.loads(output[start:])  # type: ignore[no-any-return]


def test_fio_through_multipath_survives_sigkill_of_site_a(
    deployment: tuple[LocalCluster, dict[str, str]], multipath: tuple[str, Path]
) -> None:
    require("fio", "nbdinfo")
    cluster, pair = deployment
    endpoint, log = multipath
    Client([pair["a"], pair["b"]]).create_volume("mp", 16 * MIB)
    info = json.loads(run(["nbdinfo", "--json", uri(endpoint, "mp")]).stdout)["exports"][0]
    assert info["export-size"] == 16 * MIB and info["block_size_minimum"] == 4096 and info["can_multi_conn"]

    # The first pass writes everything and verifies it; site a dies part-way through the writes.
    fio = subprocess.Popen(
        _fio(uri(endpoint, "mp"), ["--do_verify=1"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=SYSTEM_ENV,
    )  # fmt: skip
    outputs: dict[str, str] = {}
    reader = threading.Thread(target=lambda: outputs.update(zip(("out", "err"), fio.communicate(), strict=True)))
    reader.start()
    wait_for(lambda: _nbd_writes(cluster, "a") >= 300 or fio.poll() is not None, 60, "fio writing through site a")
    assert fio.poll() is None, "fio finished before the fault: make the job bigger"
    killed_at = time.monotonic()
    cluster.kill("a")
    reader.join(timeout=240)
    assert not reader.is_alive(), "fio did not finish"
    pause = time.monotonic() - killed_at
    assert fio.returncode == 0, outputs
    (job,) = _report(outputs["out"])["jobs"]  # type: ignore[misc]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == 12 * MIB and job["read"]["io_bytes"] == 12 * MIB  # written, then verified
    text = log.read_text()
    assert re.search(r"[1-9]\d* request\(s\) to resend", text), text  # writes were in flight at a and resent

    # Every acknowledged write reads back straight from b ...
    assert state(pair["b"]) == "SOLO"
    run(_fio(uri(pair["nbd_b"], "mp"), ["--verify_only"]), timeout_s=240)
    # ... and, once a is back and resynchronised, straight from a.
    cluster.start_process("a", wait=True)
    wait_for(lambda: state(pair["a"]) == "SYNC" and state(pair["b"]) == "SYNC", 60, "the pair back in SYNC")
    run(_fio(uri(pair["nbd_a"], "mp"), ["--verify_only"]), timeout_s=240)
    print(f"I/O pause seen through the multipath endpoint after SIGKILL: at most {pause:.1f} s (whole remaining run)")


def _nbd_writes(cluster: LocalCluster, site: str) -> float:
    import urllib.request

    address = cluster.cluster["sites"][site]["metrics"]
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=2).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith('replicator_nbd_requests_total{command="write",outcome="ok"}'):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_round_robin_spreads_requests_over_both_sites(
    deployment: tuple[LocalCluster, dict[str, str]], tmp_path: Path
) -> None:
    require("nbdcopy")
    cluster, pair = deployment
    Client([pair["a"], pair["b"]]).create_volume("rr", 4 * MIB)
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "replicator.nbd.multipath", "--sites", pair["nbd_a"], pair["nbd_b"],
         "--listen", f"127.0.0.1:{port}", "--policy", "round-robin"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and "serving" in process.stdout.readline()
        before = {site: _nbd_writes(cluster, site) for site in ("a", "b")}
        source = tmp_path / "in.raw"
        source.write_bytes(bytes(range(256)) * (4 * MIB // 256))
        run(["nbdcopy", "--request-size=65536", str(source), uri(f"127.0.0.1:{port}", "rr")])
        back = tmp_path / "back.raw"
        run(["nbdcopy", uri(f"127.0.0.1:{port}", "rr"), str(back)])
        assert back.read_bytes() == source.read_bytes()
        after = {site: _nbd_writes(cluster, site) for site in ("a", "b")}
        # Round-robin alternates request by request over the sites it is connected to.
        writes = {site: after[site] - before[site] for site in ("a", "b")}
        assert min(writes.values()) >= 0.3 * sum(writes.values()) > 0, (before, after)
    finally:
        process.terminate()
        process.wait(timeout=10)
