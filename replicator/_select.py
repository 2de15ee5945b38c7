"""Choose between a Cython module and its pure-Python twin.

REPLICATOR_NO_EXTENSIONS=1 forces the pure twins. Otherwise the native module
is used; if it is missing (not built), the twin is used and a warning says so,
because a silent fall back would hide a broken build in production.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType


def extensions_disabled() -> bool:
    return os.environ.get("REPLICATOR_NO_EXTENSIONS", "") not in ("", "0")


def native_or_pure(name: str) -> ModuleType:
    if not extensions_disabled():
        try:
            return importlib.import_module(f"replicator._native.{name}")
        except ImportError as error:
            warnings.warn(
                f"replicator: native module {name!r} not built ({error}); using the pure-Python twin",
                RuntimeWarning,
                stacklevel=2,
            )
    return importlib.import_module(f"replicator._pure.{name}")
