"""Durable storage: RocksDB behind the interface the core asks for (DESIGN.md sections 3-5).

- `Store.open(path, options)`: the durable store on RocksDB; `MemoryStore()` its double.
- `store.batch()` -> `Batch`; `store.write(batch)` (atomic, unsynced, visible at once) -> sequence number;
  `store.sync()` makes every write durable; `store.durable_sequence`.
- `GroupCommitter(store)`: `await commit(batch)` returns once the batch is durable, one fsync shared by
  every concurrent commit, done off the event loop.
- Reads check CRC32C (`CorruptValue`); operating errors fail-stop the store (`StorageFailed`);
  `FaultInjector` injects fsync failures and a full disk.

See docs/storage.md.
"""

from replicator.storage.base import BaseStore, DedupEntry, Recovered, StoreOptions
from replicator.storage.batch import Batch
from replicator.storage.errors import CorruptValue, StorageError, StorageFailed, WriteStalled
from replicator.storage.faults import FaultInjector
from replicator.storage.group_commit import GroupCommitter
from replicator.storage.memory import MemoryStore
from replicator.storage.rocks import Store

__all__ = [
    "BaseStore",
    "Batch",
    "CorruptValue",
    "DedupEntry",
    "FaultInjector",
    "GroupCommitter",
    "MemoryStore",
    "Recovered",
    "StorageError",
    "StorageFailed",
    "Store",
    "StoreOptions",
    "WriteStalled",
]
