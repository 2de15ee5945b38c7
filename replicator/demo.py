"""`make demo`: a witness and two sites on loopback, a site killed, failover, resync, verify.

    python -m replicator.demo [--dir DIR] [--keep]

Every step prints what it does and what it measured. It exits non-zero if a
check fails (a lost write, replicas that differ, a pair that does not come
back to SYNC), and it always stops every process it started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from replicator.client import Client, NotFound
from replicator.local import LocalCluster

BUCKET = "demo"
KEYS = 40


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def wait_for(predicate, timeout_s: float, what: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if predicate():
                return time.monotonic() - started
        except Exception:  # a site that is starting answers nothing yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Writer(threading.Thread):
    """Writes keys round-robin through a two-site client and remembers what was acknowledged."""

    def __init__(self, endpoints: list[str], prefer: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(endpoints[prefer:] + endpoints[:prefer])
        self.prefix = f"w{prefer}-"
        self.acknowledged: dict[str, bytes] = {}
        self.ack_times: list[float] = []
        self.errors = 0
        self.halt = threading.Event()
        self.count = 0

    def run(self) -> None:
        while not self.halt.is_set():
            key = f"{self.prefix}{self.count % KEYS}"
            value = f"{self.prefix}{self.count}".encode()
            try:
                self.client.put(BUCKET, key, value)
                self.acknowledged[key] = value
                self.ack_times.append(time.monotonic())
            except Exception:
                self.errors += 1
                time.sleep(0.02)
            self.count += 1

    def longest_gap(self, after: float) -> float:
        times = [t for t in self.ack_times if t >= after - 1.0]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def site_state(endpoint: str) -> tuple[str, int]:
    status = Client([endpoint]).status()
    return status.state, status.epoch


def nbd_copy(directory: Path, sites: dict[str, dict[str, str]], client: Client, failures: list[str]) -> None:
    """A real NBD client: an image copied into a volume through site a's export, read back through b's."""
    import hashlib
    import os
    import shutil
    import subprocess

    path = "/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", "")
    if shutil.which("nbdcopy", path=path) is None or not sites["a"].get("nbd"):
        say("NBD: nbdcopy is not installed (make tools-nbd), skipping the NBD copy")
        return
    client.create_volume("img", 4 << 20)
    source, back = directory / "image.raw", directory / "image-back.raw"
    source.write_bytes(os.urandom(4 << 20))
    environment = {**os.environ, "PATH": path}
    into = f"nbd://{sites['a']['nbd']}/img"
    out = f"nbd://{sites['b']['nbd']}/img"
    subprocess.run(["nbdcopy", str(source), into], check=True, env=environment, timeout=120)
    subprocess.run(["nbdcopy", out, str(back)], check=True, env=environment, timeout=120)
    same = hashlib.sha256(source.read_bytes()).digest() == hashlib.sha256(back.read_bytes()).digest()
    say(f"NBD: nbdcopy of a 4 MiB image into {into}, read back from {out}: {'identical' if same else 'DIFFERENT'}")
    if not same:
        failures.append("the image copied in through site a's NBD export reads back differently through site b's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicator.demo", description=__doc__)
    parser.add_argument("--dir", help="deployment directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    args = parser.parse_args(argv)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="replicator-demo-"))
    say(f"starting a witness and sites a and b on 127.0.0.1 in {directory}")
    failures: list[str] = []
    with LocalCluster(directory) as cluster:
        cluster.start(sites=True)
        sites = cluster.cluster["sites"]
        endpoints = [sites["a"]["grpc"], sites["b"]["grpc"]]
        both_sync = lambda: all(site_state(e)[0] == "SYNC" for e in endpoints)  # noqa: E731
        took = wait_for(both_sync, 30, "both sites in SYNC")
        say(f"pair is SYNC (epoch {site_state(endpoints[0])[1]}) after {took:.2f} s")

        client = Client(endpoints)
        for index, endpoint in enumerate(endpoints):
            one = Client([endpoint])
            for i in range(10):
                one.put(BUCKET, f"seed-{index}-{i}", f"from site {'ab'[index]} #{i}".encode())
        one_a, one_b = Client([endpoints[0]]), Client([endpoints[1]])
        say(f"wrote 10 objects at each site; site b reads site a's: {one_b.get(BUCKET, 'seed-0-3').decode()!r}")
        client.create_volume("vol1", 1 << 20)
        one_a.write_blocks("vol1", 0, b"A" * 4096)
        one_b.write_blocks("vol1", 1, b"B" * 8192)
        blocks = one_a.read_blocks("vol1", 0, 4)
        say(
            "block volume vol1: 1 block written at a, 2 at b; a reads "
            f"{blocks[:1].decode()}{blocks[4096:4097].decode()}{blocks[8192:8193].decode()} + zeros"
        )

        nbd_copy(directory, sites, client, failures)

        writers = [Writer(endpoints, 0), Writer(endpoints, 1)]
        for writer in writers:
            writer.start()
        time.sleep(1.0)
        victim = "b"
        killed_at = time.monotonic()
        cluster.kill(victim, signal.SIGKILL)
        say(f"SIGKILL site {victim} while two clients write (one prefers a, one prefers b)")
        took = wait_for(lambda: site_state(endpoints[0])[0] == "SOLO", 30, "site a to go on alone")
        state, epoch = site_state(endpoints[0])
        say(f"site a is {state} in epoch {epoch}, {took + (time.monotonic() - killed_at - took):.2f} s after the kill")
        time.sleep(1.0)
        gap = max(writer.longest_gap(killed_at) for writer in writers)
        acked_during = sum(sum(1 for t in w.ack_times if t > killed_at) for w in writers)
        say(f"writes go on at site a: {acked_during} acknowledged since the kill; failover (longest gap) {gap:.2f} s")

        cluster.restart(victim)
        restarted_at = time.monotonic()
        say(f"site {victim} restarted; it resyncs from a while the clients keep writing")
        took = wait_for(both_sync, 60, "the pair back in SYNC")
        say(f"pair is SYNC again (epoch {site_state(endpoints[0])[1]}) {time.monotonic() - restarted_at:.2f} s later")
        time.sleep(0.5)
        for writer in writers:
            writer.halt.set()
        for writer in writers:
            writer.join(10)
        total = sum(len(w.ack_times) for w in writers)

        say("verify: every acknowledged write at both sites, and the two replicas identical")
        lost = 0
        compared = 0
        for writer in writers:
            for key, value in writer.acknowledged.items():
                for site_client in (one_a, one_b):
                    try:
                        got = site_client.get(BUCKET, key)
                    except NotFound:
                        got = None
                    compared += 1
                    if got != value:
                        lost += 1
                        failures.append(f"{key}: expected {value!r}, got {got!r}")
        names_a = sorted(one_a.list(BUCKET))
        names_b = sorted(one_b.list(BUCKET))
        differing = [n for n in set(names_a) ^ set(names_b)]
        for name in names_a:
            if name in names_b and one_a.get(BUCKET, name) != one_b.get(BUCKET, name):
                differing.append(name)
        if one_a.read_blocks("vol1", 0, 4) != one_b.read_blocks("vol1", 0, 4):
            differing.append("vol1 blocks 0-3")
        if differing:
            failures.append(f"replicas differ on {len(differing)} keys: {sorted(differing)[:5]}")
        say(
            f"{total} writes acknowledged during the run, {lost} lost; {len(names_a)} objects at a, "
            f"{len(names_b)} at b, {'replicas identical' if not differing else 'REPLICAS DIFFER'}"
        )
    if not args.keep and not args.dir:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    if failures:
        for failure in failures[:10]:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    say("demo finished: all processes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
