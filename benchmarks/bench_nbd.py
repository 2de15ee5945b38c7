"""NBD benchmark: fio against the pair through NBD, the same daemon alone, and durable `nbdkit file`.

    python -m benchmarks.bench_nbd [--runtime-s 10] [--quick] [--out DIR]

fio (its nbd ioengine) is the load generator for every system, with the
same jobs: 4 KiB random writes at iodepth 1 and 32, 4 KiB random reads at
iodepth 32, 1 MiB sequential writes, over a 64 MiB region (prefilled
before the reads). The systems, all on this machine, files on the same
filesystem:

  replicator-pair    site a's export, the pair in SYNC: a write is answered once durable at both sites
  replicator-single  the same daemon with site b stopped (a SOLO): durable at one site
  nbdkit-file-fua    `nbdkit --filter=fua file fuamode=force`: every write made durable (FUA) on one disk

Ratios are of one run (the pair against nbdkit); the issue's goals are
pair/nbdkit >= 0.5 for random writes at iodepth 32, for 1 MiB sequential
writes and for random reads. Results: DIR/nbd.json, DIR/nbd.md, DIR/nbd.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from replicator.client import Client
from replicator.local import LocalCluster, free_ports

MIB = 1 << 20
REGION_BYTES = 64 * MIB
VOLUME_BYTES = 128 * MIB
SYSTEM_PATH = "/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", "")
JOBS: list[tuple[str, list[str]]] = [
    ("randwrite-4k-qd1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
    ("randwrite-4k-qd32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("randread-4k-qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ("seqwrite-1m-qd4", ["--rw=write", "--bs=1m", "--iodepth=4"]),
]
PEER_TIMEOUT_MS = 3000
GOALS = {"randwrite-4k-qd32": 0.5, "seqwrite-1m-qd4": 0.5, "randread-4k-qd32": 0.5}


def _environment() -> dict[str, str]:
    return {**os.environ, "PATH": SYSTEM_PATH}


def _fio_report(output: str) -> dict[str, Any]:
    start = 0 if output.startswith("{") else output.index("\n{") + 1
    return json.loads(output[start:])  # type: ignore[no-any-return]


def fio(uri: str, arguments: list[str], runtime_s: float) -> dict[str, float]:
    command = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={REGION_BYTES}",
        "--time_based", f"--runtime={runtime_s}", "--ramp_time=1", "--randrepeat=0",
        "--output-format=json", *arguments,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=runtime_s + 120)
    if result.returncode != 0:
        raise RuntimeError(f"fio failed: {result.stderr.strip()[-2000:]}")
    (job,) = _fio_report(result.stdout)["jobs"]
    if job["error"]:
        raise RuntimeError(f"fio reported error {job['error']}")
    side = job["write"] if job["write"]["io_bytes"] else job["read"]
    percentiles = side["clat_ns"].get("percentile", {})
    return {
        "iops": round(side["iops"], 1),
        "mb_per_s": round(side["bw_bytes"] / 1e6, 2),
        "p50_ms": round(percentiles.get("50.000000", 0) / 1e6, 3),
        "p99_ms": round(percentiles.get("99.000000", 0) / 1e6, 3),
    }


def prefill(uri: str) -> None:
    command = ["fio", "--name=prefill", "--ioengine=nbd", f"--uri={uri}", f"--size={REGION_BYTES}",
               "--rw=write", "--bs=1m", "--iodepth=4", "--output-format=json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"fio prefill failed: {result.stderr.strip()[-2000:]}")


def run_jobs(uri: str, runtime_s: float, progress: Any) -> dict[str, dict[str, float]]:
    prefill(uri)
    results = {}
    for name, arguments in JOBS:
        results[name] = fio(uri, arguments, runtime_s)
        progress(f"    {name}: {results[name]}")
    return results


def bench_replicator(directory: Path, runtime_s: float, progress: Any) -> dict[str, dict[str, dict[str, float]]]:
    results = {}
    with LocalCluster(directory / "deploy", health_timeout_s=60) as cluster:
        cluster.configure()
        for name in ("a", "b"):
            # The launcher's demo timeouts (peer_timeout_ms 500) are for showing a failover; on a
            # loaded 2-core machine, 1 MiB writes stall the link past them and the pair suspends
            # mid-run (which drops the NBD connections, as it must). This measures throughput.
            config = cluster.config_path(name)
            text = config.read_text()
            assert "peer_timeout_ms = 500\n" in text, "the launcher's demo settings changed"
            config.write_text(text.replace("peer_timeout_ms = 500\n", f"peer_timeout_ms = {PEER_TIMEOUT_MS}\n"))
        cluster.processes.clear()  # configure() again at start, from the edited files
        cluster.start(sites=True)
        sites = cluster.cluster["sites"]
        client = Client([sites["a"]["grpc"], sites["b"]["grpc"]])
        deadline = time.monotonic() + 60
        while Client([sites["b"]["grpc"]]).status().state != "SYNC" or client.status().state != "SYNC":
            if time.monotonic() > deadline:
                raise RuntimeError("the pair did not reach SYNC")
            time.sleep(0.2)
        client.create_volume("bench", VOLUME_BYTES)
        uri = f"nbd://{sites['a']['nbd']}/bench"
        try:
            progress("replicator-pair (site a's export, pair in SYNC)")
            results["replicator-pair"] = run_jobs(uri, runtime_s, progress)
            cluster.stop_process("b")
            deadline = time.monotonic() + 60
            while Client([sites["a"]["grpc"]]).status().state != "SOLO":
                if time.monotonic() > deadline:
                    raise RuntimeError("site a did not go on alone")
                time.sleep(0.2)
            progress("replicator-single (site b stopped, a SOLO)")
            results["replicator-single"] = run_jobs(uri, runtime_s, progress)
        except RuntimeError:
            for name in ("a", "b"):  # the sites' NBD and role events say why a client failed
                lines = (cluster.directory / f"{name}.log").read_text(errors="replace").splitlines()
                for line in [x for x in lines if '"nbd' in x or '"role"' in x][-15:]:
                    progress(f"  {name}.log: {line}")
            raise
    return results


def bench_nbdkit(directory: Path, runtime_s: float, progress: Any) -> dict[str, dict[str, float]]:
    disk = directory / "nbdkit.img"
    with disk.open("wb") as handle:
        handle.truncate(VOLUME_BYTES)
    (port,) = free_ports(1)
    command = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--filter=fua", "file", f"file={disk}", "fuamode=force"]
    process = subprocess.Popen(command, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True, env=_environment()).returncode:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not start: {process.stderr.read() if process.stderr else ''}")
            time.sleep(0.1)
        progress("nbdkit-file-fua (every write FUA, same filesystem)")
        return run_jobs(f"nbd://127.0.0.1:{port}", runtime_s, progress)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ratios(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    baseline = results["nbdkit-file-fua"]
    out: dict[str, dict[str, float]] = {}
    for system in ("replicator-pair", "replicator-single"):
        out[system] = {
            job: round(results[system][job]["iops"] / baseline[job]["iops"], 3) if baseline[job]["iops"] else 0.0
            for job, _ in JOBS
        }
    return out


def report(document: dict[str, Any]) -> str:
    results, ratio = document["results"], document["ratios"]
    lines = [
        "# NBD benchmark",
        "",
        f"{document['date']}, fio {document['fio']}, {document['runtime_s']} s per job, "
        f"{REGION_BYTES // MIB} MiB region, {os.cpu_count()} CPUs, everything on this machine, "
        f"load average {document.get('load_average', '?')} at the start.",
        "",
        "| system | job | IOPS | MB/s | p50 ms | p99 ms | IOPS / nbdkit |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, jobs in results.items():
        for job, row in jobs.items():
            relative = ratio.get(system, {}).get(job)
            lines.append(
                f"| {system} | {job} | {row['iops']} | {row['mb_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
                f"{'' if relative is None else relative} |"
            )
    lines += ["", "Goals (replicator-pair / nbdkit-file-fua, IOPS):", ""]
    for job, goal in GOALS.items():
        value = ratio["replicator-pair"][job]
        lines.append(f"- {job}: {value} (goal >= {goal}: {'met' if value >= goal else 'NOT met'})")
    return "\n".join(lines) + "\n"


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(document["results"])
    jobs = [job for job, _ in JOBS]
    figure, axes = plt.subplots(1, len(jobs), figsize=(4 * len(jobs), 3.5))
    for axis, job in zip(axes, jobs, strict=True):
        values = [document["results"][system][job]["iops"] for system in systems]
        axis.bar(range(len(systems)), values, color=["#1f77b4", "#9ecae1", "#ff7f0e"][: len(systems)])
        axis.set_xticks(range(len(systems)), [s.replace("-", "\n", 1) for s in systems], fontsize=7)
        axis.set_title(job, fontsize=9)
        axis.set_ylabel("IOPS")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_nbd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-s", type=float, default=10.0, help="seconds per fio job (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 s per job")
    parser.add_argument("--out", default="", help="results directory (default benchmarks/results/<date>/)")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("fio", "nbdkit", "nbdinfo") if shutil.which(tool, path=SYSTEM_PATH) is None]
    if missing:
        print(f"bench_nbd: missing {', '.join(missing)}: run `make tools-nbd`", file=sys.stderr)
        return 2
    runtime_s = 3.0 if args.quick else args.runtime_s
    today = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / today
    out.mkdir(parents=True, exist_ok=True)

    def progress(text: str) -> None:
        print(text, flush=True)

    load_average = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-nbd-") as scratch:
        results = bench_replicator(Path(scratch), runtime_s, progress)
        results["nbdkit-file-fua"] = bench_nbdkit(Path(scratch), runtime_s, progress)
    version = subprocess.run(["fio", "--version"], capture_output=True, text=True, env=_environment()).stdout.strip()
    document = {
        "date": today,
        "fio": version,
        "runtime_s": runtime_s,
        "load_average": load_average,
        "results": results,
        "ratios": ratios(results),
    }
    (out / "nbd.json").write_text(json.dumps(document, indent=2) + "\n")
    text = report(document)
    (out / "nbd.md").write_text(text)
    try:
        plot(document, out / "nbd.png")
    except ImportError:
        progress("matplotlib missing: no plot")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
