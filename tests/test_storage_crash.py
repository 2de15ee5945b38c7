"""Crash safety with real processes: SIGKILL a writer at random moments, many times.

After every kill the store is reopened (recovered) and checked: every batch the
writer reported durable is there, whole; the batches present are exactly
0..last_batch (a prefix, none half applied). REPLICATOR_CRASH_CYCLES sets the
number of cycles (20 by default, `make chaos` runs 200); REPLICATOR_CRASH_SEED
replays a run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from replicator.core.records import RecordId
from replicator.storage import Store
from replicator.storage import _format as fmt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import storage_crash_writer as writer  # noqa: E402

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "storage_crash_writer.py")


def _cycles() -> int:
    return int(os.environ.get("REPLICATOR_CRASH_CYCLES", "20"))


def _read_reports(process: subprocess.Popen[str], reported: list[int]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("durable "):
            reported.append(int(line.split()[1]))


def _check(path: str, reported: list[int], previous_last: int, chooser: random.Random) -> int:
    """Open (recover) the store and check it; return the last batch present (-1 if none).

    The batches new since the previous cycle and a sample of older ones are checked in full; the
    shape of the whole store (exactly the batches 0..last, nothing more) by key counts."""
    store = Store.open(path, writer.store_options())
    try:
        last_raw = store.get_meta("last_batch")
        last = -1 if last_raw is None else int(last_raw)
        assert max(reported, default=-1) <= last, f"batch {max(reported)} was reported durable but is lost"
        engine = store._engine
        log_keys = list(engine.keys(fmt.LOG, b"", None))
        assert log_keys == [fmt.record_key(RecordId("crash", 1, number)) for number in range(last + 1)]
        assert sum(1 for _ in engine.keys(fmt.DATA, b"key-", b"key-\xff")) == last + 1
        assert sum(1 for _ in engine.keys(fmt.DIRTY, b"", None)) == last + 1
        assert sum(1 for _ in engine.keys(fmt.DEDUP, b"", None)) == last + 1
        older = range(0, max(0, previous_last + 1))
        sample = chooser.sample(older, min(50, len(older)))
        for number in [*sample, *range(max(0, previous_last + 1), last + 1)]:
            key = b"key-%08d" % number
            assert store.get_record(RecordId("crash", 1, number)) == writer.record_payload(number)
            version = store.get(key)
            assert version is not None and version.ts == number + 1 and version.value == writer.value_of(number)
            assert store.is_dirty(key)
            entry = store.get_dedup(b"request-%08d" % number)
            assert entry is not None and entry.outcome == b"outcome %d" % number and entry.time_ms == number
        for shared in range(writer.SHARED_KEYS):
            numbers = range(shared, last + 1, writer.SHARED_KEYS)
            version = store.get(b"shared-%d" % shared)
            if numbers:
                assert version is not None and version.value == b"%d" % numbers[-1]
            else:
                assert version is None
        return last
    finally:
        store.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_reported_batch_and_applies_none_by_half(tmp_path) -> None:
    seed = int(os.environ.get("REPLICATOR_CRASH_SEED", str(random.randrange(1 << 32))))
    print(f"crash test seed {seed} (REPLICATOR_CRASH_SEED={seed} replays the kill delays)")
    chooser = random.Random(seed)
    path = str(tmp_path / "store")
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment.pop("REPLICATOR_STORAGE_FAULTS", None)
    last = -1
    progressed = 0
    for cycle in range(_cycles()):
        reported: list[int] = []
        process = subprocess.Popen([sys.executable, WRITER, path], stdout=subprocess.PIPE, text=True, env=environment)
        try:
            reader = threading.Thread(target=_read_reports, args=(process, reported), daemon=True)
            reader.start()
            # Some kills land during start-up and recovery, most while batches are committed.
            time.sleep(chooser.choice([chooser.uniform(0.0, 0.3), chooser.uniform(0.3, 1.0)]))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        reader.join(timeout=10)
        assert not reader.is_alive()
        new_last = _check(path, reported, last, chooser)
        assert new_last >= last, f"cycle {cycle}: batches {new_last + 1}..{last} disappeared"
        progressed += new_last > last
        last = new_last
    assert progressed > 0, "the writer never got a batch durable"
