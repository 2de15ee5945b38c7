"""Two small enums the conductor and its phases share: the durable standing of a site in its
epoch, and who may decide a commit (checked by `SiteCore.decide_commit`)."""

from __future__ import annotations

import enum

from replicator.core.messages import Role


class Standing(enum.Enum):
    """What this site durably is in its epoch, beside its role (meta `grant` and `target`)."""

    PEER = "neither holds the grant nor is resynchronised"
    GRANT_HOLDER = "holds the witness's grant for the epoch (SOLO, or its resync source)"
    RESYNC_TARGET = "is being resynchronised in the epoch"


class CommitKind(enum.Enum):
    """Who may decide that a record commits, and in which roles."""

    ACKED = frozenset({Role.SYNC, Role.RESYNC_SOURCE})  # durable here and acked by the peer
    ALONE = frozenset({Role.SOLO})  # a write taken alone (committed when durable)
    WHOLE_LOG = frozenset({Role.RECONCILE, Role.SOLO})  # reconcile, takeover, a lost resync target
