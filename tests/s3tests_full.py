"""Run the whole s3-tests functional suite against a local pair and count (not part of `make test`).

    .venv/bin/python tests/s3tests_full.py [--junit FILE] [--allow-list FILE] [-- extra pytest arguments]

Starts a pair (as tests/test_s3_conformance.py does), runs
`s3tests/functional/test_s3.py` in place, prints passed / failed / skipped and, with
--allow-list, writes the names of the tests that passed in under `--fast-s` seconds
(the candidates for tests/s3tests_allowlist.txt). The result of the last run is in docs/s3.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_s3_conformance import TEST_FILE, outcomes, run_suite, start_pair, write_conf  # noqa: E402


def durations(junit: Path) -> dict[str, float]:
    return {c.get("name", ""): float(c.get("time", "0")) for c in ElementTree.parse(junit).getroot().iter("testcase")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--junit", default="")
    parser.add_argument("--allow-list", default="")
    parser.add_argument("--fast-s", type=float, default=3.0)
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="s3tests-full-") as temporary:
        root = Path(temporary)
        cluster = start_pair(root / "deploy")
        try:
            conf = root / "s3tests.conf"
            write_conf(conf, cluster.cluster["sites"]["a"]["s3"])
            junit = Path(args.junit) if args.junit else root / "junit.xml"
            run_suite(conf, [TEST_FILE, *args.extra], junit, timeout_s=4 * 3600)
        finally:
            cluster.stop()
        found = outcomes(junit)
        counts: dict[str, int] = {}
        for outcome in found.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        print(f"{len(found)} tests: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        if args.allow_list:
            times = durations(junit)
            fast = sorted(n for n, o in found.items() if o == "passed" and times.get(n, 0) < args.fast_s)
            Path(args.allow_list).write_text("\n".join(fast) + "\n")
            print(f"{len(fast)} fast passing tests written to {args.allow_list}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
