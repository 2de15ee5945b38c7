"""S3 request authentication: SigV4 (header, presigned, streaming chunks), SigV2 (header, presigned).

Theory of operation. `authenticate(request parts, credentials, now)` checks
the signature of the request head and returns an `Authenticated` that says
how the body must be checked: its SHA-256 (a signed payload hash), nothing
(UNSIGNED-PAYLOAD, presigned URLs, SigV2), or aws-chunked framing whose
chunks carry signatures chained from the head's (STREAMING-AWS4-HMAC-SHA256-
PAYLOAD) or an unsigned stream with a trailing checksum (STREAMING-UNSIGNED-
PAYLOAD-TRAILER). `ChunkedBody` removes the framing as the body streams and
checks each chunk's signature and the trailer; the store writes nothing
visible until the whole body has passed (store.py), so a request that fails
authentication changes nothing.

The canonical forms follow the AWS Signature Version 4 and 2 documentation
for S3: the canonical URI is the path as the client encoded it, each
segment normalised to RFC 3986 percent-encoding (S3 does not encode twice);
the canonical query is every parameter but X-Amz-Signature, decoded,
re-encoded and sorted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import tomllib
import zlib
from calendar import timegm
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from time import strptime
from urllib.parse import quote, unquote

from replicator.checksum import crc32c, crc64nvme
from replicator.s3.errors import S3Error, access_denied, invalid_argument
from replicator.s3.store import Body

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
CHUNK_LINE_BYTES_MAX = 4096
CHUNK_BYTES_MAX = 16 * 1024 * 1024
TRAILER_BYTES_MAX = 4096
PRESIGN_EXPIRES_S_MAX = 7 * 24 * 3600

# SigV2 signs these sub-resources of the query (AWS "CanonicalizedResource").
V2_SUBRESOURCES = frozenset(
    "acl cors delete lifecycle location logging notification partNumber policy requestPayment tagging torrent "
    "uploadId uploads versionId versioning versions website response-cache-control response-content-disposition "
    "response-content-encoding response-content-language response-content-type response-expires".split()
)


class CredentialsError(ValueError):
    pass


def load_credentials(path: str | Path) -> dict[str, str]:
    """access key -> secret key from a TOML file of [[credentials]] tables (access_key, secret_key)."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise CredentialsError(f"{path}: cannot read: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise CredentialsError(f"{path}: not valid TOML: {error}") from None
    entries = document.get("credentials")
    if not isinstance(entries, list) or not entries:
        raise CredentialsError(f"{path}: wants one or more [[credentials]] tables with access_key and secret_key")
    found: dict[str, str] = {}
    for index, entry in enumerate(entries):
        access, secret = entry.get("access_key"), entry.get("secret_key") if isinstance(entry, dict) else None
        if not isinstance(access, str) or not isinstance(secret, str) or not access or not secret:
            raise CredentialsError(f"{path}: credentials[{index}]: access_key and secret_key must be non-empty strings")
        if access in found:
            raise CredentialsError(f"{path}: credentials[{index}]: access_key {access!r} appears twice")
        found[access] = secret
    return found


def uri_encode(text: str, safe: str = "") -> str:
    return quote(text, safe="-_.~" + safe)


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    pairs = []
    for item in raw_query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = _hmac(("AWS4" + secret).encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


@dataclass
class RequestHead:
    method: str
    raw_path: str  # the path as sent, percent-encoded, without the query
    query: list[tuple[str, str]]  # decoded
    headers: Mapping[str, str]  # case-insensitive mapping


@dataclass
class Authenticated:
    access_key: str
    payload: str  # "sha256" (a hex hash to check), "unsigned", "chunked-signed", "chunked-unsigned"
    payload_sha256: str = ""
    signing_key: bytes = b""
    seed_signature: str = ""
    amz_date: str = ""
    scope: str = ""
    trailer: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _amz_time(text: str) -> float:
    try:
        return float(timegm(strptime(text, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        raise access_denied(f"X-Amz-Date {text!r} is not of the form YYYYMMDDTHHMMSSZ") from None


def _canonical_uri(raw_path: str) -> str:
    return "/".join(uri_encode(unquote(segment)) for segment in raw_path.split("/")) or "/"


def _canonical_query(query: list[tuple[str, str]]) -> str:
    encoded = sorted((uri_encode(k), uri_encode(v)) for k, v in query if k != "X-Amz-Signature")
    return "&".join(f"{k}={v}" for k, v in encoded)


def _canonical_headers(head: RequestHead, signed: list[str]) -> str:
    lines = []
    for name in signed:
        values = head.headers.getall(name, []) if hasattr(head.headers, "getall") else [head.headers.get(name, "")]
        if name not in head.headers:
            raise access_denied(f"the signed header {name!r} is not in the request")
        value = ",".join(" ".join(v.strip().split()) for v in values)
        lines.append(f"{name}:{value}\n")
    return "".join(lines)


def _signature_mismatch() -> S3Error:
    return S3Error(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. Check your key and "
        "signing method.",
        403,
    )


def _check_skew(request_time: float, now: float, skew_s: float) -> None:
    if abs(now - request_time) > skew_s:
        raise S3Error(
            "RequestTimeTooSkewed", "The difference between the request time and the current time is too large.", 403
        )


def _secret(credentials: Mapping[str, str], access_key: str) -> str:
    secret = credentials.get(access_key)
    if secret is None:
        raise S3Error("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.", 403)
    return secret


def authenticate(head: RequestHead, credentials: Mapping[str, str], now: float, skew_s: float) -> Authenticated:
    authorization = head.headers.get("Authorization", "")
    query = dict(head.query)
    if authorization.startswith("AWS4-HMAC-SHA256 "):
        return _v4_header(head, authorization, credentials, now, skew_s)
    if query.get("X-Amz-Algorithm") == "AWS4-HMAC-SHA256":
        return _v4_presigned(head, query, credentials, now)
    if authorization.startswith("AWS "):
        return _v2_header(head, authorization, credentials, now, skew_s)
    if "AWSAccessKeyId" in query and "Signature" in query:
        return _v2_presigned(head, query, credentials, now)
    if authorization or "X-Amz-Algorithm" in query:
        raise invalid_argument("Unsupported Authorization Type")
    raise access_denied("Anonymous access is not allowed: sign the request (SigV4 or SigV2)")


def _v4_string_to_sign(head: RequestHead, signed: list[str], payload: str, amz_date: str, scope: str) -> str:
    canonical = "\n".join(
        [
            head.method,
            _canonical_uri(head.raw_path),
            _canonical_query(head.query),
            _canonical_headers(head, signed),
            ";".join(signed),
            payload,
        ]
    )
    return "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])


def _parse_credential(credential: str) -> tuple[str, str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or parts[3] != "s3":
        raise S3Error("AuthorizationHeaderMalformed", f"the credential {credential!r} is malformed", 400)
    return parts[0], parts[1], parts[2], parts[3]


def _v4_header(
    head: RequestHead, authorization: str, credentials: Mapping[str, str], now: float, skew_s: float
) -> Authenticated:
    fields: dict[str, str] = {}
    for item in authorization[len("AWS4-HMAC-SHA256 ") :].split(","):
        name, _, value = item.strip().partition("=")
        fields[name] = value
    if not {"Credential", "SignedHeaders", "Signature"} <= fields.keys():
        raise S3Error("AuthorizationHeaderMalformed", "the Authorization header is malformed", 400)
    access_key, date, region, service = _parse_credential(fields["Credential"])
    secret = _secret(credentials, access_key)
    amz_date = head.headers.get("x-amz-date", "")
    if amz_date:
        request_time = _amz_time(amz_date)
    else:
        date_header = head.headers.get("Date", "")
        try:
            request_time = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError):
            raise access_denied("AWS authentication requires a valid Date or x-amz-date header") from None
        amz_date = date_header
    if not amz_date.startswith(date) and "x-amz-date" in head.headers:
        raise S3Error("AuthorizationHeaderMalformed", "the credential date does not match x-amz-date", 400)
    _check_skew(request_time, now, skew_s)
    payload = head.headers.get("x-amz-content-sha256", "")
    if not payload:
        raise invalid_argument("x-amz-content-sha256 is required with AWS4-HMAC-SHA256")
    signed = fields["SignedHeaders"].split(";")
    scope = f"{date}/{region}/{service}/aws4_request"
    key = signing_key(secret, date, region, service)
    expected = hmac.new(
        key, _v4_string_to_sign(head, signed, payload, amz_date, scope).encode(), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, fields["Signature"]):
        raise _signature_mismatch()
    result = Authenticated(access_key, "unsigned", signing_key=key, seed_signature=expected, amz_date=amz_date, scope=scope)
    if payload == UNSIGNED:
        return result
    if payload in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
        result.payload = "chunked-signed"
        result.trailer = payload == STREAMING_SIGNED_TRAILER
        return result
    if payload == STREAMING_UNSIGNED_TRAILER:
        result.payload = "chunked-unsigned"
        result.trailer = True
        return result
    if len(payload) != 64 or any(c not in "0123456789abcdef" for c in payload):
        raise invalid_argument(f"x-amz-content-sha256 {payload!r} is neither a SHA-256 nor a known payload type")
    result.payload = "sha256"
    result.payload_sha256 = payload
    return result


def _v4_presigned(
    head: RequestHead, query: dict[str, str], credentials: Mapping[str, str], now: float
) -> Authenticated:
    for name in ("X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders", "X-Amz-Signature"):
        if name not in query:
            raise S3Error("AuthorizationQueryParametersError", f"the presigned URL lacks {name}", 400)
    access_key, date, region, service = _parse_credential(query["X-Amz-Credential"])
    secret = _secret(credentials, access_key)
    request_time = _amz_time(query["X-Amz-Date"])
    try:
        expires = int(query["X-Amz-Expires"])
    except ValueError:
        raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires must be a number of seconds", 400) from None
    if expires < 0 or expires > PRESIGN_EXPIRES_S_MAX:
        raise S3Error(
            "AuthorizationQueryParametersError", "X-Amz-Expires must be between 0 and 604800 seconds", 400
        )
    if now > request_time + expires:
        raise access_denied("Request has expired")
    if request_time > now + 900:
        raise access_denied("Request is not valid yet")
    signed = query["X-Amz-SignedHeaders"].split(";")
    scope = f"{date}/{region}/{service}/aws4_request"
    key = signing_key(secret, date, region, service)
    payload = head.headers.get("x-amz-content-sha256", UNSIGNED) if "x-amz-content-sha256" in signed else UNSIGNED
    string = _v4_string_to_sign(head, signed, payload, query["X-Amz-Date"], scope)
    expected = hmac.new(key, string.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, query["X-Amz-Signature"]):
        raise _signature_mismatch()
    return Authenticated(access_key, "unsigned")


def _v2_resources(head: RequestHead) -> list[str]:
    """The path as signed: S3 (and botocore) sign a bucket's root as "/bucket/" whether or not the
    request path ends in a slash."""
    path = head.raw_path
    if path.count("/") == 1 and len(path) > 1:
        return [path + "/", path]
    return [path]


def _v2_string_to_sign(head: RequestHead, date_value: str, resource: str | None = None) -> str:
    headers = head.headers
    amz = sorted(
        (name.lower(), ",".join(v.strip() for v in headers.getall(name)) if hasattr(headers, "getall") else headers[name])
        for name in {n.lower() for n in headers}
        if name.startswith("x-amz-")
    )
    amz_lines = "".join(f"{name}:{value}\n" for name, value in amz)
    subresources = sorted((k, v) for k, v in head.query if k in V2_SUBRESOURCES)
    resource = head.raw_path if resource is None else resource
    if subresources:
        resource += "?" + "&".join(f"{k}={v}" if v != "" else k for k, v in subresources)
    return "\n".join(
        [head.method, headers.get("Content-MD5", ""), headers.get("Content-Type", ""), date_value]
    ) + "\n" + amz_lines + resource


def _v2_sign(secret: str, text: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), text.encode(), hashlib.sha1).digest()).decode()


def _v2_header(
    head: RequestHead, authorization: str, credentials: Mapping[str, str], now: float, skew_s: float
) -> Authenticated:
    access_key, _, signature = authorization[4:].strip().rpartition(":")
    secret = _secret(credentials, access_key)
    amz_date = head.headers.get("x-amz-date", "")
    date_header = head.headers.get("Date", "")
    try:
        request_time = parsedate_to_datetime(amz_date or date_header).timestamp()
    except (TypeError, ValueError):
        raise access_denied("AWS authentication requires a valid Date or x-amz-date header") from None
    _check_skew(request_time, now, skew_s)
    # With x-amz-date the Date line is empty (the date is signed among the x-amz- headers).
    candidates = {"" if amz_date else date_header, date_header}
    for date_value in candidates:
        for resource in _v2_resources(head):
            if hmac.compare_digest(_v2_sign(secret, _v2_string_to_sign(head, date_value, resource)), signature):
                return Authenticated(access_key, "unsigned")
    raise _signature_mismatch()


def _v2_presigned(
    head: RequestHead, query: dict[str, str], credentials: Mapping[str, str], now: float
) -> Authenticated:
    secret = _secret(credentials, query["AWSAccessKeyId"])
    try:
        expires = int(query.get("Expires", ""))
    except ValueError:
        raise access_denied("Expires must be a number of seconds since the epoch") from None
    if now > expires:
        raise access_denied("Request has expired")
    for resource in _v2_resources(head):
        if hmac.compare_digest(_v2_sign(secret, _v2_string_to_sign(head, str(expires), resource)), query["Signature"]):
            return Authenticated(query["AWSAccessKeyId"], "unsigned")
    raise _signature_mismatch()


# ---------------------------------------------------------------- body checks


class Checksum:
    """An x-amz-checksum-* value being computed over the decoded body."""

    ALGORITHMS = ("crc32", "crc32c", "sha1", "sha256", "crc64nvme")

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self.crc = 0
        self.hash = hashlib.sha1() if algorithm == "sha1" else hashlib.sha256() if algorithm == "sha256" else None

    def update(self, data: bytes) -> None:
        if self.algorithm == "crc32":
            self.crc = zlib.crc32(data, self.crc)
        elif self.algorithm == "crc32c":
            self.crc = crc32c(data, self.crc)
        elif self.algorithm == "crc64nvme":
            self.crc = crc64nvme(data, self.crc)
        elif self.hash is not None:
            self.hash.update(data)

    def value(self) -> str:
        """Base64 of the digest (big-endian for the CRCs), as the x-amz-checksum-* headers carry it."""
        if self.algorithm in ("crc32", "crc32c"):
            return base64.b64encode(self.crc.to_bytes(4, "big")).decode()
        if self.algorithm == "crc64nvme":
            return base64.b64encode(self.crc.to_bytes(8, "big")).decode()
        assert self.hash is not None, self.algorithm
        return base64.b64encode(self.hash.digest()).decode()


def bad_checksum(algorithm: str) -> S3Error:
    return S3Error("BadDigest", f"The {algorithm.upper()} you specified did not match the calculated checksum.", 400)


class StreamReader:
    """What the body classes read from: aiohttp's StreamReader has this shape (read, readline, readexactly)."""

    async def read(self, n: int) -> bytes: ...  # pragma: no cover

    async def readline(self) -> bytes: ...  # pragma: no cover

    async def readexactly(self, n: int) -> bytes: ...  # pragma: no cover


class PlainBody(Body):
    """A body sent as is, `length` bytes, with an optional signed SHA-256 and checksum header."""

    def __init__(self, stream: StreamReader, length: int, sha256: str, checksum: tuple[str, str] | None) -> None:
        self.stream = stream
        self.remaining = length
        self.sha256 = hashlib.sha256() if sha256 else None
        self.expected_sha256 = sha256
        self.checksum = Checksum(checksum[0]) if checksum else None
        self.expected_checksum = checksum[1] if checksum else ""

    async def read(self, size: int) -> bytes:
        if self.remaining <= 0:
            return b""
        chunk = await self.stream.read(min(size, self.remaining))
        if not chunk:
            raise S3Error("IncompleteBody", "You did not provide the number of bytes specified by the Content-Length", 400)
        self.remaining -= len(chunk)
        if self.sha256 is not None:
            self.sha256.update(chunk)
        if self.checksum is not None:
            self.checksum.update(chunk)
        return chunk

    def finish(self) -> None:
        if self.sha256 is not None and self.sha256.hexdigest() != self.expected_sha256:
            raise S3Error(
                "XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not match what was computed.", 400
            )
        if self.checksum is not None:
            if self.checksum.value() != self.expected_checksum:
                raise bad_checksum(self.checksum.algorithm)
            self.verified = {self.checksum.algorithm: self.expected_checksum}


def _incomplete(what: str) -> S3Error:
    return S3Error("IncompleteBody", f"the aws-chunked body is malformed: {what}", 400)


class ChunkedBody(Body):
    """aws-chunked framing: `hex-size[;chunk-signature=sig]\\r\\n data \\r\\n` ... `0...\\r\\n` [trailers] `\\r\\n`."""

    def __init__(
        self,
        stream: StreamReader,
        auth: Authenticated,
        decoded_length: int | None,
        checksum: tuple[str, str] | None,
        trailer_name: str,
    ) -> None:
        self.stream = stream
        self.auth = auth
        self.signed = auth.payload == "chunked-signed"
        self.previous = auth.seed_signature
        self.decoded_length = decoded_length
        self.received = 0
        self.buffer = b""
        self.ended = False
        self.trailer_name = trailer_name.lower()
        algorithm = self.trailer_name.removeprefix("x-amz-checksum-") if self.trailer_name else ""
        if checksum is not None:
            algorithm = checksum[0]
        self.checksum = Checksum(algorithm) if algorithm in Checksum.ALGORITHMS else None
        self.expected_checksum = checksum[1] if checksum else ""
        self.trailers: dict[str, str] = {}

    async def _line(self) -> bytes:
        try:
            line = await self.stream.readline()
        except ValueError:
            raise _incomplete("a line is too long") from None
        if not line.endswith(b"\r\n") or len(line) > CHUNK_LINE_BYTES_MAX:
            raise _incomplete("a line does not end in CRLF")
        return line[:-2]

    def _chunk_signature_check(self, data: bytes, signature: str) -> None:
        text = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                self.auth.amz_date,
                self.auth.scope,
                self.previous,
                EMPTY_SHA256,
                hashlib.sha256(data).hexdigest(),
            ]
        )
        expected = hmac.new(self.auth.signing_key, text.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise _signature_mismatch()
        self.previous = expected

    async def _next_chunk(self) -> bytes:
        header = (await self._line()).decode("latin-1")
        size_text, _, extension = header.partition(";")
        try:
            size = int(size_text.strip(), 16)
        except ValueError:
            raise _incomplete(f"bad chunk size {size_text!r}") from None
        if size < 0 or size > CHUNK_BYTES_MAX:
            raise _incomplete(f"chunk of {size} bytes")
        try:
            data = await self.stream.readexactly(size) if size else b""
        except Exception:
            raise _incomplete("the body ends inside a chunk") from None
        if size:
            if await self._line() != b"":
                raise _incomplete("chunk data is not followed by CRLF")
        if self.signed:
            name, _, signature = extension.partition("=")
            if name.strip() != "chunk-signature":
                raise _incomplete("a chunk lacks its chunk-signature")
            self._chunk_signature_check(data, signature.strip())
        if size == 0:
            await self._read_trailers()
            self.ended = True
        return data

    async def _read_trailers(self) -> None:
        total = 0
        while True:
            try:
                line = await self._line()
            except S3Error:
                if not self.auth.trailer:
                    return  # some clients end a trailer-less stream without the final CRLF
                raise
            if not line:
                break
            total += len(line)
            if total > TRAILER_BYTES_MAX:
                raise _incomplete("trailers too large")
            name, _, value = line.decode("latin-1").partition(":")
            self.trailers[name.strip().lower()] = value.strip()
        if self.signed and self.auth.trailer:
            signature = self.trailers.pop("x-amz-trailer-signature", "")
            canonical = "".join(f"{k}:{v}\n" for k, v in self.trailers.items())
            text = "\n".join(
                [
                    "AWS4-HMAC-SHA256-TRAILER",
                    self.auth.amz_date,
                    self.auth.scope,
                    self.previous,
                    hashlib.sha256(canonical.encode()).hexdigest(),
                ]
            )
            expected = hmac.new(self.auth.signing_key, text.encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, signature):
                raise _signature_mismatch()

    async def read(self, size: int) -> bytes:
        while not self.buffer and not self.ended:
            self.buffer = await self._next_chunk()
            if self.checksum is not None:
                self.checksum.update(self.buffer)
            self.received += len(self.buffer)
            if self.decoded_length is not None and self.received > self.decoded_length:
                raise _incomplete("more data than x-amz-decoded-content-length")
        chunk, self.buffer = self.buffer[:size], self.buffer[size:]
        return chunk

    def finish(self) -> None:
        assert self.ended and not self.buffer
        if self.decoded_length is not None and self.received != self.decoded_length:
            raise _incomplete(f"{self.received} bytes decoded, x-amz-decoded-content-length says {self.decoded_length}")
        if self.checksum is None:
            return
        expected = self.expected_checksum or self.trailers.get(f"x-amz-checksum-{self.checksum.algorithm}", "")
        if self.trailer_name and not expected:
            raise S3Error("MalformedTrailerError", f"the trailer {self.trailer_name} is missing", 400)
        if expected and self.checksum.value() != expected:
            raise bad_checksum(self.checksum.algorithm)
        if expected:
            self.verified = {self.checksum.algorithm: expected}
