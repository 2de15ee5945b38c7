"""The s3-tests conformance suite (../shared/third_party/s3-tests, Ceph's, pinned) against site a of a pair.

An allow-list (tests/s3tests_allowlist.txt) names the tests of
`s3tests/functional/test_s3.py` that must pass; they run in place (the folder is
read-only: no cache, no bytecode) with a configuration written to a temporary
directory. `.venv/bin/python tests/s3tests_full.py` runs the whole suite (docs/s3.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_support import require

from replicator.local import PATIENT_PEER_TIMEOUTS, LocalCluster

ROOT = Path(__file__).resolve().parent.parent
SUITE = Path(os.environ.get("S3TESTS_DIR", ROOT.parent / "shared" / "third_party" / "s3-tests"))
ALLOW_LIST = Path(__file__).with_name("s3tests_allowlist.txt")
TEST_FILE = "s3tests/functional/test_s3.py"

# The suite wants a main and an alt user, a tenant and three IAM identities; here they are all
# valid keys of the one account (see docs/s3.md: no per-user ownership or ACLs).
USERS = {
    "s3 main": ("0555b35654ad1656d804", "h7GhxuBLTrlhVUyxSPUKUV8r/2EI4ngqJxD7iBdBYLhwluN30JaT3Q=="),
    "s3 alt": ("NOPQRSTUVWXYZABCDEFG", "nopqrstuvwxyzabcdefghijklmnabcdefghijklm"),
    "s3 tenant": ("HIJKLMNOPQRSTUVWXYZA", "opqrstuvwxyzabcdefghijklmnopqrstuvwxyzab"),
    "iam": ("ABCDEFGHIJKLMNOPQRST", "abcdefghijklmnopqrstuvwxyzabcdefghijklmn"),
    "iam root": ("AAAAAAAAAAAAAAAAAAAA", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    "iam alt root": ("BBBBBBBBBBBBBBBBBBBB", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"),
}


def allow_list() -> list[str]:
    names = []
    for line in ALLOW_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def start_pair(directory: Path) -> LocalCluster:
    """A pair whose S3 endpoints know every key the suite uses."""
    cluster = LocalCluster(directory, stop_timeout_s=5)
    # The suite is not about failover: longer peer timeouts than the demo's, so that a loaded
    # 2-core machine does not make the pair fail over (and answer 503) in the middle of it.
    cluster.set_site_values("site", PATIENT_PEER_TIMEOUTS)
    cluster.configure()
    cluster.s3_credentials_file.write_text(
        "".join(f'[[credentials]]\naccess_key = "{a}"\nsecret_key = "{s}"\n' for a, s in USERS.values())
    )
    cluster.start()
    return cluster


def write_conf(path: Path, endpoint: str) -> None:
    host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
    lines = [
        "[DEFAULT]",
        f"host = {host}",
        f"port = {port}",
        "is_secure = False",
        "ssl_verify = False",
        "[fixtures]",
        "bucket prefix = s3t-{random}-",
    ]
    for section, (access, secret) in USERS.items():
        # The one account of the endpoint is the owner "replicator" of every bucket and object.
        name = "replicator" if section == "s3 main" else section.replace(" ", "-")
        lines += [
            f"[{section}]",
            f"display_name = {name}",
            f"user_id = {name}",
            f"email = {name}@example.com",
            "api_name = default",
            "tenant = tenant",
            f"access_key = {access}",
            f"secret_key = {secret}",
        ]
    path.write_text("\n".join(lines) + "\n")


def run_suite(conf: Path, selection: list[str], junit: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    # tests/ on the path for the speed-up plugin (tests/s3tests_speedups.py: the suite's data generator
    # in linear time). --assert=plain: pytest's assertion rewriting of the 20,000-line test_s3.py (no
    # bytecode cache in the read-only folder) cost 12 s of a profiled run; only failure messages lose detail.
    environment = dict(
        os.environ,
        S3TEST_CONF=str(conf),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")) if p),
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "s3tests_speedups",
        "--assert=plain",
        "-q",
        "--timeout",
        "60",
        f"--junitxml={junit}",
        *selection,
    ]
    return subprocess.run(command, cwd=SUITE, env=environment, capture_output=True, text=True, timeout=timeout_s)


def outcomes(junit: Path) -> dict[str, str]:
    """test name -> passed / failed / error / skipped, from pytest's JUnit XML."""
    found = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        found[case.get("name", "")] = outcome
    return found


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = start_pair(tmp_path_factory.mktemp("s3tests") / "deploy")
    try:
        yield cluster
    finally:
        cluster.stop()


def test_allow_listed_s3_tests_pass(pair: LocalCluster, tmp_path: Path) -> None:
    require(f"the s3-tests suite at {SUITE}", (SUITE / TEST_FILE).is_file())
    for module in ("boto3", "munch", "isodate", "lxml", "yaml", "pytz", "httplib2"):
        try:
            __import__(module)
        except ImportError:
            require(f"the s3-tests dependency {module}", False)
    names = allow_list()
    assert len(names) >= 200, len(names)
    conf = tmp_path / "s3tests.conf"
    write_conf(conf, pair.cluster["sites"]["a"]["s3"])
    junit = tmp_path / "junit.xml"
    result = run_suite(conf, [f"{TEST_FILE}::{name}" for name in names], junit, timeout_s=600)
    found = outcomes(junit)
    missing = [name for name in names if name not in found]
    failed = {name: found[name] for name in names if found.get(name, "passed") != "passed"}
    assert not missing and not failed, (
        f"{len(failed)} allow-listed tests did not pass: {sorted(failed.items())[:40]}; not run: {missing[:20]}\n"
        f"{result.stdout[-4000:]}"
    )
