"""A pytest plugin for the s3-tests run (tests/test_s3_conformance.py loads it with -p): test-side speed only.

The suite's `generate_random(size, part_size)` builds each part by adding a 1 KiB
random string to itself one KiB at a time, which is quadratic: three calls took
10 s of the client's CPU in a profile of the allow-listed run, more than any
server work. This plugin swaps in the same generator in linear time: the same
parts (each a random 1 KiB string of ASCII letters repeated to the part's size),
so what the server receives and must return is unchanged. Nothing else of the
suite is touched.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from typing import Any


def generate_random(size: int, part_size: int = 5 * 1024 * 1024) -> Iterator[str]:
    chunk = 1024
    allowed = string.ascii_letters
    for offset in range(0, size, part_size):
        strpart = "".join(random.choice(allowed) for _ in range(chunk))
        this_part_size = min(size - offset, part_size)
        part = strpart * (this_part_size // chunk)
        yield part + strpart[: this_part_size - len(part)]


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        if hasattr(module, "generate_random"):
            module.generate_random = generate_random
