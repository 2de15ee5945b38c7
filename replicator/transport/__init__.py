"""The site-to-site transport: the link (asyncio, uvloop when available) and a fault proxy.

See replicator/transport/link.py for the theory of operation and docs/wire.md
for the frames it carries.
"""

from __future__ import annotations

from replicator.transport.config import LinkLimits, TlsConfig
from replicator.transport.link import (
    GOODBYE_CLOSING,
    GOODBYE_PROTOCOL_ERROR,
    GOODBYE_WRONG_PEER,
    Link,
    LinkClosed,
    LinkDown,
    LinkEvent,
    LinkStats,
    LinkUp,
    LocalHello,
)


def new_event_loop():  # type: ignore[no-untyped-def]
    """An event loop for the link: uvloop when installed, asyncio's own otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the link works without it
        import asyncio

        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


__all__ = [
    "GOODBYE_CLOSING",
    "GOODBYE_PROTOCOL_ERROR",
    "GOODBYE_WRONG_PEER",
    "Link",
    "LinkClosed",
    "LinkDown",
    "LinkEvent",
    "LinkLimits",
    "LinkStats",
    "LinkUp",
    "LocalHello",
    "TlsConfig",
    "new_event_loop",
]
