"""Two sites behind HAProxy (the Debian package): health checks, failover under rclone, 503 SlowDown.

HAProxy sends every request to site a while its `/-/health` answers 200
(`balance first`) and to site b once a's check fails. rclone syncs a tree
through HAProxy while site a is SIGKILLed: the sync completes (rclone's own
retries allowed) and `rclone check` against each site afterwards, the killed
one once restarted and resynchronised, finds every file. Last, with the
witness and site a down, site b cannot serve: its health check answers 503
and an S3 request gets 503 SlowDown, so clients and the load balancer go
elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_support import Endpoint, require, tool
from support import wait_for

from replicator.local import LocalCluster, free_ports

MIB = 1024 * 1024


def health(endpoint: str) -> int:
    try:
        with urllib.request.urlopen(endpoint + "/-/health", timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def state(endpoint: str) -> str:
    """The role a site's S3 health page names ("" when it does not answer)."""
    try:
        with urllib.request.urlopen(endpoint + "/-/health", timeout=2) as answer:
            return str(answer.read().split()[-1].decode())
    except urllib.error.HTTPError as error:
        return str(error.read().split()[-1].decode())
    except (OSError, IndexError):
        return ""


def in_sync(pair: LocalCluster) -> bool:
    """Both sites' S3 health pages name SYNC (a site still resyncing its peer serves alone)."""
    for name in ("a", "b"):
        try:
            with urllib.request.urlopen(pair.cluster["sites"][name]["s3"] + "/-/health", timeout=2) as answer:
                if b"SYNC" not in answer.read().split():
                    return False
        except OSError:
            return False
    return True


HAPROXY_CONFIG = """global
    maxconn 512
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
    retry-on conn-failure empty-response 503
frontend s3
    bind 127.0.0.1:{port}
    default_backend sites
backend sites
    balance first
    option httpchk GET /-/health
    http-check expect status 200
    server a {a} check inter 200ms fall 2 rise 2
    server b {b} check inter 200ms fall 2 rise 2
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("s3-failover") / "deploy", stop_timeout_s=5) as cluster:
        cluster.start()
        yield cluster


@pytest.fixture(scope="module")
def haproxy(pair: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    require("haproxy (the Debian package: make tools-haproxy)", binary is not None)
    assert binary is not None
    (port,) = free_ports(1)
    sites = pair.cluster["sites"]
    config = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    config.write_text(
        HAPROXY_CONFIG.format(
            port=port, a=sites["a"]["s3"].split("://", 1)[1], b=sites["b"]["s3"].split("://", 1)[1]
        )
    )
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: health(url) == 200, 10, "HAProxy to answer")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def make_tree(root: Path, count: int) -> None:
    for index in range(count):
        path = root / f"dir {index % 5}" / f"file+{index}%.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (256 * 1024 + index * 7919) if index % 10 else 3 * MIB + index
        path.write_bytes(os.urandom(size))


class Remote(Endpoint):
    """An rclone remote named `site` for any S3 URL (a site or HAProxy)."""

    def __init__(self, cluster: LocalCluster, url: str, workdir: Path) -> None:
        super().__init__(cluster, "a", workdir)
        self.url = url


def test_health_checks_answer_serving(pair: LocalCluster, haproxy: str) -> None:
    for site in ("a", "b"):
        assert health(pair.cluster["sites"][site]["s3"]) == 200
    assert health(haproxy) == 200


def test_rclone_sync_through_haproxy_survives_killing_the_site_in_use(
    pair: LocalCluster, haproxy: str, tmp_path: Path
) -> None:
    tool("rclone")
    tree = tmp_path / "tree"
    make_tree(tree, 60)
    through = Remote(pair, haproxy, tmp_path / "haproxy")
    through.rclone("mkdir", "site:synced")
    through.rclone("version")  # writes the remote's configuration
    command = [
        tool("rclone"),
        "sync",
        "--transfers",
        "4",
        "--bwlimit",
        "6M",
        "--retries",
        "10",
        "--low-level-retries",
        "30",
        "--s3-upload-cutoff",
        "5M",
        "--s3-chunk-size",
        "5M",
        str(tree),
        "site:synced/tree",
    ]
    sync = subprocess.Popen(command, env=through.environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        b = Endpoint(pair, "b", tmp_path / "b").boto3()
        # Kill site a once part of the tree has arrived (written through a, visible at b).
        wait_for(lambda: b.list_objects_v2(Bucket="synced").get("KeyCount", 0) >= 8, 60, "the sync to get going")
        assert sync.poll() is None, "the sync ended before site a was killed: the tree is too small"
        pair.kill("a")
        output, _ = sync.communicate(timeout=240)
    finally:
        if sync.poll() is None:
            sync.kill()
            sync.wait(5)
    assert sync.returncode == 0, output.decode(errors="replace")[-4000:]
    Remote(pair, pair.cluster["sites"]["b"]["s3"], tmp_path / "check-b").rclone("check", str(tree), "site:synced/tree")
    pair.restart("a")
    Remote(pair, pair.cluster["sites"]["a"]["s3"], tmp_path / "check-a").rclone("check", str(tree), "site:synced/tree")


def test_an_upload_cut_by_a_crash_is_not_visible(pair: LocalCluster, tmp_path: Path) -> None:
    """Site a dies with 6 of 20 MiB of a PUT received (pieces already replicated): b shows no object."""
    import socket

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    a_url = pair.cluster["sites"]["a"]["s3"]
    b = Endpoint(pair, "b", tmp_path / "b").boto3()
    b.create_bucket(Bucket="cut")
    access, secret = pair.s3_credentials()
    headers = {"x-amz-content-sha256": "UNSIGNED-PAYLOAD", "Content-Length": str(20 * MIB)}
    request = AWSRequest(method="PUT", url=f"{a_url}/cut/half", headers=headers)
    SigV4Auth(Credentials(access, secret), "s3", "us-east-1").add_auth(request)
    host, port = a_url.split("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        head = f"PUT /cut/half HTTP/1.1\r\nHost: {host}:{port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()) + "\r\n"
        connection.sendall(head.encode())
        for _ in range(6):
            connection.sendall(os.urandom(MIB))
        time.sleep(1.0)  # let the first pieces be written at both sites
        pair.kill("a")
    wait_for(lambda: state(pair.cluster["sites"]["b"]["s3"]) == "SOLO", 30, "site b to serve alone")
    listed = b.list_objects_v2(Bucket="cut")
    assert listed.get("KeyCount", 0) == 0, listed
    pair.start_process("a")


def test_a_site_that_cannot_serve_answers_503_slowdown(pair: LocalCluster, haproxy: str, tmp_path: Path) -> None:
    import botocore.exceptions

    b_url = pair.cluster["sites"]["b"]["s3"]
    # The test before restarts a; until its resync is over b is the resync source, holds the grant
    # and serves alone without the witness: only a pair in SYNC needs the witness to go on.
    # While the pair settles, b may answer 503 for a moment (a late grant suspends it until it
    # takes the grant up), which S3 clients retry: the setup retries, the check below does not.
    wait_for(lambda: in_sync(pair), 60, "the pair in SYNC")
    Endpoint(pair, "b", tmp_path / "b").boto3(retries={"max_attempts": 10, "mode": "standard"}).create_bucket(Bucket="alone")
    wait_for(lambda: in_sync(pair), 60, "the pair in SYNC")
    b = Endpoint(pair, "b", tmp_path / "b").boto3(retries={"max_attempts": 1}, read_timeout=30)
    pair.stop_process("witness")
    pair.kill("a")
    # b loses its peer and cannot reach the witness: it must stop serving.
    wait_for(lambda: health(b_url) == 503, 30, "site b's health check to answer 503")
    assert health(haproxy) == 503  # no backend left: HAProxy itself says so
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        b.put_object(Bucket="alone", Key="k", Body=b"x")
    assert caught.value.response["Error"]["Code"] == "SlowDown"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    pair.start_process("witness")
    pair.start_process("a")
    wait_for(lambda: health(b_url) == 200 and health(haproxy) == 200, 60, "the pair to serve again")
    assert b.list_objects_v2(Bucket="alone").get("KeyCount", 0) == 0  # the refused PUT changed nothing
