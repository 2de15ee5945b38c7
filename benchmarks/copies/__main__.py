"""Copies of a value and CRC32C passes over it, per put per site (issue 14, point 5).

    python -m benchmarks.copies [--value-bytes 1048576] [--json]

One put of one operation with a large value goes through the code the daemons run for it, in
one process, with the real store (RocksDB and its journal, in a temporary directory) at each
site and the real codec and link framing between them:

  origin a: the log put (Persist.log_put: `framing.record_to_log`, `Batch.put_record`, store write and
            sync), the RECORDS frame to the peer (`daemon.wire.Encoder`, `stamp_link`), the
            commit (Persist.apply of the value) and the log delete;
  peer b:   the frame read into the link's receive buffer (`FrameDecoder.get_buffer` /
            `buffer_updated`), decoded (`daemon.wire.Decoder`), its log put, then the apply
            and the log delete at the commit watermark.

Counted (each in a child process, so that the counters see nothing else):
- CRC passes: calls of crc32c over at least the value's size, counted by wrapping the crc32c
  that every replicator module imported, with the pure framing twin (whose CRCs are calls;
  the Cython twin makes the same passes inside C);
- copies: bytes moved by memcpy/memmove in pieces of at least 64 KiB, over the value's size,
  counted by an LD_PRELOAD shim (copycount.c, built here with the system cc) with the Cython
  codec. The kernel's copies (socket send and receive, the journal's writev) and realloc's
  internal moves are not seen; the socket read into the receive buffer is not counted (it is
  the kernel's copy in the daemon).

The gRPC request's own copies before the core sees the value are the same before and after
and are not counted.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PIECE_BYTES_MIN = 64 * 1024
RECV_CHUNK_BYTES = 256 * 1024


def _build_shim(directory: str) -> str:
    library = os.path.join(directory, "copycount.so")
    subprocess.run(
        ["cc", "-O2", "-shared", "-fPIC", "-o", library, str(HERE / "copycount.c"), "-ldl"], check=True
    )
    return library


class _Counters:
    """Where the harness is between counted phases: per site, CRC passes and copied bytes."""

    def __init__(self, mode: str, value_bytes: int) -> None:
        self.mode = mode
        self.value_bytes = value_bytes
        self.site = "a"
        self.phase = "start"
        self.detail: dict[str, list[float]] = {}
        self._crc_at_phase = 0
        self.crc: dict[str, int] = {"a": 0, "b": 0}
        self.copied: dict[str, int] = {"a": 0, "b": 0}
        self.shim: Any = None
        if mode == "copies":
            self.shim = ctypes.CDLL(os.environ["COPYCOUNT_LIBRARY"])
            self.shim.copycount_bytes.restype = ctypes.c_ulonglong
            self.shim.copycount_start(ctypes.c_size_t(PIECE_BYTES_MIN))
            self.shim.copycount_pause()

    def at(self, site: str, phase: str) -> None:
        """Charge what follows to `site`, in `phase`."""
        self._take()
        self.site = site
        self.phase = phase

    def _take(self) -> None:
        copied = 0
        if self.shim is not None:
            self.shim.copycount_pause()
            copied = self.shim.copycount_bytes()
            self.copied[self.site] += copied
            self.shim.copycount_start(ctypes.c_size_t(PIECE_BYTES_MIN))
        crc = sum(self.crc.values())
        entry = self.detail.setdefault(f"{self.site}: {self.phase}", [0, 0])
        entry[0] += crc - self._crc_at_phase
        entry[1] += round(copied / self.value_bytes, 2)
        self._crc_at_phase = crc

    def pause(self) -> None:
        if self.shim is not None:
            self.shim.copycount_pause()

    def resume(self) -> None:
        if self.shim is not None:
            self.shim.copycount_resume()

    def done(self) -> dict[str, Any]:
        self._take()
        if self.shim is not None:
            self.shim.copycount_pause()
        return {
            "crc_passes": self.crc,
            "value_copies": {site: round(copied / self.value_bytes, 2) for site, copied in self.copied.items()},
            f"{self.mode}_detail": {phase: values[0 if self.mode == "crc" else 1] for phase, values in self.detail.items()},
        }


def _install_crc_counter(counters: _Counters) -> None:
    from replicator import checksum

    real = checksum.crc32c

    def counting(data: Any, crc: int = 0) -> int:
        if memoryview(data).nbytes >= counters.value_bytes:
            counters.crc[counters.site] += 1
        return real(data, crc)

    for name, module in list(sys.modules.items()):
        if name.startswith("replicator") and getattr(module, "crc32c", None) is real:
            module.crc32c = counting  # type: ignore[attr-defined]


def _persist(store: Any, log_put: tuple[Any, ...] = (), apply: tuple[Any, ...] = (), log_delete: tuple[Any, ...] = ()) -> None:
    """What the daemon's Persist executor does with these fields (daemon/site.py `_persist`)."""
    from replicator.framing import record_to_log

    batch = store.batch()
    for record_id in log_delete:
        batch.delete_record(record_id)
    for record in log_put:
        batch.put_record(record.id, record_to_log(record))
    for version in apply:
        batch.apply(version.key, version.ts, version.value)
    store.write(batch)
    store.sync()


def child(mode: str, value_bytes: int) -> dict[str, Any]:
    if mode == "crc":
        # The pure framing twin (its CRCs are Python calls), the native checksum (fast).
        import importlib

        from replicator import _select

        native_or_pure = _select.native_or_pure

        def framing_pure(name: str) -> Any:
            return importlib.import_module("replicator._pure.framing") if name == "framing" else native_or_pure(name)

        _select.native_or_pure = framing_pure
    from replicator import framing
    from replicator.core import messages as msg
    from replicator.core.records import Operation, Record, RecordId, Versioned
    from replicator.daemon.wire import Decoder, Encoder
    from replicator.storage import Store

    assert framing.IMPLEMENTATION == ("python" if mode == "crc" else "cython"), framing.IMPLEMENTATION
    counters = _Counters(mode, value_bytes)
    if mode == "crc":
        _install_crc_counter(counters)
    value = os.urandom(value_bytes)
    record = Record(RecordId("a", 1, 1), 3, 1_000_000, b"request-1", (Operation(b"key-1", value),))
    with tempfile.TemporaryDirectory() as directory:
        store_a = Store.open(os.path.join(directory, "a"))
        store_b = Store.open(os.path.join(directory, "b"))
        receiver = framing.FrameDecoder()
        decoder = Decoder("pair", "a")
        counters.resume()
        # --- origin a: log put, frame to b
        counters.at("a", "log put")
        _persist(store_a, log_put=(record,))
        counters.at("a", "RECORDS frame")
        (frame,) = Encoder("a").encode(msg.ShipRecords(3, (record,)))
        framing.stamp_link(frame, 0, 1, 0)
        # --- peer b: the socket read (the kernel's copy into the receive buffer: not counted)
        counters.at("b", "receive + decode")
        frames: list[Any] = []
        with memoryview(frame) as source:
            position = 0
            while position < len(source):
                target = receiver.get_buffer(RECV_CHUNK_BYTES)
                count = min(len(target), len(source) - position, RECV_CHUNK_BYTES)
                counters.pause()
                target[:count] = source[position : position + count]
                counters.resume()
                position += count
                frames.extend(receiver.buffer_updated(count))
        # --- peer b: decode, log put
        (received,) = frames
        message = decoder.decode(received)
        assert isinstance(message, msg.ShipRecords)
        counters.at("b", "log put")
        _persist(store_b, log_put=message.records)
        # --- a commits (apply, dedup), then deletes its log record at b's CommitConfirm
        counters.at("a", "apply")
        _persist(store_a, apply=(Versioned(b"key-1", record.ts, value),))
        counters.at("a", "log delete")
        _persist(store_a, log_delete=(record.id,))
        # --- b applies at a's commit watermark and deletes its log record
        counters.at("b", "apply + log delete")
        (kept,) = message.records
        _persist(store_b, apply=tuple(Versioned(op.key, kept.ts, op.value) for op in kept.operations), log_delete=(kept.id,))
        result = counters.done()
        assert store_b.get(b"key-1") == Versioned(b"key-1", record.ts, value)
        store_a.close()
        store_b.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--value-bytes", type=int, default=1 << 20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=("crc", "copies"), help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.value_bytes < PIECE_BYTES_MIN:
        parser.error(f"--value-bytes must be at least {PIECE_BYTES_MIN}")
    if arguments.child:
        print(json.dumps(child(arguments.child, arguments.value_bytes)))
        return 0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        library = _build_shim(directory)
        for mode in ("crc", "copies"):
            env = dict(os.environ, COPYCOUNT_LIBRARY=library)
            env.pop("REPLICATOR_NO_EXTENSIONS", None)
            if mode == "copies":
                env["LD_PRELOAD"] = library
                env["MALLOC_MMAP_THRESHOLD_"] = str(PIECE_BYTES_MIN)  # large blocks grow by mremap, not a copy
            output = subprocess.run(
                [sys.executable, "-m", "benchmarks.copies", "--child", mode, "--value-bytes", str(arguments.value_bytes)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            child_results = json.loads(output.strip().splitlines()[-1])
            key = "crc_passes" if mode == "crc" else "value_copies"
            results[key] = child_results[key]
            results[f"{mode}_detail"] = child_results[f"{mode}_detail"]
    if arguments.json:
        print(json.dumps(results))
    else:
        print(f"one put of a {arguments.value_bytes}-byte value, per site:")
        print("| site | CRC32C passes over the value | copies of the value |")
        print("|---|---|---|")
        for site in ("a", "b"):
            print(f"| {site} | {results['crc_passes'][site]} | {results['value_copies'][site]} |")
        print("by step:")
        print("| step | CRC32C passes | copies |")
        print("|---|---|---|")
        for phase, crc in results["crc_detail"].items():
            if phase.startswith(("a:", "b:")):
                print(f"| {phase} | {crc} | {results['copies_detail'].get(phase, 0)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
