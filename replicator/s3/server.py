"""The S3 endpoint of a site: aiohttp over `ObjectStore` (store.py) over the site's `SiteBackend`.

Theory of operation. One catch-all route takes every request; the raw path
and query (as the client signed them) are split into bucket, key and
sub-resources; the request is authenticated (auth.py) before anything is
read or written; then one handler per S3 operation runs. Operating errors
of the backend map to S3 errors: a site that cannot serve answers 503
SlowDown (clients retry, a load balancer moves them to the other site), an
outcome-unknown write 500 InternalError (clients retry; every S3 write is
idempotent by key). `/-/health` (not a valid bucket name, unauthenticated)
answers 200 while the site serves and 503 otherwise, for a load balancer.

Path-style addressing (`/bucket/key`) always; virtual-host style
(`bucket.SUFFIX/key`) when `s3.virtual_host_suffix` is set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote, unquote
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from aiohttp import web

from replicator.api import errors
from replicator.api.backend import SiteBackend
from replicator.api.pieces import sweep_forever, valid_bucket_name
from replicator.config import S3Config, TlsFiles, parse_address
from replicator.s3.auth import (
    Authenticated,
    Checksum,
    ChunkedBody,
    PlainBody,
    RequestHead,
    authenticate,
    load_credentials,
    parse_query,
)
from replicator.s3.errors import S3Error, invalid_argument, invalid_request, not_implemented
from replicator.s3.store import (
    Body,
    IteratorBody,
    Manifest,
    ObjectChangedError,
    ObjectStore,
    Part,
    StoreLimits,
    Upload,
)

log = logging.getLogger("replicator.s3")

XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
OWNER_ID = "replicator"
META_PREFIX = "x-amz-meta-"
META_BYTES_MAX = 2048
CONTENT_HEADERS = (
    "content-type",
    "content-encoding",
    "content-disposition",
    "content-language",
    "cache-control",
    "expires",
)
DEFAULT_CONTENT_TYPE = "binary/octet-stream"
XML_BYTES_MAX = 2 * 1024 * 1024  # CompleteMultipartUpload of 10,000 parts fits
DELETE_OBJECTS_MAX = 1000
T = TypeVar("T")
GET_ATTEMPTS = 3  # reads of an object replaced between its manifest and its first piece (get_object)
HEALTH_PATH = "/-/health"
UNSUPPORTED = frozenset(
    "versioning policy cors lifecycle website tagging logging notification replication encryption object-lock retention "
    "legal-hold requestPayment accelerate analytics inventory metrics intelligent-tiering ownershipControls "
    "publicAccessBlock torrent restore select attributes policyStatus append".split()
)
OPERATIONS = (
    "ListBuckets CreateBucket HeadBucket DeleteBucket GetBucketLocation GetBucketVersioning ListObjects ListObjectsV2 "
    "ListMultipartUploads DeleteObjects PutObject CopyObject GetObject HeadObject DeleteObject CreateMultipartUpload "
    "UploadPart UploadPartCopy CompleteMultipartUpload AbortMultipartUpload ListParts NotImplemented Unknown"
).split()


def _check_bucket(name: str) -> str:
    if not valid_bucket_name(name):
        raise S3Error("InvalidBucketName", f"The specified bucket is not valid: {name!r}", 400, resource=name)
    return name


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _http_date(ms: int) -> str:
    return format_datetime(datetime.fromtimestamp(ms // 1000, UTC), usegmt=True)


def _parse_http_date(text: str) -> float | None:
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


def _xml(root: str, body: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{XMLNS}">{body}</{root}>'.encode()


_CONTROL = {c: f"&#{c};" for c in range(32) if chr(c) not in "\t"}


def _element(name: str, value: object) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    # Control characters (a key may hold them) as character references, which XML parsers keep.
    return f"<{name}>{escape(str(value)).translate(_CONTROL)}</{name}>"


def _owner() -> str:
    return f"<Owner><ID>{OWNER_ID}</ID><DisplayName>{OWNER_ID}</DisplayName></Owner>"


def _acl() -> bytes:
    """The one account has full control of everything: the only ACL there is."""
    grant = (
        '<Grant><Grantee xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="CanonicalUser">'
        f"<ID>{OWNER_ID}</ID><DisplayName>{OWNER_ID}</DisplayName></Grantee><Permission>FULL_CONTROL</Permission></Grant>"
    )
    return _xml("AccessControlPolicy", f"{_owner()}<AccessControlList>{grant}</AccessControlList>")


def _parse_xml(raw: bytes) -> ElementTree.Element:
    try:
        root = ElementTree.fromstring(raw)
    except ElementTree.ParseError:
        raise S3Error(
            "MalformedXML",
            "The XML you provided was not well-formed or did not validate against our published schema",
            400,
        ) from None
    for element in root.iter():  # drop namespaces: clients send them or not
        if "}" in element.tag:
            element.tag = element.tag.split("}", 1)[1]
    return root


def _etag_matches(header: str, etag: str) -> bool:
    candidates = [c.strip() for c in header.split(",")]
    return any(c == "*" or c.strip('"') == etag for c in candidates)


class S3Server:
    """The aiohttp application and its listener. `address` is "host:port" once started."""

    def __init__(
        self,
        backend: SiteBackend,
        config: S3Config,
        timeout_s: float,
        tls: TlsFiles | None = None,
        metrics: Any = None,
        key_bytes_max: int = 1024,
    ) -> None:
        self.backend = backend
        self.config = config
        self.tls = tls
        self.credentials = load_credentials(config.credentials_file)
        self.store = ObjectStore(
            backend,
            StoreLimits.of(config, timeout_s, key_bytes_max),
        )
        self.key_bytes_max = key_bytes_max
        self.runner: web.AppRunner | None = None
        self.address = ""
        self.sweeper: asyncio.Task[None] | None = None
        self.m_requests = self.m_latency = self.m_bytes = None
        if metrics is not None:
            self.m_requests = metrics.counter(
                "replicator_s3_requests_total", "S3 requests by operation and HTTP status", ["operation", "status"]
            )
            self.m_latency = metrics.histogram("replicator_s3_request_seconds", "S3 request latency", ["operation"])
            self.m_bytes = metrics.counter("replicator_s3_bytes_total", "S3 body bytes", ["direction"])
            self.m_garbage = metrics.counter("replicator_s3_garbage_freed_total", "unreferenced piece sets freed")

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        app = web.Application(client_max_size=XML_BYTES_MAX)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        host, port = parse_address(self.config.listen)
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.tls.cert_file), str(self.tls.key_file))
            context.load_verify_locations(str(self.tls.ca_file))
            context.verify_mode = ssl.CERT_OPTIONAL  # S3 clients authenticate with signatures, not certificates
        site = web.TCPSite(self.runner, host, port, ssl_context=context, reuse_port=False, backlog=512)
        await site.start()
        server = site._server
        assert server is not None
        bound = server.sockets[0].getsockname()  # type: ignore[union-attr]
        self.address = f"{bound[0]}:{bound[1]}"
        self.sweeper = asyncio.create_task(self._sweep(), name="s3-garbage-sweep")

    async def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
        if self.runner is not None:
            await self.runner.cleanup()
        for task in list(self.store.background):
            task.cancel()

    async def _sweep(self) -> None:
        def freed(count: int) -> None:
            if self.m_requests is not None:
                self.m_garbage.inc(count)

        await sweep_forever(
            self.store, self.config.garbage_sweep_interval_ms / 1000, lambda: self.backend.status().serving, freed
        )

    # ------------------------------------------------------------ the one route
    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = os.urandom(8).hex().upper()
        operation = ["Unknown"]
        try:
            response = await self._handle(request, operation)
        except S3Error as error:
            response = self._error(request, error, request_id)
        except errors.Unavailable as error:
            response = self._error(
                request, S3Error("SlowDown", f"this site cannot serve now ({error.message})", 503), request_id
            )
        except errors.Overloaded as error:  # admission control: nothing applied, retry here soon
            busy = S3Error("SlowDown", f"please reduce your request rate: {error.message}", 503)
            busy.headers["Retry-After"] = str(max(1, -(-error.retry_after_ms // 1000)))
            response = self._error(request, busy, request_id)
        except (errors.OutcomeUnknown, TimeoutError):
            response = self._error(
                request, S3Error("InternalError", "the outcome of the write is unknown; retry it", 500), request_id
            )
        except errors.Corrupt as error:
            response = self._error(request, S3Error("InternalError", error.message, 500), request_id)
        except errors.InvalidRequest as error:
            response = self._error(request, invalid_request(error.message), request_id)
        except (ConnectionError, asyncio.IncompleteReadError) as error:
            log.info("s3 request cut short: %s", error)
            raise
        response.headers["x-amz-request-id"] = request_id
        if self.m_requests is not None:
            self.m_requests.labels(operation[0], str(response.status)).inc()
            self.m_latency.labels(operation[0]).observe(time.perf_counter() - started)
        return response

    def _error(self, request: web.Request, error: S3Error, request_id: str) -> web.Response:
        headers = dict(error.headers)
        if request.method == "HEAD":
            return web.Response(status=error.status, headers=headers)
        return web.Response(
            status=error.status, body=error.xml(request_id), content_type="application/xml", headers=headers
        )

    def _split(self, request: web.Request, raw_path: str) -> tuple[str | None, str | None]:
        """(bucket, key) from the Host (virtual-host style) or the path; key None for a bucket request."""
        path = raw_path[1:] if raw_path.startswith("/") else raw_path
        suffix = self.config.virtual_host_suffix
        host = request.headers.get("Host", "").rsplit(":", 1)[0] if "]" not in request.headers.get("Host", "") else ""
        if suffix and host.endswith("." + suffix):
            bucket = host[: -len(suffix) - 1]
            key = unquote(path)
            return _check_bucket(bucket), key or None
        if not path:
            return None, None
        bucket_text, slash, key_text = path.partition("/")
        bucket = _check_bucket(unquote(bucket_text))
        key = unquote(key_text)
        if not slash or not key:
            return bucket, None
        return bucket, key

    def _check_key(self, key: str) -> str:
        encoded = key.encode("utf-8", errors="surrogatepass")
        if len(encoded) > self.key_bytes_max:
            raise S3Error("KeyTooLongError", "Your key is too long", 400)
        if "\x00" in key:
            raise invalid_argument("object keys may not contain NUL")
        return key

    async def _handle(self, request: web.Request, operation: list[str]) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        if raw_path == HEALTH_PATH and request.method in ("GET", "HEAD"):
            operation[0] = "Health"
            status = self.backend.status()
            return web.Response(
                status=200 if status.serving else 503, text=f"{status.site} {status.state}\n", content_type="text/plain"
            )
        query = parse_query(raw_query)
        head = RequestHead(request.method, raw_path, query, request.headers)
        auth = authenticate(head, self.credentials, time.time(), self.config.clock_skew_ms_max / 1000)
        bucket, key = self._split(request, raw_path)
        params = dict(query)
        method = request.method
        unsupported = sorted(UNSUPPORTED & params.keys() - ({"versioning"} if method == "GET" else set()))
        if bucket is None:
            if method == "GET":
                operation[0] = "ListBuckets"
                return await self.list_buckets(params)
            raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.", 405)
        if "acl" in params:
            operation[0] = "GetAcl" if method == "GET" else "NotImplemented"
            if method != "GET":
                raise not_implemented("setting an ACL (one account owns everything)")
            if key is None:
                await self.store.require_bucket(bucket)
            else:
                await self.store.head(bucket, self._check_key(key))
            return self._xml_response(_acl())
        if key is None:
            if unsupported:
                operation[0] = "NotImplemented"
                raise not_implemented(f"the bucket sub-resource ?{unsupported[0]}")
            if method == "PUT":
                operation[0] = "CreateBucket"
                return await self.create_bucket(request, bucket, auth)
            if method == "HEAD":
                operation[0] = "HeadBucket"
                await self.store.require_bucket(bucket)
                return web.Response(status=200, headers={"x-amz-bucket-region": self.config.region})
            if method == "DELETE":
                operation[0] = "DeleteBucket"
                await self.store.delete_bucket(bucket)
                return web.Response(status=204)
            if method == "GET":
                if "location" in params:
                    operation[0] = "GetBucketLocation"
                    location = await self.store.bucket_location(bucket)
                    if not location and self.config.region != "us-east-1":
                        location = self.config.region
                    return self._xml_response(_xml("LocationConstraint", escape(location)))
                if "versioning" in params and method == "GET":
                    operation[0] = "GetBucketVersioning"
                    await self.store.require_bucket(bucket)
                    return self._xml_response(_xml("VersioningConfiguration", ""))
                if "versions" in params:
                    operation[0] = "ListObjectVersions"
                    return await self.list_versions(bucket, params)
                if "uploads" in params:
                    operation[0] = "ListMultipartUploads"
                    return await self.list_uploads(bucket, params)
                if params.get("list-type") == "2":
                    operation[0] = "ListObjectsV2"
                    return await self.list_objects(bucket, params, v2=True)
                operation[0] = "ListObjects"
                return await self.list_objects(bucket, params, v2=False)
            if method == "POST" and "delete" in params:
                operation[0] = "DeleteObjects"
                return await self.delete_objects(request, bucket, auth)
            raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.", 405)
        key = self._check_key(key)
        if unsupported:
            operation[0] = "NotImplemented"
            raise not_implemented(f"the object sub-resource ?{unsupported[0]}")
        if method == "PUT":
            if "uploadId" in params or "partNumber" in params:
                if "x-amz-copy-source" in request.headers:
                    operation[0] = "UploadPartCopy"
                else:
                    operation[0] = "UploadPart"
                return await self.upload_part(request, bucket, key, params, auth)
            if "x-amz-copy-source" in request.headers:
                operation[0] = "CopyObject"
                return await self.copy_object(request, bucket, key)
            operation[0] = "PutObject"
            return await self.put_object(request, bucket, key, auth)
        if method in ("GET", "HEAD"):
            if "uploadId" in params and method == "GET":
                operation[0] = "ListParts"
                return await self.list_parts(bucket, key, params)
            operation[0] = "GetObject" if method == "GET" else "HeadObject"
            return await self.get_object(request, bucket, key, params)
        if method == "DELETE":
            if "uploadId" in params:
                operation[0] = "AbortMultipartUpload"
                upload = await self.store.get_upload(bucket, key, params["uploadId"])
                await self.store.abort_upload(upload)
                return web.Response(status=204)
            operation[0] = "DeleteObject"
            await self.store.delete(bucket, key)
            return web.Response(status=204)
        if method == "POST":
            if "uploads" in params:
                operation[0] = "CreateMultipartUpload"
                return await self.create_upload(request, bucket, key)
            if "uploadId" in params:
                operation[0] = "CompleteMultipartUpload"
                return await self.complete_upload(request, bucket, key, params, auth)
        raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.", 405)

    # ------------------------------------------------------------ helpers
    def _xml_response(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/xml", headers=headers)

    def _body(self, request: web.Request, auth: Authenticated, checksum: tuple[str, str] | None = None) -> Body:
        """The decoded request body with every check it must pass (payload hash, chunk signatures, checksums)."""
        headers = request.headers
        sha = headers.get("x-amz-content-sha256", "")
        encoding = [e.strip() for e in headers.get("Content-Encoding", "").split(",") if e.strip()]
        if checksum is None:
            checksum = self._checksum_header(request)
        # The framing is announced by the payload hash (a Content-Encoding of aws-chunked alone is only
        # stripped from the stored header: boto3 sends it on plain bodies too).
        del encoding
        if auth.payload.startswith("chunked") or sha.startswith("STREAMING-"):
            if not auth.payload.startswith("chunked"):
                raise invalid_argument("an aws-chunked body needs a STREAMING-* x-amz-content-sha256 under SigV4")
            decoded = headers.get("x-amz-decoded-content-length")
            decoded_length = None
            if decoded is not None:
                if not decoded.isdigit():
                    raise invalid_argument("x-amz-decoded-content-length must be a number")
                decoded_length = int(decoded)
            trailer = headers.get("x-amz-trailer", "").strip()
            if trailer and not trailer.lower().startswith("x-amz-checksum-"):
                raise invalid_argument(f"unsupported trailer {trailer!r}")
            return ChunkedBody(request.content, auth, decoded_length, checksum, trailer)  # type: ignore[arg-type]
        length = request.content_length
        if length is None and headers.get("Transfer-Encoding", "").lower() != "chunked":
            if request.method in ("PUT", "POST") and request.can_read_body:
                raise S3Error("MissingContentLength", "You must provide the Content-Length HTTP header.", 411)
            length = 0
        return PlainBody(
            request.content,  # type: ignore[arg-type]
            length if length is not None else 1 << 62,
            auth.payload_sha256 if auth.payload == "sha256" else "",
            checksum,
        )

    def _checksum_header(self, request: web.Request) -> tuple[str, str] | None:
        for algorithm in Checksum.ALGORITHMS:
            value = request.headers.get(f"x-amz-checksum-{algorithm}")
            if value is not None:
                return algorithm, value
        return None

    def _content_md5(self, request: web.Request) -> str | None:
        value = request.headers.get("Content-MD5")
        if value is None:
            return None
        try:
            digest = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            digest = b""
        if len(digest) != 16:
            raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.", 400)
        return digest.hex()

    def _object_headers(self, request: web.Request) -> tuple[dict[str, str], dict[str, str]]:
        headers: dict[str, str] = {}
        for name in CONTENT_HEADERS:
            value = request.headers.get(name)
            if value is None:
                continue
            if name == "content-encoding":
                value = ",".join(e.strip() for e in value.split(",") if e.strip() and e.strip() != "aws-chunked")
                if not value:
                    continue
            headers[name] = value
        meta: dict[str, str] = {}
        for name, value in request.headers.items():
            lower = name.lower()
            if lower.startswith(META_PREFIX):
                meta[lower[len(META_PREFIX) :]] = value
        if sum(len(k) + len(v) for k, v in meta.items()) > META_BYTES_MAX:
            raise S3Error("MetadataTooLarge", "Your metadata headers exceed the maximum allowed metadata size.", 400)
        return headers, meta

    async def _read_small_body(self, request: web.Request, auth: Authenticated) -> bytes:
        body = self._body(request, auth)
        data = b""
        while True:
            chunk = await body.read(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > XML_BYTES_MAX:
                raise S3Error("MaxMessageLengthExceeded", "Your request was too big.", 400)
        body.finish()
        md5 = self._content_md5(request)
        if md5 is not None:
            import hashlib

            if hashlib.md5(data).hexdigest() != md5:
                raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)
        return data

    # ------------------------------------------------------------ buckets
    async def list_buckets(self, params: dict[str, str]) -> web.Response:
        buckets = await self.store.list_buckets()
        prefix = params.get("prefix", "")
        after = params.get("continuation-token", "")
        limit = self._max(params, "max-buckets", 10_000)
        chosen = [(n, c) for n, c in buckets if n.startswith(prefix) and n > after]
        more = len(chosen) > limit
        chosen = chosen[:limit]
        body = "".join(
            f"<Bucket>{_element('Name', name)}{_element('CreationDate', _iso(created))}</Bucket>"
            for name, created in chosen
        )
        token = _element("ContinuationToken", chosen[-1][0]) if more and chosen else ""
        prefix_element = _element("Prefix", prefix) if prefix else ""
        return self._xml_response(
            _xml("ListAllMyBucketsResult", f"{_owner()}<Buckets>{body}</Buckets>{token}{prefix_element}")
        )

    async def create_bucket(self, request: web.Request, bucket: str, auth: Authenticated) -> web.Response:
        raw = await self._read_small_body(request, auth)
        if raw.strip():
            root = _parse_xml(raw)
            if root.tag != "CreateBucketConfiguration":
                raise S3Error("MalformedXML", "The XML you provided was not well-formed", 400)
        location = ""
        if raw.strip():
            location = (root.findtext("LocationConstraint") or "").strip()
        await self.store.create_bucket(bucket, location, recreate_ok=self.config.region == "us-east-1")
        return web.Response(status=200, headers={"Location": f"/{bucket}"})

    # ------------------------------------------------------------ listing
    def _max(self, params: dict[str, str], name: str, default: int) -> int:
        text = params.get(name)
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise invalid_argument(f"{name} must be an integer") from None
        if value < 0:
            raise invalid_argument(f"{name} must be non-negative")
        return min(value, default)

    async def list_objects(self, bucket: str, params: dict[str, str], v2: bool) -> web.Response:
        await self.store.require_bucket(bucket)
        prefix = params.get("prefix", "")
        delimiter = params.get("delimiter", "")
        max_keys = self._max(params, "max-keys", 1000)
        encoding = params.get("encoding-type", "")
        if encoding and encoding != "url":
            raise invalid_argument("Invalid Encoding Method specified in Request")
        if v2:
            token = params.get("continuation-token")
            if token is not None:
                try:
                    after = base64.urlsafe_b64decode(token.encode()).decode()
                except (binascii.Error, ValueError, UnicodeDecodeError):
                    raise invalid_argument("The continuation token provided is incorrect") from None
            else:
                after = params.get("start-after", "")
        else:
            after = params.get("marker", "")
        contents, prefixes, truncated, last = await self._walk(bucket, prefix, delimiter, after, max_keys)

        def enc(text: str) -> str:
            return quote(text, safe="/") if encoding == "url" else text

        # v1 leaves the top-level Prefix as it is even with encoding-type=url (botocore decodes it only in v2).
        out = [_element("Name", bucket), _element("Prefix", enc(prefix) if v2 else prefix)]
        if v2:
            out.append(_element("KeyCount", len(contents) + len(prefixes)))
            if "continuation-token" in params:
                out.append(_element("ContinuationToken", params["continuation-token"]))
            if truncated and last is not None:
                out.append(_element("NextContinuationToken", base64.urlsafe_b64encode(last.encode()).decode()))
            if "start-after" in params:
                out.append(_element("StartAfter", enc(params["start-after"])))
        else:
            out.append(_element("Marker", enc(after)))
            if truncated and delimiter and last is not None:
                out.append(_element("NextMarker", enc(last)))
        out.append(_element("MaxKeys", max_keys))
        if delimiter:
            out.append(_element("Delimiter", enc(delimiter)))
        if encoding:
            out.append(_element("EncodingType", encoding))
        out.append(_element("IsTruncated", truncated))
        owner = not v2 or params.get("fetch-owner") == "true"
        for item in contents:
            manifest = item.manifest
            out.append(
                "<Contents>"
                + _element("Key", enc(item.key))
                + _element("LastModified", _iso(manifest.mtime_ms))
                + _element("ETag", f'"{manifest.etag}"')
                + _element("Size", manifest.size)
                + _element("StorageClass", "STANDARD")
                + (_owner() if owner else "")
                + "</Contents>"
            )
        for common in prefixes:
            out.append(f"<CommonPrefixes>{_element('Prefix', enc(common))}</CommonPrefixes>")
        return self._xml_response(_xml("ListBucketResult", "".join(out)))

    async def list_versions(self, bucket: str, params: dict[str, str]) -> web.Response:
        """Versioning is never on: every object is its one version, "null"."""
        await self.store.require_bucket(bucket)
        prefix = params.get("prefix", "")
        delimiter = params.get("delimiter", "")
        max_keys = self._max(params, "max-keys", 1000)
        after = params.get("key-marker", "")
        contents, prefixes, truncated, last = await self._walk(bucket, prefix, delimiter, after, max_keys)
        out = [
            _element("Name", bucket),
            _element("Prefix", prefix),
            _element("KeyMarker", after),
            _element("VersionIdMarker", params.get("version-id-marker", "")),
            _element("MaxKeys", max_keys),
            _element("IsTruncated", truncated),
        ]
        if delimiter:
            out.append(_element("Delimiter", delimiter))
        if truncated and last is not None:
            out += [_element("NextKeyMarker", last), _element("NextVersionIdMarker", "null")]
        for item in contents:
            manifest = item.manifest
            out.append(
                "<Version>"
                + _element("Key", item.key)
                + _element("VersionId", "null")
                + _element("IsLatest", True)
                + _element("LastModified", _iso(manifest.mtime_ms))
                + _element("ETag", f'"{manifest.etag}"')
                + _element("Size", manifest.size)
                + _element("StorageClass", "STANDARD")
                + _owner()
                + "</Version>"
            )
        for common in prefixes:
            out.append(f"<CommonPrefixes>{_element('Prefix', common)}</CommonPrefixes>")
        return self._xml_response(_xml("ListVersionsResult", "".join(out)))

    async def _walk(
        self, bucket: str, prefix: str, delimiter: str, after: str, max_keys: int
    ) -> tuple[list[Any], list[str], bool, str | None]:
        """(contents, common prefixes, truncated, last key or prefix returned) of one listing page."""
        contents: list[Any] = []
        prefixes: list[str] = []
        last: str | None = None
        start = after.encode() + b"\x00" if after else b""
        if max_keys == 0:
            return contents, prefixes, False, None
        while True:
            # Read no further than the answer needs (one more key tells whether it is truncated).
            wanted = min(1000, max_keys - len(contents) - len(prefixes) + 1)
            page = await self.store.list_range(bucket, prefix, start, wanted)
            if not page:
                return contents, prefixes, False, last
            jumped = False
            for item in page:
                if delimiter:
                    index = item.key.find(delimiter, len(prefix))
                    if index >= 0:
                        common = item.key[: index + len(delimiter)]
                        if after and common <= after:
                            pass  # returned on an earlier page
                        else:
                            if len(contents) + len(prefixes) == max_keys:
                                return contents, prefixes, True, last
                            prefixes.append(common)
                            last = common
                        # Skip every key under this common prefix with one seek.
                        from replicator.api.keys import prefix_end

                        skip = prefix_end(common.encode())
                        if skip is None:
                            return contents, prefixes, False, last
                        start = skip
                        jumped = True
                        break
                if len(contents) + len(prefixes) == max_keys:
                    return contents, prefixes, True, last
                contents.append(item)
                last = item.key
            if not jumped:
                if len(page) < wanted:
                    return contents, prefixes, False, last
                start = page[-1].key.encode() + b"\x00"

    # ------------------------------------------------------------ objects
    def _put_check(self, request: web.Request) -> Callable[[Manifest | None], None] | None:
        if_none_match = request.headers.get("If-None-Match")
        if_match = request.headers.get("If-Match")
        if if_none_match is None and if_match is None:
            return None

        def check(old: Manifest | None) -> None:
            if if_none_match is not None and old is not None and _etag_matches(if_none_match, old.etag):
                raise S3Error(
                    "PreconditionFailed", "At least one of the pre-conditions you specified did not hold", 412
                )
            if if_match is not None:
                if old is None:
                    raise S3Error("NoSuchKey", "The specified key does not exist.", 404)
                if not _etag_matches(if_match, old.etag):
                    raise S3Error(
                        "PreconditionFailed", "At least one of the pre-conditions you specified did not hold", 412
                    )

        return check

    async def put_object(self, request: web.Request, bucket: str, key: str, auth: Authenticated) -> web.Response:
        headers, meta = self._object_headers(request)
        content_md5 = self._content_md5(request)
        checksum = self._checksum_header(request)
        body = self._body(request, auth, checksum)
        trailer = request.headers.get("x-amz-trailer", "").strip().lower()
        manifest = await self.store.put(bucket, key, body, headers, meta, self._put_check(request), None, content_md5)
        if self.m_bytes is not None:
            self.m_bytes.labels("in").inc(manifest.size)
        answer = {"ETag": f'"{manifest.etag}"'}
        if checksum is not None:
            answer[f"x-amz-checksum-{checksum[0]}"] = checksum[1]
        elif trailer and isinstance(body, ChunkedBody) and trailer in body.trailers:
            answer[trailer] = body.trailers[trailer]
        return web.Response(status=200, headers=answer)

    def _get_conditions(self, request: web.Request, manifest: Manifest, prefix: str = "") -> int | None:
        """None to go on, or the status (304, 412) the conditional headers call for."""
        headers = request.headers
        mtime = manifest.mtime_ms // 1000
        if_match = headers.get(prefix + "If-Match")
        if if_match is not None:
            if not _etag_matches(if_match, manifest.etag):
                return 412
        else:
            since = headers.get(prefix + "If-Unmodified-Since")
            moment = _parse_http_date(since) if since else None
            if moment is not None and mtime > moment:
                return 412
        if_none_match = headers.get(prefix + "If-None-Match")
        if if_none_match is not None:
            if _etag_matches(if_none_match, manifest.etag):
                return 304 if not prefix else 412
        else:
            since = headers.get(prefix + "If-Modified-Since")
            moment = _parse_http_date(since) if since else None
            if moment is not None and mtime <= moment:
                return 304 if not prefix else 412
        return None

    def _object_answer_headers(self, manifest: Manifest, params: dict[str, str]) -> dict[str, str]:
        headers = {
            "ETag": f'"{manifest.etag}"',
            "Last-Modified": _http_date(manifest.mtime_ms),
            "Accept-Ranges": "bytes",
            "Content-Type": manifest.headers.get("content-type", DEFAULT_CONTENT_TYPE),
        }
        for name in CONTENT_HEADERS[1:]:
            if name in manifest.headers:
                headers[name.title()] = manifest.headers[name]
        for name, value in manifest.meta.items():
            headers[META_PREFIX + name] = value
        if manifest.parts:
            headers["x-amz-mp-parts-count"] = str(manifest.parts)
        for name in CONTENT_HEADERS:
            override = params.get("response-" + name)
            if override is not None:
                headers["Content-Type" if name == "content-type" else name.title()] = override
        return headers

    @staticmethod
    def _parse_range(text: str, size: int) -> tuple[int, int] | None:
        """[start, end) for a single `bytes=` range; None if the header is to be ignored; S3Error 416 if unsatisfiable."""
        text = text.strip()
        if not text.startswith("bytes=") or "," in text:
            return None
        first, dash, last = text[6:].strip().partition("-")
        if not dash:
            return None
        try:
            if first == "":
                suffix = int(last)
                if suffix <= 0:
                    raise ValueError
                return (max(size - suffix, 0), size) if size else None
            start = int(first)
            end = int(last) + 1 if last else size
        except ValueError:
            return None
        if end <= start:
            return None
        if start >= size:
            raise S3Error(
                "InvalidRange",
                "The requested range is not satisfiable",
                416,
                headers={"Content-Range": f"bytes */{size}"},
            )
        return start, min(end, size)

    async def get_object(
        self, request: web.Request, bucket: str, key: str, params: dict[str, str]
    ) -> web.StreamResponse:
        # The first chunk is read before the answer's head is sent: an object replaced between its
        # manifest and its first piece (every object over inline_bytes_max is at least two reads) is
        # read again from its new manifest, up to GET_ATTEMPTS times, instead of failing. One replaced
        # later, mid-stream, can only cut the answer short.
        for attempt in range(GET_ATTEMPTS):
            manifest = await self.store.head(bucket, key)
            answer = self._get_answer(request, manifest, params)
            if isinstance(answer, web.Response):
                return answer
            status, headers, start, end = answer
            chunks = self.store.read_range(manifest, start, end)
            try:
                first = await anext(chunks, b"") if request.method == "GET" else b""
            except ObjectChangedError:
                await chunks.aclose()
                if attempt + 1 == GET_ATTEMPTS:
                    raise
                continue
            break
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        try:
            await response.prepare(request)
            if request.method == "GET":
                await response.write(first)
                async for chunk in chunks:
                    await response.write(chunk)
                if self.m_bytes is not None:
                    self.m_bytes.labels("out").inc(end - start)
        finally:
            await chunks.aclose()
        await response.write_eof()
        return response

    def _get_answer(
        self, request: web.Request, manifest: Manifest, params: dict[str, str]
    ) -> web.Response | tuple[int, dict[str, str], int, int]:
        """What a GET or HEAD of `manifest` answers: 304 at once, or (status, headers, start, end) to stream."""
        headers = self._object_answer_headers(manifest, params)
        condition = self._get_conditions(request, manifest)
        if condition == 412:
            raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold", 412)
        if condition == 304:
            return web.Response(
                status=304, headers={"ETag": headers["ETag"], "Last-Modified": headers["Last-Modified"]}
            )
        start, end, status = 0, manifest.size, 200
        if "partNumber" in params:
            raise not_implemented("GetObject with partNumber")
        range_header = request.headers.get("Range")
        if range_header:
            span = self._parse_range(range_header, manifest.size)
            if span is not None:
                start, end = span
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{manifest.size}"
        if status == 200 and request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED":
            # The whole object's checksums, as verified when it was PUT (none for multipart objects).
            for algorithm, value in manifest.checksums.items():
                headers[f"x-amz-checksum-{algorithm}"] = value
        return status, headers, start, end

    def _copy_source(self, request: web.Request) -> tuple[str, str]:
        source = unquote(request.headers["x-amz-copy-source"])
        source, _, version = source.partition("?")
        if version and not version.startswith("versionId=null"):
            raise not_implemented("copying a version")
        source = source.lstrip("/")
        bucket, slash, key = source.partition("/")
        if not slash or not key:
            raise invalid_argument("Copy Source must mention the source bucket and key: sourcebucket/sourcekey")
        return _check_bucket(bucket), self._check_key(key)

    async def _source_manifest(self, request: web.Request) -> tuple[str, str, Manifest]:
        source_bucket, source_key = self._copy_source(request)
        manifest = await self.store.head(source_bucket, source_key)
        if self._get_conditions(request, manifest, "x-amz-copy-source-") is not None:
            raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold", 412)
        return source_bucket, source_key, manifest

    async def _copying(self, request: web.Request, copy: Callable[[str, str, Manifest], Awaitable[T]]) -> T:
        """`copy(source bucket, source key, source manifest)`, again from the source's new manifest (its
        conditions judged again) when the source was replaced while it was read, up to GET_ATTEMPTS times:
        an object over inline_bytes_max is a manifest read, then piece reads. The attempt cut short freed
        what it wrote (the destination's record was not written)."""
        for attempt in range(GET_ATTEMPTS):
            source_bucket, source_key, source = await self._source_manifest(request)
            try:
                return await copy(source_bucket, source_key, source)
            except ObjectChangedError:
                if attempt + 1 == GET_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def copy_object(self, request: web.Request, bucket: str, key: str) -> web.Response:
        return await self._copying(request, lambda b, k, source: self._copy_object(request, bucket, key, b, k, source))

    async def _copy_object(
        self, request: web.Request, bucket: str, key: str, source_bucket: str, source_key: str, source: Manifest
    ) -> web.Response:
        directive = request.headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise invalid_argument("Unknown metadata directive.")
        if directive == "COPY":
            headers, meta = dict(source.headers), dict(source.meta)
            if (source_bucket, source_key) == (bucket, key):
                raise invalid_request(
                    "This copy request is illegal because it is trying to copy an object to itself without changing "
                    "the object's metadata, storage class, website redirect location or encryption attributes."
                )
        else:
            headers, meta = self._object_headers(request)
        body = IteratorBody(self.store.read_range(source, 0, source.size))
        manifest = await self.store.put(bucket, key, body, headers, meta, self._put_check(request))
        result = _element("LastModified", _iso(manifest.mtime_ms)) + _element("ETag", f'"{manifest.etag}"')
        return self._xml_response(_xml("CopyObjectResult", result))

    # ------------------------------------------------------------ multipart
    async def create_upload(self, request: web.Request, bucket: str, key: str) -> web.Response:
        headers, meta = self._object_headers(request)
        upload_id = await self.store.create_upload(bucket, key, headers, meta)
        body = _element("Bucket", bucket) + _element("Key", key) + _element("UploadId", upload_id)
        return self._xml_response(_xml("InitiateMultipartUploadResult", body))

    def _part_number(self, params: dict[str, str]) -> int:
        text = params.get("partNumber", "")
        if not text.isdigit() or not 1 <= int(text) <= self.config.parts_max:
            raise invalid_argument(f"Part number must be an integer between 1 and {self.config.parts_max}, inclusive")
        return int(text)

    async def upload_part(
        self, request: web.Request, bucket: str, key: str, params: dict[str, str], auth: Authenticated
    ) -> web.Response:
        number = self._part_number(params)
        upload = await self.store.get_upload(bucket, key, params.get("uploadId", ""))
        if "x-amz-copy-source" in request.headers:

            async def copy_part(source_bucket: str, source_key: str, source: Manifest) -> Part:
                start, end = 0, source.size
                span = request.headers.get("x-amz-copy-source-range")
                if span is not None:
                    match = re.fullmatch(r"bytes=(\d+)-(\d+)", span.strip())
                    if not match or int(match[2]) < int(match[1]) or int(match[2]) >= source.size:
                        raise S3Error("InvalidRange", "The requested range is not satisfiable", 416)
                    start, end = int(match[1]), int(match[2]) + 1
                chunks = IteratorBody(self.store.read_range(source, start, end))
                return await self.store.upload_part(upload, number, chunks, None)

            part = await self._copying(request, copy_part)
            result = _element("LastModified", _iso(part.mtime_ms)) + _element("ETag", f'"{part.md5}"')
            return self._xml_response(_xml("CopyPartResult", result))
        checksum = self._checksum_header(request)
        body = self._body(request, auth, checksum)
        part = await self.store.upload_part(upload, number, body, self._content_md5(request))
        if self.m_bytes is not None:
            self.m_bytes.labels("in").inc(part.size)
        headers = {"ETag": f'"{part.md5}"'}
        if checksum is not None:
            headers[f"x-amz-checksum-{checksum[0]}"] = checksum[1]
        return web.Response(status=200, headers=headers)

    async def complete_upload(
        self, request: web.Request, bucket: str, key: str, params: dict[str, str], auth: Authenticated
    ) -> web.Response:
        upload = await self.store.get_upload(bucket, key, params["uploadId"])
        root = _parse_xml(await self._read_small_body(request, auth))
        if root.tag != "CompleteMultipartUpload":
            raise S3Error("MalformedXML", "The XML you provided was not well-formed", 400)
        chosen: list[tuple[int, str]] = []
        for part in root.findall("Part"):
            number, etag = part.findtext("PartNumber"), part.findtext("ETag")
            if number is None or not number.strip().isdigit() or etag is None:
                raise S3Error("MalformedXML", "every Part needs a PartNumber and an ETag", 400)
            chosen.append((int(number), etag.strip().strip('"')))
        if len(chosen) > self.config.parts_max:
            raise invalid_argument(f"at most {self.config.parts_max} parts")
        manifest = await self.store.complete_upload(upload, chosen, self._put_check(request))
        body = (
            _element("Location", f"/{bucket}/{key}")
            + _element("Bucket", bucket)
            + _element("Key", key)
            + _element("ETag", f'"{manifest.etag}"')
        )
        return self._xml_response(_xml("CompleteMultipartUploadResult", body))

    async def list_parts(self, bucket: str, key: str, params: dict[str, str]) -> web.Response:
        upload = await self.store.get_upload(bucket, key, params["uploadId"])
        limit = self._max(params, "max-parts", 1000)
        marker_text = params.get("part-number-marker", "0") or "0"
        if not marker_text.isdigit():
            raise invalid_argument("part-number-marker must be an integer")
        marker = int(marker_text)
        parts = await self.store.list_parts(upload.upload_id, marker, limit + 1)
        truncated = len(parts) > limit
        parts = parts[:limit]
        out = [
            _element("Bucket", bucket),
            _element("Key", key),
            _element("UploadId", upload.upload_id),
            _owner().replace("Owner>", "Initiator>", 2),
            _owner(),
            _element("StorageClass", "STANDARD"),
            _element("PartNumberMarker", marker),
            _element("NextPartNumberMarker", parts[-1].number if parts else marker),
            _element("MaxParts", limit),
            _element("IsTruncated", truncated),
        ]
        for part in parts:
            out.append(
                "<Part>"
                + _element("PartNumber", part.number)
                + _element("LastModified", _iso(part.mtime_ms))
                + _element("ETag", f'"{part.md5}"')
                + _element("Size", part.size)
                + "</Part>"
            )
        return self._xml_response(_xml("ListPartsResult", "".join(out)))

    async def list_uploads(self, bucket: str, params: dict[str, str]) -> web.Response:
        await self.store.require_bucket(bucket)
        prefix = params.get("prefix", "")
        limit = self._max(params, "max-uploads", 1000)
        key_marker = params.get("key-marker", "")
        uploads: list[Upload] = await self.store.list_uploads(bucket, prefix, key_marker, limit + 1)
        truncated = len(uploads) > limit
        uploads = uploads[:limit]
        out = [
            _element("Bucket", bucket),
            _element("KeyMarker", key_marker),
            _element("UploadIdMarker", params.get("upload-id-marker", "")),
            _element("NextKeyMarker", uploads[-1].key if truncated and uploads else ""),
            _element("NextUploadIdMarker", uploads[-1].upload_id if truncated and uploads else ""),
            _element("Prefix", prefix),
            _element("MaxUploads", limit),
            _element("IsTruncated", truncated),
        ]
        for upload in uploads:
            out.append(
                "<Upload>"
                + _element("Key", upload.key)
                + _element("UploadId", upload.upload_id)
                + _owner().replace("Owner>", "Initiator>", 2)
                + _owner()
                + _element("StorageClass", "STANDARD")
                + _element("Initiated", _iso(upload.created_ms))
                + "</Upload>"
            )
        return self._xml_response(_xml("ListMultipartUploadsResult", "".join(out)))

    async def delete_objects(self, request: web.Request, bucket: str, auth: Authenticated) -> web.Response:
        root = _parse_xml(await self._read_small_body(request, auth))
        if root.tag != "Delete":
            raise S3Error("MalformedXML", "The XML you provided was not well-formed", 400)
        quiet = (root.findtext("Quiet") or "").strip().lower() == "true"
        objects = root.findall("Object")
        if not objects or len(objects) > DELETE_OBJECTS_MAX:
            raise S3Error("MalformedXML", f"Delete must name 1 to {DELETE_OBJECTS_MAX} objects", 400)
        keys = []
        for element in objects:
            key = element.findtext("Key")
            if key is None:
                raise S3Error("MalformedXML", "every Object needs a Key", 400)
            keys.append((key, element.findtext("VersionId")))
        await self.store.require_bucket(bucket)
        out = []
        for key, version in keys:
            if version not in (None, "null"):
                out.append(
                    f"<Error>{_element('Key', key)}{_element('VersionId', version)}<Code>NoSuchVersion</Code></Error>"
                )
                continue
            try:
                await self.store.delete(bucket, self._check_key(key))
            except S3Error as error:
                out.append(
                    f"<Error>{_element('Key', key)}{_element('Code', error.code)}{_element('Message', error.message)}</Error>"
                )
                continue
            if not quiet:
                version_element = _element("VersionId", version) if version else ""
                out.append(f"<Deleted>{_element('Key', key)}{version_element}</Deleted>")
        return self._xml_response(_xml("DeleteResult", "".join(out)))


async def start_s3_server(
    backend: SiteBackend, config: S3Config, timeout_s: float, tls: TlsFiles | None, metrics: Any, key_bytes_max: int
) -> S3Server:
    server = S3Server(backend, config, timeout_s, tls, metrics, key_bytes_max)
    await server.start()
    return server
