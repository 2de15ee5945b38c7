"""Replicator: active-active synchronous replication with a quorum witness."""

__version__ = "0.1.0"
