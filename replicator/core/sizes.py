"""Byte sizes of the messages the core makes, and cutting lists into parts that fit.

Every message the core builds is cut to `CoreConfig.message_bytes_max` (its content
bytes as the link encodes them) where it is made; `SiteCore.send` checks the bound
again, and the link's encoder checks the frame limit a third time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from replicator.core import messages as msg
from replicator.core.records import (
    DEDUP_ENTRY_OVERHEAD_BYTES,
    KEY_OVERHEAD_BYTES,
    record_wire_bytes,
    versioned_wire_bytes,
)

T = TypeVar("T")


def cut(items: list[T] | tuple[T, ...], size_of: Callable[[T], int], bytes_max: int, count_max: int) -> list[tuple[T, ...]]:
    """Cut items, in order, into parts of at most `count_max` items and `bytes_max` bytes (a part
    of one item may be larger: each item was bounded where it was made)."""
    parts: list[tuple[T, ...]] = []
    current: list[T] = []
    used = 0
    for item in items:
        size = size_of(item)
        if current and (used + size > bytes_max or len(current) >= count_max):
            parts.append(tuple(current))
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        parts.append(tuple(current))
    return parts


def dedup_entry_bytes(entry: tuple[bytes, int]) -> int:
    return DEDUP_ENTRY_OVERHEAD_BYTES + len(entry[0])


def key_bytes(key: bytes) -> int:
    return KEY_OVERHEAD_BYTES + len(key)


def message_bytes(message: msg.PeerMessage) -> int:
    """The content bytes of a message as the link encodes it (what message_bytes_max bounds)."""
    if isinstance(message, msg.ShipRecords):
        return sum(map(record_wire_bytes, message.records))
    if isinstance(message, msg.ResyncData):
        return sum(map(versioned_wire_bytes, message.entries))
    if isinstance(message, msg.ResyncBeginAck):
        return sum(map(key_bytes, message.suspect_keys))
    if isinstance(message, msg.ResyncDedup):
        return sum(map(dedup_entry_bytes, message.entries))
    if isinstance(message, msg.Goodbye):
        return len(message.message.encode())
    return 0


def single_item(message: msg.PeerMessage) -> bool:
    """A message of one item: bounded where that item was made (a write, a stored version)."""
    if isinstance(message, msg.ShipRecords):
        return len(message.records) == 1
    if isinstance(message, msg.ResyncData):
        return len(message.entries) == 1
    return False
