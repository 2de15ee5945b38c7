"""`make demo`: not available until the site daemon lands (issue 6).

It says so plainly and exits non-zero rather than pretending.
"""

import sys


def main() -> int:
    print(
        "make demo: the site daemon (replicatord) is not wired yet, so there is nothing to start.\n"
        "What works today: `make test`, `python -m chaos.sim --seeds 1-300` (the protocol under faults),\n"
        "`python -m chaos.check HISTORY.jsonl`, and the storage, link and API layers with their tests.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
