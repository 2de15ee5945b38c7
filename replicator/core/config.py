"""Protocol parameters of a site core, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, fields

from replicator.core.plants import Plant

# The deliberate bugs by their configuration names (replicator/core/plants.py lists each beside
# the rule it breaks). SIMULATOR_PLANTS: those whose window only a simulator fault opens.
PLANTS = {plant.name_in_config: plant.description for plant in Plant if not plant.simulator_only}
SIMULATOR_PLANTS = {plant.name_in_config: plant.description for plant in Plant if plant.simulator_only}


# What a link frame holds beyond one core message's content (header, payload fields, the
# reconcile marker): the core's byte bound is the frame limit less this.
MESSAGE_HEADROOM_BYTES = 64 * 1024
FRAME_SIZE_BYTES_DEFAULT = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """The core's parameters. The daemon builds them from the site's TOML (`replicator.config.derive`),
    where each has the same name under [site] (witness_retry_interval_ms is witness.retry_interval_ms);
    the defaults here are the TOML's, but for clock_drift_max (the TOML's lease_drift_ppm / 1e6,
    default 0.001), whose 0.01 here is the tests' harsher value."""

    site: str
    peer: str
    pair: str
    preferred: str
    lease_ms: int = 2000
    clock_drift_max: float = 0.01
    peer_timeout_ms: int = 1000
    heartbeat_interval_ms: int = 100
    witness_retry_interval_ms: int = 250
    read_wait_ms_max: int = 1000
    parked_reads_max: int = 10_000  # reads waiting for a lease or an unresolved key; more are refused
    inflight_records_max: int = 10_000
    resync_batch_keys_max: int = 128
    resync_batches_inflight_max: int = 4
    reconcile_records_per_message_max: int = 256
    dedup_entries_per_message_max: int = 1024
    # Every message the core makes is cut to this many bytes (as the link encodes them) where it
    # is made; the link's encoder checks it again against the frame limit.
    message_bytes_max: int = FRAME_SIZE_BYTES_DEFAULT - MESSAGE_HEADROOM_BYTES
    dedup_age_ms: int = 600_000
    # The dedup table holds at most this many request ids, as the store does (StoreOptions).
    dedup_entries_max: int = 1_000_000
    static_priority: bool = False
    # With static_priority: how long the witness must be out of reach before the preferred site goes on alone.
    static_priority_wait_ms: int = 3000
    # The shell steps an event at least this often (its timer's period): then a longer gap between
    # two events is this site's own stall (a long loop turn, a paused process), and it does not count
    # as the peer's silence (site.py, `step`). None: the shell lets time pass as it likes (the tests
    # that drive a core by hand jump over idle seconds), and every gap counts.
    tick_ms: int | None = None
    plants: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("site", "peer", "pair", "preferred"):
            if not getattr(self, name):
                raise ValueError(f"{name}: must not be empty")
        if self.site == self.peer:
            raise ValueError("peer: must differ from site")
        if self.preferred not in (self.site, self.peer):
            raise ValueError(f"preferred: must be {self.site!r} or {self.peer!r}, got {self.preferred!r}")
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name.endswith(("_ms", "_max")) and not isinstance(value, bool) and isinstance(value, int):
                if value <= 0:
                    raise ValueError(f"{spec.name}: must be a positive integer, got {value}")
        if not 0 <= self.clock_drift_max < 0.25:
            raise ValueError(f"clock_drift_max: must be in [0, 0.25), got {self.clock_drift_max}")
        if self.tick_ms is not None and (isinstance(self.tick_ms, bool) or not isinstance(self.tick_ms, int) or self.tick_ms <= 0):
            raise ValueError(f"tick_ms: must be a positive integer or None, got {self.tick_ms!r}")
        if self.heartbeat_interval_ms * 2 > self.peer_timeout_ms:
            raise ValueError("heartbeat_interval_ms: must be at most half of peer_timeout_ms")
        if self.peer_timeout_ms > self.lease_ms * 4:
            raise ValueError("peer_timeout_ms: must not exceed 4 x lease_ms")
        unknown = set(self.plants) - set(PLANTS) - set(SIMULATOR_PLANTS)
        if unknown:
            raise ValueError(f"plants: unknown {sorted(unknown)}")

    @property
    def origin_bit(self) -> int:
        """Timestamp tie-breaker: the sites are ordered by name."""
        return 0 if self.site < self.peer else 1

    @property
    def lease_read_ms(self) -> float:
        """How long after sending a heartbeat its answer lets us serve reads.

        Both clocks may drift by clock_drift_max, so we stop well before the
        peer's promise (lease_ms after it answered) can run out.
        """
        return self.lease_ms * (1.0 - 2.0 * self.clock_drift_max)
