"""The S3 front-end in process over the in-memory backend: authentication, body framing, bad input, pieces.

Every refused request must leave the keyspace exactly as it was (the fake
backend's store is compared before and after). The chunked-signature check is
pinned to the worked example of the AWS documentation ("Signature
Calculations for the Authorization Header: Transferring Payload in Multiple
Chunks"), whose signatures are published.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import hashlib
import http.client
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict
from s3_support import require

from replicator.api import pieces as layout
from replicator.api.fake import FakeBackend
from replicator.config import S3Config
from replicator.s3.auth import ChunkedBody, RequestHead, authenticate
from replicator.s3.errors import S3Error
from replicator.s3.server import S3Server

try:  # boto3 comes with the S3 clients (make tools-s3); under CI=true its absence fails these tests
    import boto3
    import botocore.exceptions
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials
except ImportError:
    require("boto3", False)

ACCESS, SECRET = "TESTACCESSKEY", "test/secret+key"
PIECE = 64 * 1024  # small pieces, so that small bodies exercise the piece path


class Running:
    def __init__(self, backend: FakeBackend, server: S3Server, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.server = server
        self.loop = loop
        self.url = f"http://{server.address}"

    def snapshot(self) -> dict[bytes, Any]:
        return {k: v.value for k, v in self.backend.store.versions.items() if v.value is not None}

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def client(self, secret: str = SECRET, **config: Any) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config),
        )

    def raw(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        sign: bool = True,
        host: str = "",
    ) -> tuple[int, bytes, dict[str, str]]:
        """Send one request, signed with SigV4 over exactly these headers (payload hash of `body` unless given).

        `host` (name:port) is the Host the request is signed for and sent with (virtual-host style).
        """
        headers = dict(headers or {})
        if host:
            headers["Host"] = host
        if sign:
            headers.setdefault("x-amz-content-sha256", hashlib.sha256(body).hexdigest())
            url = (f"http://{host}" if host else self.url) + path
            request = AWSRequest(method=method, url=url, data=body, headers=headers)
            # SigV4Auth signs the x-amz-content-sha256 given (S3SigV4Auth would replace it).
            SigV4Auth(Credentials(ACCESS, SECRET), "s3", "us-east-1").add_auth(request)
            headers = dict(request.headers.items())
        connection = http.client.HTTPConnection(self.server.address.split(":")[0], int(self.server.address.split(":")[1]), timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            answer = connection.getresponse()
            return answer.status, answer.read(), dict(answer.getheaders())
        finally:
            connection.close()


@pytest.fixture()
def s3(tmp_path: Path) -> Iterator[Running]:
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(f'[[credentials]]\naccess_key = "{ACCESS}"\nsecret_key = "{SECRET}"\n')
    config = S3Config(
        enabled=True,
        listen="127.0.0.1:0",
        credentials_file=str(credentials),
        piece_bytes=PIECE,
        part_bytes_min=PIECE,
        object_bytes_max=4 * 1024 * 1024,
        garbage_age_ms=1,
        garbage_sweep_interval_ms=3_600_000,
        virtual_host_suffix="s3.test",
    )
    backend = FakeBackend()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = S3Server(backend, config, timeout_s=5.0)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    running = Running(backend, server, loop)
    try:
        running.client().create_bucket(Bucket="bkt")
        yield running
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def error_code(call: Any, **arguments: Any) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call(**arguments)
    return str(caught.value.response["Error"]["Code"])


def xml_code(body: bytes) -> str:
    return body.split(b"<Code>", 1)[1].split(b"</Code>", 1)[0].decode()


# ---------------------------------------------------------------- the AWS worked example


def test_chunk_signatures_match_the_aws_documentation_example() -> None:
    signed = "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class"
    headers = CIMultiDict(
        {
            "Host": "s3.amazonaws.com",
            "x-amz-date": "20130524T000000Z",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
            f"SignedHeaders={signed},Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": "66560",
            "Content-Length": "66824",
        }
    )
    head = RequestHead("PUT", "/examplebucket/chunkObject.txt", [], headers)
    now = calendar.timegm((2013, 5, 24, 0, 0, 0))
    auth = authenticate(head, {"AKIAIOSFODNN7EXAMPLE": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}, now, 900)
    assert auth.payload == "chunked-signed"

    def framed(final_signature: str) -> bytes:
        return (
            b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648\r\n"
            + b"a" * 65536
            + b"\r\n400;chunk-signature=0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497\r\n"
            + b"a" * 1024
            + f"\r\n0;chunk-signature={final_signature}\r\n\r\n".encode()
        )

    good = framed("b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9")
    assert len(good) == 66824
    assert asyncio.run(drain(ChunkedBody(BytesStream(good), auth, 66560, None, ""))) == b"a" * 66560
    bad = framed("0" * 64)
    with pytest.raises(S3Error) as caught:
        asyncio.run(drain(ChunkedBody(BytesStream(bad), auth, 66560, None, "")))
    assert caught.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as caught:
        authenticate(head, {"AKIAIOSFODNN7EXAMPLE": "wrong"}, now, 900)
    assert caught.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as caught:
        authenticate(head, {"AKIAIOSFODNN7EXAMPLE": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}, now + 3600, 900)
    assert caught.value.code == "RequestTimeTooSkewed"


class BytesStream:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    async def readline(self) -> bytes:
        end = self.data.find(b"\n", self.offset)
        end = len(self.data) if end < 0 else end + 1
        line, self.offset = self.data[self.offset : end], end
        return line

    async def readexactly(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise asyncio.IncompleteReadError(self.data[self.offset :], n)
        chunk, self.offset = self.data[self.offset : self.offset + n], self.offset + n
        return chunk

    async def read(self, n: int) -> bytes:
        chunk, self.offset = self.data[self.offset : self.offset + n], self.offset + min(n, len(self.data) - self.offset)
        return chunk


async def drain(body: ChunkedBody) -> bytes:
    out = b""
    while chunk := await body.read(1 << 20):
        out += chunk
    body.finish()
    return out


# ---------------------------------------------------------------- refused requests change nothing


def test_bad_signatures_and_keys_are_refused_and_change_nothing(s3: Running) -> None:
    before = s3.snapshot()
    assert error_code(s3.client(secret="wrong").put_object, Bucket="bkt", Key="k", Body=b"x") == "SignatureDoesNotMatch"
    status, body, _ = s3.raw("PUT", "/bkt/k", b"x", sign=False)
    assert (status, xml_code(body)) == (403, "AccessDenied")
    status, body, _ = s3.raw("PUT", "/bkt/k", b"x", {"Authorization": "AWS4-HMAC-SHA256 Credential=NOPE/20250101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00", "x-amz-date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "x-amz-content-sha256": "UNSIGNED-PAYLOAD"}, sign=False)
    assert (status, xml_code(body)) == (403, "InvalidAccessKeyId")
    assert s3.snapshot() == before


def test_body_checks_refuse_and_change_nothing(s3: Running) -> None:
    before = s3.snapshot()
    for size in (100, 3 * PIECE + 5):  # inline and in pieces
        data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        # A payload hash that is not the body's.
        status, body, _ = s3.raw("PUT", "/bkt/k", data, {"x-amz-content-sha256": hashlib.sha256(b"other").hexdigest()})
        assert (status, xml_code(body)) == (400, "XAmzContentSHA256Mismatch")
        # A Content-MD5 that is not the body's, and one that is no MD5 at all.
        wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        status, body, _ = s3.raw("PUT", "/bkt/k", data, {"Content-MD5": wrong_md5})
        assert (status, xml_code(body)) == (400, "BadDigest")
        status, body, _ = s3.raw("PUT", "/bkt/k", data, {"Content-MD5": "not-base64!"})
        assert (status, xml_code(body)) == (400, "InvalidDigest")
        # A CRC32 checksum header that is not the body's.
        crc = base64.b64encode((zlib.crc32(data) ^ 1).to_bytes(4, "big")).decode()
        status, body, _ = s3.raw("PUT", "/bkt/k", data, {"x-amz-checksum-crc32": crc})
        assert (status, xml_code(body)) == (400, "BadDigest")
    s3.call(s3.server.store.collect_garbage())  # pieces of refused bodies are freed, if not already
    assert s3.snapshot() == before


def unsigned_trailer_body(data: bytes, crc: int, chunk: int = 40_000, framing_error: bool = False) -> bytes:
    out = b""
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        size = f"{len(piece):x}".encode() if not framing_error else b"zz"
        out += size + b"\r\n" + piece + b"\r\n"
    trailer = base64.b64encode(crc.to_bytes(4, "big"))
    return out + b"0\r\nx-amz-checksum-crc32:" + trailer + b"\r\n\r\n"


def test_unsigned_streaming_with_trailer_checksum(s3: Running) -> None:
    data = bytes(range(251)) * 1000  # 251,000 bytes: in pieces
    headers = {
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "Content-Encoding": "aws-chunked",
        "x-amz-trailer": "x-amz-checksum-crc32",
        "x-amz-decoded-content-length": str(len(data)),
    }
    before = s3.snapshot()
    status, body, _ = s3.raw("PUT", "/bkt/wrong-crc", unsigned_trailer_body(data, zlib.crc32(data) ^ 1), headers)
    assert (status, xml_code(body)) == (400, "BadDigest")
    status, body, _ = s3.raw("PUT", "/bkt/bad-framing", unsigned_trailer_body(data, zlib.crc32(data), framing_error=True), headers)
    assert (status, xml_code(body)) == (400, "IncompleteBody")
    short = dict(headers, **{"x-amz-decoded-content-length": str(len(data) + 1)})
    status, body, _ = s3.raw("PUT", "/bkt/short", unsigned_trailer_body(data, zlib.crc32(data)), short)
    assert (status, xml_code(body)) == (400, "IncompleteBody")
    s3.call(s3.server.store.collect_garbage())
    assert s3.snapshot() == before
    status, body, answer = s3.raw("PUT", "/bkt/good", unsigned_trailer_body(data, zlib.crc32(data)), headers)
    assert status == 200, body
    assert answer["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert s3.client().get_object(Bucket="bkt", Key="good")["Body"].read() == data


def test_truncated_body_changes_nothing(s3: Running) -> None:
    before = s3.snapshot()
    host, port = s3.server.address.split(":")
    request = AWSRequest(method="PUT", url=f"{s3.url}/bkt/cut", headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD", "Content-Length": str(5 * PIECE)})
    SigV4Auth(Credentials(ACCESS, SECRET), "s3", "us-east-1").add_auth(request)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        head = f"PUT /bkt/cut HTTP/1.1\r\nHost: {host}:{port}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        connection.sendall(head.encode() + b"\r\n" + b"x" * (3 * PIECE + 10))
        connection.shutdown(socket.SHUT_WR)
        connection.recv(65536)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s3.call(s3.server.store.collect_garbage())
        if s3.snapshot() == before:
            break
        time.sleep(0.1)
    assert s3.snapshot() == before


def test_malformed_xml_and_multipart_errors(s3: Running) -> None:
    client = s3.client()
    before = s3.snapshot()
    status, body, _ = s3.raw("POST", "/bkt?delete", b"<Delete><Object><Key>a</Key></Object")
    assert (status, xml_code(body)) == (400, "MalformedXML")
    upload = client.create_multipart_upload(Bucket="bkt", Key="mp")["UploadId"]
    status, body, _ = s3.raw("POST", f"/bkt/mp?uploadId={upload}", b"<CompleteMultipartUpload><Part>")
    assert (status, xml_code(body)) == (400, "MalformedXML")
    first = client.upload_part(Bucket="bkt", Key="mp", UploadId=upload, PartNumber=1, Body=b"a" * 10)["ETag"]
    second = client.upload_part(Bucket="bkt", Key="mp", UploadId=upload, PartNumber=2, Body=b"b" * PIECE)["ETag"]

    def complete(parts: list[tuple[int, str]]) -> str:
        return error_code(
            client.complete_multipart_upload,
            Bucket="bkt",
            Key="mp",
            UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]},
        )

    assert complete([(2, second), (1, first)]) == "InvalidPartOrder"
    assert complete([(1, first), (3, second)]) == "InvalidPart"
    assert complete([(1, second), (2, second)]) == "InvalidPart"
    assert complete([(1, first), (2, second)]) == "EntityTooSmall"
    assert error_code(client.head_object, Bucket="bkt", Key="mp") == "404"
    client.abort_multipart_upload(Bucket="bkt", Key="mp", UploadId=upload)
    assert error_code(client.list_parts, Bucket="bkt", Key="mp", UploadId=upload) == "NoSuchUpload"
    assert error_code(client.upload_part, Bucket="bkt", Key="mp", UploadId="0" * 32, PartNumber=1, Body=b"x") == "NoSuchUpload"
    s3.call(asyncio.sleep(0.2))
    assert s3.snapshot() == before


def test_limits_unsupported_and_ignored_parameters(s3: Running) -> None:
    client = s3.client()
    before = s3.snapshot()
    status, body, _ = s3.raw("PUT", "/bkt/big", b"x" * (4 * 1024 * 1024 + 1))
    assert (status, xml_code(body)) == (400, "EntityTooLarge")
    status, body, _ = s3.raw("PUT", "/bkt/" + "k" * 1025, b"x")
    assert (status, xml_code(body)) == (400, "KeyTooLongError")
    status, body, _ = s3.raw("GET", "/bkt?tagging")
    assert (status, xml_code(body)) == (501, "NotImplemented")
    status, body, _ = s3.raw("PUT", "/bkt/k?acl", b"")
    assert (status, xml_code(body)) == (501, "NotImplemented")
    status, body, _ = s3.raw("PUT", "/Bad_Bucket", b"")
    assert (status, xml_code(body)) == (400, "InvalidBucketName")
    s3.client().create_bucket(Bucket="bkt")  # us-east-1 (the default region): success, nothing changes
    with pytest.raises(S3Error) as caught:  # elsewhere: BucketAlreadyOwnedByYou
        s3.call(s3.server.store.create_bucket("bkt", recreate_ok=False))
    assert caught.value.code == "BucketAlreadyOwnedByYou"
    s3.call(s3.server.store.collect_garbage())
    assert s3.snapshot() == before
    status, body, _ = s3.raw("PUT", "/bkt/k?x-id=PutObject", b"hello")
    assert status == 200, body
    assert client.get_object(Bucket="bkt", Key="k")["Body"].read() == b"hello"


def test_large_objects_live_in_pieces_and_are_freed(s3: Running) -> None:
    client = s3.client()

    def pieces() -> int:
        return sum(1 for k in s3.snapshot() if k.startswith(layout.PIECE))

    data = bytes(range(256)) * (3 * PIECE // 256 + 7)
    client.put_object(Bucket="bkt", Key="big", Body=data)
    assert pieces() == 4
    assert client.get_object(Bucket="bkt", Key="big")["Body"].read() == data
    got = client.get_object(Bucket="bkt", Key="big", Range=f"bytes={PIECE - 3}-{2 * PIECE + 2}")["Body"].read()
    assert got == data[PIECE - 3 : 2 * PIECE + 3]
    client.put_object(Bucket="bkt", Key="big", Body=data[: 2 * PIECE + 1])  # overwrite: the old pieces go
    s3.call(asyncio.sleep(0.2))
    assert pieces() == 3
    client.delete_object(Bucket="bkt", Key="big")
    s3.call(asyncio.sleep(0.2))
    assert pieces() == 0
    assert not any(k.startswith(layout.OWNER) for k in s3.snapshot())


def test_garbage_sweep_frees_an_upload_cut_short(s3: Running) -> None:
    """A crash mid-PUT leaves an owner record and pieces but no manifest: the sweep frees them."""
    from replicator.core.records import Operation

    data_id = b"\x01" * 16
    owner = json.dumps({"b": "bkt", "k": "crashed", "t": 0}).encode()
    operations = [Operation(layout.owner_key(data_id), owner)] + [
        Operation(layout.piece_key(data_id, i), b"p" * 10) for i in range(3)
    ]
    s3.call(s3.backend.write(operations, b"crash", 5.0))
    client = s3.client()
    client.put_object(Bucket="bkt", Key="kept", Body=b"k" * (2 * PIECE))  # referenced: must survive
    assert s3.call(s3.server.store.collect_garbage()) == 1
    remaining = s3.snapshot()
    assert not any(k.startswith(layout.PIECE + data_id) for k in remaining)
    assert layout.owner_key(data_id) not in remaining
    assert client.get_object(Bucket="bkt", Key="kept")["Body"].read() == b"k" * (2 * PIECE)


def test_presigned_urls_v2_and_v4(s3: Running) -> None:
    import urllib.error
    import urllib.request

    s3.client().put_object(Bucket="bkt", Key="shared file+%.txt", Body=b"shared")
    for version in ("s3", "s3v4"):
        client = s3.client(signature_version=version)
        url = client.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "shared file+%.txt"}, ExpiresIn=60)
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.read() == b"shared"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url.replace("Signature=", "Signature=0").replace("X-Amz-Signature=", "X-Amz-Signature=0"), timeout=10)
        assert caught.value.code == 403
    expired = s3.client(signature_version="s3").generate_presigned_url(
        "get_object", Params={"Bucket": "bkt", "Key": "shared file+%.txt"}, ExpiresIn=-10
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(expired, timeout=10)
    assert caught.value.code == 403 and b"expired" in caught.value.read()


def test_unavailable_site_answers_503_slowdown(s3: Running) -> None:
    import urllib.error
    import urllib.request

    with urllib.request.urlopen(s3.url + "/-/health", timeout=5) as answer:
        assert answer.status == 200
    s3.backend.available = False
    assert error_code(s3.client().get_object, Bucket="bkt", Key="k") == "SlowDown"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(s3.url + "/-/health", timeout=5)
    assert caught.value.code == 503


def test_an_overloaded_site_answers_503_slowdown_with_retry_after(s3: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission control's refusal (errors.Overloaded, api/admission.py) reaches S3 clients as SlowDown."""
    from replicator.api import errors

    async def busy(*arguments: Any) -> Any:
        raise errors.Overloaded("the site is busy: 1024 requests in flight; nothing applied", retry_after_ms=1500)

    before = s3.snapshot()
    monkeypatch.setattr(s3.backend, "write", busy)
    status, body, headers = s3.raw("PUT", "/bkt/k", b"v")
    assert status == 503 and xml_code(body) == "SlowDown" and b"site is busy" in body
    assert headers["Retry-After"] == "2"  # seconds, rounded up
    assert s3.snapshot() == before


def test_virtual_host_style_beside_path_style(s3: Running) -> None:
    port = s3.server.address.rsplit(":", 1)[1]
    status, body, _ = s3.raw("PUT", "/dir/virtual-key", b"by host", host=f"bkt.s3.test:{port}")
    assert status == 200, body
    assert s3.client().get_object(Bucket="bkt", Key="dir/virtual-key")["Body"].read() == b"by host"
    status, body, _ = s3.raw("GET", "/?list-type=2&prefix=dir%2F", host=f"bkt.s3.test:{port}")
    assert status == 200 and b"<Key>dir/virtual-key</Key>" in body, body


def test_s3_configuration_is_checked_when_built(tmp_path: Path) -> None:
    from replicator.config import ConfigError, site_config_from_mapping

    site = {"name": "a", "peer_name": "b", "pair_id": "p", "data_dir": "data"}

    def refused(s3: dict[str, Any], api: dict[str, Any] | None = None) -> str:
        with pytest.raises(ConfigError) as caught:
            site_config_from_mapping({"site": site, "s3": s3, "api": api or {}}, tmp_path)
        return str(caught.value)

    assert "required when s3.enabled" in refused({"enabled": True})
    assert "no such file" in refused({"enabled": True, "credentials_file": "missing.toml"})
    (tmp_path / "bad.toml").write_text('[[credentials]]\naccess_key = "x"\n')
    assert "non-empty strings" in refused({"enabled": True, "credentials_file": "bad.toml"})
    assert "s3.piece_bytes" in refused({"piece_bytes": 2 * 1024 * 1024})
    assert "s3.lisen: unknown key" in refused({"lisen": "127.0.0.1:1"})
    (tmp_path / "good.toml").write_text('[[credentials]]\naccess_key = "x"\nsecret_key = "y"\n')
    config = site_config_from_mapping(
        {"site": site, "s3": {"enabled": True, "credentials_file": "good.toml"}}, tmp_path
    )
    assert config.s3.credentials_file == str(tmp_path / "good.toml")  # relative to the file's directory


def crc64_b64(data: bytes, flip: int = 0) -> str:
    from replicator.checksum import crc64nvme

    return base64.b64encode((crc64nvme(data) ^ flip).to_bytes(8, "big")).decode()


def test_crc64nvme_checksums_verified_on_put_part_and_trailer_and_returned_when_asked(s3: Running) -> None:
    data = bytes(range(256)) * (3 * PIECE // 256) + b"tail"  # in pieces
    before = s3.snapshot()
    status, body, _ = s3.raw("PUT", "/bkt/c64", data, {"x-amz-checksum-crc64nvme": crc64_b64(data, 1)})
    assert (status, xml_code(body)) == (400, "BadDigest")
    trailer_headers = {
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "Content-Encoding": "aws-chunked",
        "x-amz-trailer": "x-amz-checksum-crc64nvme",
        "x-amz-decoded-content-length": str(len(data)),
    }

    def trailer_body(value: str) -> bytes:
        framed = b"".join(f"{len(data[i : i + 40_000]):x}\r\n".encode() + data[i : i + 40_000] + b"\r\n" for i in range(0, len(data), 40_000))
        return framed + b"0\r\nx-amz-checksum-crc64nvme:" + value.encode() + b"\r\n\r\n"

    status, body, _ = s3.raw("PUT", "/bkt/c64", trailer_body(crc64_b64(data, 1 << 63)), trailer_headers)
    assert (status, xml_code(body)) == (400, "BadDigest")
    upload = s3.client().create_multipart_upload(Bucket="bkt", Key="c64-multi")["UploadId"]
    status, body, _ = s3.raw(
        "PUT", f"/bkt/c64-multi?partNumber=1&uploadId={upload}", data, {"x-amz-checksum-crc64nvme": crc64_b64(data, 2)}
    )
    assert (status, xml_code(body)) == (400, "BadDigest")
    s3.call(s3.server.store.collect_garbage())
    assert s3.snapshot() == {**before, **{k: v for k, v in s3.snapshot().items() if k.startswith(layout.UPLOAD)}}
    # The right values are accepted, echoed, kept, and returned on GET and HEAD with x-amz-checksum-mode.
    status, body, answer = s3.raw("PUT", "/bkt/c64", data, {"x-amz-checksum-crc64nvme": crc64_b64(data)})
    assert status == 200 and answer["x-amz-checksum-crc64nvme"] == crc64_b64(data), (status, body)
    status, body, answer = s3.raw("PUT", "/bkt/c64-trailer", trailer_body(crc64_b64(data)), trailer_headers)
    assert status == 200, body
    status, body, answer = s3.raw(
        "PUT", f"/bkt/c64-multi?partNumber=1&uploadId={upload}", data, {"x-amz-checksum-crc64nvme": crc64_b64(data)}
    )
    assert status == 200 and answer["x-amz-checksum-crc64nvme"] == crc64_b64(data), (status, body)
    for key in ("c64", "c64-trailer"):
        for method in ("GET", "HEAD"):
            status, body, answer = s3.raw(method, f"/bkt/{key}", b"", {"x-amz-checksum-mode": "ENABLED"})
            assert status == 200 and answer.get("x-amz-checksum-crc64nvme") == crc64_b64(data), (key, method, answer)
            status, body, answer = s3.raw(method, f"/bkt/{key}")
            assert "x-amz-checksum-crc64nvme" not in answer, answer
        status, body, answer = s3.raw("GET", f"/bkt/{key}", b"", {"x-amz-checksum-mode": "ENABLED", "Range": "bytes=0-9"})
        assert status == 206 and "x-amz-checksum-crc64nvme" not in answer, answer  # a part's bytes: no full-object checksum
        assert s3.client().get_object(Bucket="bkt", Key=key)["Body"].read() == data
    s3.client().abort_multipart_upload(Bucket="bkt", Key="c64-multi", UploadId=upload)
