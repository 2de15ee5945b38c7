"""The real S3 clients against a real pair, over HTTP and HTTPS: written at site a, read at site b.

Each of boto3, the AWS CLI, s3cmd and rclone creates a bucket, puts 1 KiB, 5 MiB and
20 MiB objects under awkward keys (spaces, +, %, &, unicode, a 1,024-byte key), the
20 MiB one by multipart, lists with and without a delimiter, gets every object back
(byte-compared), makes a ranged get, copies, presigns, deletes. Conditional gets and
the parts of the API a CLI does not reach are driven through boto3 (and the AWS
CLI's s3api). One deployment per scheme is shared by the module.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_support import CLIENTS, Endpoint

from replicator.local import LocalCluster
from replicator.tlsutil import openssl_available

MIB = 1024 * 1024
SIZES = {"1k": 1024, "5m": 5 * MIB, "20m": 20 * MIB}
AWKWARD = "dir one/sp ace+plus%pct&amp=eq ünï—"
LONG_KEY = "long/" + "é" * 509 + "x"  # 1,024 bytes of UTF-8
assert len(LONG_KEY.encode()) == 1024


def keys_for(client: str) -> dict[str, str]:
    keys = {name: f"{AWKWARD}/{client}-{name}" for name in SIZES}
    keys["long"] = LONG_KEY
    return keys


@pytest.fixture(scope="module", params=["http", "https"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tls = request.param == "https"
    if tls and not openssl_available():
        pytest.skip("openssl is not installed (HTTPS certificates)")
    with LocalCluster(tmp_path_factory.mktemp(f"s3-{request.param}") / "deploy", tls=tls, stop_timeout_s=5) as cluster:
        cluster.start()
        yield cluster


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("s3-files")
    made = {}
    for name, size in {**SIZES, "long": 1024}.items():
        path = directory / f"{name}.bin"
        path.write_bytes(os.urandom(size))
        made[name] = path
    return made


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class Client:
    """The operations of the smoke test through one real client."""

    def __init__(self, name: str, endpoint: Endpoint) -> None:
        self.name = name
        self.endpoint = endpoint

    def mb(self, bucket: str) -> None:
        e = self.endpoint
        if self.name == "boto3":
            e.boto3().create_bucket(Bucket=bucket)
        elif self.name == "awscli":
            e.aws("s3", "mb", f"s3://{bucket}")
        elif self.name == "s3cmd":
            e.s3cmd("mb", f"s3://{bucket}")
        else:
            e.rclone("mkdir", f"site:{bucket}")

    def put(self, local: Path, bucket: str, key: str) -> None:
        e = self.endpoint
        if self.name == "boto3":
            from boto3.s3.transfer import TransferConfig

            e.boto3().upload_file(str(local), bucket, key, Config=TransferConfig(multipart_threshold=8 * MIB))
        elif self.name == "awscli":
            e.aws("s3", "cp", str(local), f"s3://{bucket}/{key}")
        elif self.name == "s3cmd":
            e.s3cmd("put", "--multipart-chunk-size-mb=8", str(local), f"s3://{bucket}/{key}")
        else:
            e.rclone("copyto", "--s3-upload-cutoff", "8M", "--s3-chunk-size", "8M", str(local), f"site:{bucket}/{key}")

    def put_all(self, files: dict[str, Path], bucket: str, keys: dict[str, str], staging: Path) -> None:
        """Upload every file to its key. The AWS CLI does it as its users do, one recursive `cp` of a
        tree laid out like the keys (each CLI run costs about a second of start-up here); the 1,024-byte
        key cannot be a file name (255 bytes at most), so it goes alone."""
        if self.name != "awscli":
            for name, key in keys.items():
                self.put(files[name], bucket, key)
            return
        for name, key in keys.items():
            if name == "long":
                self.put(files[name], bucket, key)
                continue
            target = staging / key
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(files[name], target)
        self.endpoint.aws("s3", "cp", "--recursive", str(staging), f"s3://{bucket}/")

    def get_all(self, bucket: str, keys: dict[str, str], out: Path) -> dict[str, Path]:
        """Download every key; the AWS CLI with one recursive `cp` of the common prefix (and the long key alone)."""
        got = {name: out / f"got-{name}" for name in keys}
        if self.name != "awscli":
            for name, key in keys.items():
                self.get(bucket, key, got[name])
            return got
        prefix = AWKWARD + "/"
        self.endpoint.aws("s3", "cp", "--recursive", f"s3://{bucket}/{prefix}", str(out / "tree"))
        for name, key in keys.items():
            if key.startswith(prefix):
                got[name] = out / "tree" / key[len(prefix) :]
            else:
                self.get(bucket, key, got[name])
        return got

    def rm_all(self, bucket: str, keys: list[str]) -> None:
        """Delete these keys (the bucket's every object): the AWS CLI with one `rm --recursive`."""
        if self.name == "awscli":
            self.endpoint.aws("s3", "rm", "--recursive", f"s3://{bucket}/")
            return
        for key in keys:
            self.rm(bucket, key)

    def get(self, bucket: str, key: str, local: Path) -> None:
        e = self.endpoint
        if self.name == "boto3":
            e.boto3().download_file(bucket, key, str(local))
        elif self.name == "awscli":
            e.aws("s3", "cp", f"s3://{bucket}/{key}", str(local))
        elif self.name == "s3cmd":
            e.s3cmd("get", "--force", f"s3://{bucket}/{key}", str(local))
        else:
            e.rclone("copyto", f"site:{bucket}/{key}", str(local))

    def list_all(self, bucket: str) -> set[str]:
        e = self.endpoint
        if self.name == "boto3":
            pages = e.boto3().get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
            return {o["Key"] for page in pages for o in page.get("Contents", [])}
        if self.name == "awscli":
            out = e.aws("s3api", "list-objects-v2", "--bucket", bucket, "--page-size", "2", "--output", "json").stdout
            return {o["Key"] for o in (json.loads(out) if out.strip() else {}).get("Contents", [])}
        if self.name == "s3cmd":
            out = e.s3cmd("ls", "--recursive", f"s3://{bucket}").stdout
            return {line.split(f"s3://{bucket}/", 1)[1] for line in out.splitlines() if f"s3://{bucket}/" in line}
        out = e.rclone("lsjson", "-R", "--files-only", f"site:{bucket}").stdout
        return {o["Path"] for o in json.loads(out)}

    def list_top(self, bucket: str) -> set[str]:
        """The top level with delimiter "/": common prefixes end in "/"."""
        e = self.endpoint
        if self.name == "boto3":
            answer = e.boto3().list_objects(Bucket=bucket, Delimiter="/")
            return {p["Prefix"] for p in answer.get("CommonPrefixes", [])} | {
                o["Key"] for o in answer.get("Contents", [])
            }
        if self.name == "awscli":
            out = e.aws("s3", "ls", f"s3://{bucket}/").stdout
            return {line.split("PRE ", 1)[1] for line in out.splitlines() if "PRE " in line}
        if self.name == "s3cmd":
            out = e.s3cmd("ls", f"s3://{bucket}/").stdout
            return {line.split(f"s3://{bucket}/", 1)[1] for line in out.splitlines() if "DIR" in line}
        out = e.rclone("lsf", f"site:{bucket}").stdout
        return set(out.splitlines())

    def range_get(self, bucket: str, key: str, start: int, length: int, out: Path) -> bytes:
        e = self.endpoint
        if self.name in ("boto3", "s3cmd"):  # s3cmd has no ranged get: boto3 reads what s3cmd wrote
            answer = e.boto3().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            assert answer["ResponseMetadata"]["HTTPStatusCode"] == 206
            return bytes(answer["Body"].read())
        if self.name == "awscli":
            e.aws("s3api", "get-object", "--bucket", bucket, "--key", key, "--range", f"bytes={start}-{start + length - 1}", str(out))
            return out.read_bytes()
        return _rclone_cat(e, bucket, key, start, length)

    def copy(self, bucket: str, source: str, target: str) -> None:
        e = self.endpoint
        if self.name == "boto3":
            e.boto3().copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": source})
        elif self.name == "awscli":
            e.aws("s3", "cp", f"s3://{bucket}/{source}", f"s3://{bucket}/{target}")
        elif self.name == "s3cmd":
            e.s3cmd("cp", f"s3://{bucket}/{source}", f"s3://{bucket}/{target}")
        else:
            e.rclone("copyto", f"site:{bucket}/{source}", f"site:{bucket}/{target}")

    def presign(self, bucket: str, key: str) -> str:
        e = self.endpoint
        if self.name == "boto3":
            return str(e.boto3().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600))
        if self.name == "awscli":
            return e.aws("s3", "presign", f"s3://{bucket}/{key}", "--expires-in", "600").stdout.strip()
        if self.name == "s3cmd":
            url = e.s3cmd("signurl", f"s3://{bucket}/{key}", "+600").stdout.strip()
            # s3cmd 2.4 writes http:// even with use_https; a SigV2 signature does not cover the scheme.
            return url.replace("http://", "https://", 1) if e.https else url
        return e.rclone("link", "--expire", "10m", f"site:{bucket}/{key}").stdout.strip()

    def rm(self, bucket: str, key: str) -> None:
        e = self.endpoint
        if self.name == "boto3":
            e.boto3().delete_object(Bucket=bucket, Key=key)
        elif self.name == "awscli":
            e.aws("s3", "rm", f"s3://{bucket}/{key}")
        elif self.name == "s3cmd":
            e.s3cmd("del", f"s3://{bucket}/{key}")
        else:
            e.rclone("deletefile", f"site:{bucket}/{key}")

    def rb(self, bucket: str) -> None:
        e = self.endpoint
        if self.name == "boto3":
            e.boto3().delete_bucket(Bucket=bucket)
        elif self.name == "awscli":
            e.aws("s3", "rb", f"s3://{bucket}")
        elif self.name == "s3cmd":
            e.s3cmd("rb", f"s3://{bucket}")
        else:
            e.rclone("rmdir", f"site:{bucket}")


def _rclone_cat(e: Endpoint, bucket: str, key: str, start: int, length: int) -> bytes:
    import subprocess

    from s3_support import tool

    e.rclone("version")  # writes the configuration file
    command = [tool("rclone"), "cat", "--offset", str(start), "--count", str(length), f"site:{bucket}/{key}"]
    if e.ca:
        command[1:1] = ["--ca-cert", e.ca]
    return subprocess.run(command, capture_output=True, env=e.environment(), check=True, timeout=120).stdout


@pytest.mark.parametrize("client_name", CLIENTS)
def test_client_round_trip_across_sites(
    client_name: str, pair: LocalCluster, files: dict[str, Path], tmp_path: Path
) -> None:
    writer = Client(client_name, Endpoint(pair, "a", tmp_path / "a"))
    reader = Client(client_name, Endpoint(pair, "b", tmp_path / "b"))
    checker = Endpoint(pair, "b", tmp_path / "check").boto3()
    bucket = f"smoke-{client_name}"
    keys = keys_for(client_name)
    writer.mb(bucket)
    writer.put_all(files, bucket, keys, tmp_path / "tree")
    # A 20 MiB upload went by multipart (ETag md5-of-md5s-N); the others are one PUT (ETag = MD5).
    for name, key in keys.items():
        etag = checker.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        if name == "20m":
            assert etag.endswith("-3"), (client_name, etag)
        else:
            assert etag == md5(files[name]), (client_name, name, etag)

    assert reader.list_all(bucket) == set(keys.values())
    top = reader.list_top(bucket)
    assert {"dir one/", "long/"} <= top, top

    got = reader.get_all(bucket, keys, tmp_path)
    for name in keys:
        assert got[name].read_bytes() == files[name].read_bytes(), (client_name, name)

    data = files["5m"].read_bytes()
    start = 3 * MIB - 17  # crosses a piece boundary
    assert reader.range_get(bucket, keys["5m"], start, 100_000, tmp_path / "range") == data[start : start + 100_000]

    copied = f"{AWKWARD}/copy of {client_name}-5m"
    writer.copy(bucket, keys["5m"], copied)
    out = tmp_path / "copied"
    reader.get(bucket, copied, out)
    assert out.read_bytes() == data

    url = reader.presign(bucket, keys["1k"])
    assert url.startswith(reader.endpoint.url), url
    assert reader.endpoint.fetch(url) == files["1k"].read_bytes()

    writer.rm_all(bucket, [*keys.values(), copied])
    assert reader.list_all(bucket) == set()
    writer.rb(bucket)
    assert bucket not in {b["Name"] for b in checker.list_buckets()["Buckets"]}


def test_boto3_conditional_and_error_answers(pair: LocalCluster, files: dict[str, Path], tmp_path: Path) -> None:
    import botocore.exceptions

    a = Endpoint(pair, "a", tmp_path / "a").boto3()
    b = Endpoint(pair, "b", tmp_path / "b").boto3()
    a.create_bucket(Bucket="conditions")
    data = files["1k"].read_bytes()
    etag = a.put_object(Bucket="conditions", Key="k", Body=data)["ETag"]
    assert b.get_object(Bucket="conditions", Key="k", IfMatch=etag)["Body"].read() == data

    def code(call: object, **arguments: object) -> str:
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            call(**arguments)  # type: ignore[operator]
        return str(caught.value.response["Error"]["Code"])

    assert code(b.get_object, Bucket="conditions", Key="k", IfMatch='"0000"') == "PreconditionFailed"
    assert code(b.get_object, Bucket="conditions", Key="k", IfNoneMatch=etag) == "304"
    assert code(b.get_object, Bucket="conditions", Key="k", Range="bytes=5000-6000") == "InvalidRange"
    assert code(b.get_object, Bucket="conditions", Key="missing") == "NoSuchKey"
    assert code(b.get_object, Bucket="no-such-bucket", Key="k") == "NoSuchBucket"
    assert code(a.put_object, Bucket="conditions", Key="k", Body=b"x", IfNoneMatch="*") == "PreconditionFailed"
    assert code(b.delete_bucket, Bucket="conditions") == "BucketNotEmpty"
    a.create_bucket(Bucket="conditions")  # us-east-1: creating one's own bucket again succeeds, changes nothing
    # Nothing changed: the object is still the first one, at both sites.
    assert a.get_object(Bucket="conditions", Key="k")["Body"].read() == data
    a.delete_object(Bucket="conditions", Key="k")
    b.delete_bucket(Bucket="conditions")
