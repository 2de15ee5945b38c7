"""The witness's arbitration as a pure state machine.

Theory of operation. For every pair the witness keeps, durably, `epoch`,
`mode` (SYNC or SOLO) and `holder`. It grants at most one site per epoch:

- mode SYNC and the request's epoch is current: mode SOLO, holder = site,
  epoch + 1, persisted before answering GRANTED. A request from the
  non-preferred site is held for `preferred_grace_ms` first, so that when both
  sites are alive and cut from each other the preferred one wins. The hold
  ends early once the preferred site has not been heard from (no request of
  any kind, Reports included: a live site reports every second) for
  `preferred_silence_ms` (0: never early): a dead preferred site does not
  ask, so waiting out the grace only lengthens the failover. Ending the hold
  is always safe (one grant per epoch either way); the grace is a preference.
- mode SOLO: GRANTED again to the holder (idempotent retry), DENIED to the other.
- a stale epoch: DENIED, with the current state (the site may learn from it).
- MarkSynced from the holder of the current SOLO epoch (its resync is done):
  mode SYNC, epoch + 1, persisted before answering SYNCED.
- a forced Arbitrate (an operator's failover, who vouches that the other site
  is down): SOLO for the asking site in an epoch above both the witness's and
  the asking site's, whatever the state.

A pair the witness has no state for (`fresh`: a replaced witness, a lost or
restored-from-backup state file) may be far behind the sites: granting it
epoch 2 while the sites are at 16 would be ignored (a total outage), and
adopting one site's epoch could grant an epoch the old witness already gave
the other site. So a fresh pair grants nothing until it has learned where the
pair is from the sites' `Report`s: one site SYNC with its peer connected
(both are in that epoch, nobody holds a grant), or both sites' reports (the
highest epoch wins; SOLO for its holder if that site holds the grant). A
report of an epoch above the witness's own shows that the witness lost state:
the pair becomes fresh again. Until then Arbitrate is DENIED with epoch 0
(the sites say the witness is behind); a forced Arbitrate still goes through
(the operator vouches), in an epoch above everything reported.

Every reply waits until every state change made so far is durable: a reply
never reveals a state the witness could forget in a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from replicator.core.messages import (
    Arbitrate,
    MarkSynced,
    Query,
    Report,
    SetPreferred,
    Verdict,
    WitnessAnswer,
    WitnessMode,
    WitnessRequest,
)


class WitnessProtocolError(Exception):
    """An event the witness core cannot take in its current state (a bug in the caller)."""


@dataclass(frozen=True, slots=True)
class PairState:
    epoch: int = 1
    mode: WitnessMode = WitnessMode.SYNC
    holder: str = ""
    preferred: str = ""  # set by a planned switchover; overrides the configured preferred site


@dataclass(frozen=True, slots=True)
class PairConfig:
    sites: tuple[str, str]
    preferred: str
    preferred_grace_ms: int = 1000
    preferred_silence_ms: int = 0  # 0: the hold always lasts preferred_grace_ms


# Events
@dataclass(frozen=True, slots=True)
class WitnessRequested:
    handle: int
    request: WitnessRequest


@dataclass(frozen=True, slots=True)
class WitnessPersisted:
    persist_id: int


@dataclass(frozen=True, slots=True)
class WitnessTick:
    pass


WitnessEvent = WitnessRequested | WitnessPersisted | WitnessTick


# Actions
@dataclass(frozen=True, slots=True)
class WitnessPersist:
    persist_id: int
    pair: str
    state: PairState


@dataclass(frozen=True, slots=True)
class WitnessReply:
    handle: int
    answer: WitnessAnswer


WitnessAction = WitnessPersist | WitnessReply


@dataclass(slots=True)
class _Held:
    site: str
    epoch: int
    since_ms: float
    handles: list[int] = field(default_factory=list)


class WitnessCore:
    def __init__(
        self,
        pairs: dict[str, PairConfig],
        states: dict[str, PairState] | None = None,
        fresh: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        for name, config in pairs.items():
            if config.preferred not in config.sites or config.sites[0] == config.sites[1]:
                raise ValueError(f"pair {name}: preferred site must be one of two distinct sites")
            if config.preferred_grace_ms < 0:
                raise ValueError(f"pair {name}: preferred_grace_ms must be >= 0")
            if config.preferred_silence_ms < 0:
                raise ValueError(f"pair {name}: preferred_silence_ms must be >= 0")
        self.pairs = pairs
        self.states: dict[str, PairState] = {name: PairState() for name in pairs}
        self.states.update(states or {})
        self._next_persist_id = 1
        self._issued_persist_id = 0
        self._durable_persist_id = 0
        self._replies: list[tuple[int, WitnessReply]] = []  # (needs persist id, reply)
        self._held: dict[str, _Held] = {}
        # Pairs without a durable state: they learn it from the sites' reports first (see above).
        self.fresh: set[str] = set(fresh)
        self.reports: dict[str, dict[str, Report]] = {}
        # When each site was last heard from (volatile: after a restart, every site counts as heard at the
        # first event, so the silence shortcut never fires before a whole silence interval has been watched).
        self._heard_ms: dict[tuple[str, str], float] = {}
        self._started_ms: float | None = None

    # ------------------------------------------------------------ the one way in
    def step(self, event: WitnessEvent, now_ms: float) -> list[WitnessAction]:
        actions: list[WitnessAction] = []
        if self._started_ms is None:
            self._started_ms = now_ms
        if isinstance(event, WitnessRequested):
            self._on_request(event, now_ms, actions)
        elif isinstance(event, WitnessPersisted):
            if event.persist_id > self._issued_persist_id:
                raise WitnessProtocolError(f"persisted {event.persist_id} was never issued")
            self._durable_persist_id = max(self._durable_persist_id, event.persist_id)
        elif isinstance(event, WitnessTick):
            self._release_held(now_ms, actions)
        else:  # pragma: no cover - the union is closed
            raise WitnessProtocolError(f"unknown event {event!r}")
        self._flush_replies(actions)
        return actions

    # ------------------------------------------------------------ handlers
    def _on_request(self, event: WitnessRequested, now_ms: float, actions: list[WitnessAction]) -> None:
        request = event.request
        config = self.pairs.get(request.pair)
        if config is None or request.site not in config.sites:
            self._reply(event.handle, Verdict.DENIED, PairState(epoch=0), actions)
            return
        state = self.states[request.pair]
        self._heard_ms[(request.pair, request.site)] = now_ms
        if isinstance(request, Report):
            self._on_report(event.handle, request, config, actions)
            self._release_held(now_ms, actions)
            return
        if request.pair in self.fresh and not (isinstance(request, Arbitrate) and request.force):
            # Maybe far behind the sites: grant nothing, change nothing, and show epoch 0 (not a real one).
            verdict = Verdict.STATE if isinstance(request, Query) else Verdict.DENIED
            self._reply(event.handle, verdict, PairState(epoch=0, preferred=state.preferred), actions)
            return
        if isinstance(request, Arbitrate):
            self._arbitrate(event.handle, request, config, state, now_ms, actions)
        elif isinstance(request, MarkSynced):
            self._mark_synced(event.handle, request, state, actions)
        elif isinstance(request, Query):
            self._reply(event.handle, Verdict.STATE, state, actions)
        elif isinstance(request, SetPreferred):
            if request.preferred not in config.sites:
                self._reply(event.handle, Verdict.DENIED, state, actions)
                return
            if state.preferred != request.preferred:
                state = replace(state, preferred=request.preferred)
                self._set_state(request.pair, state, actions)
            self._reply(event.handle, Verdict.STATE, state, actions)
        else:  # pragma: no cover
            raise WitnessProtocolError(f"unknown request {request!r}")

    def _arbitrate(
        self,
        handle: int,
        request: Arbitrate,
        config: PairConfig,
        state: PairState,
        now_ms: float,
        actions: list[WitnessAction],
    ) -> None:
        if request.force:
            if state.mode is WitnessMode.SOLO and state.holder == request.site and state.epoch > request.epoch:
                self._reply(handle, Verdict.GRANTED, state, actions)
            else:
                # Above everything anyone reported: a grant the site would ignore helps nobody.
                reported = max((r.epoch for r in self.reports.get(request.pair, {}).values()), default=0)
                floor = max(state.epoch, request.epoch, reported)
                self.fresh.discard(request.pair)
                self.reports.pop(request.pair, None)
                self.states[request.pair] = replace(state, epoch=floor)
                self._grant(request.pair, request.site, handle, actions)
            return
        if state.mode is WitnessMode.SOLO:
            verdict = Verdict.GRANTED if state.holder == request.site else Verdict.DENIED
            self._reply(handle, verdict, state, actions)
            return
        if request.epoch != state.epoch:
            self._reply(handle, Verdict.DENIED, state, actions)
            return
        preferred = state.preferred or config.preferred
        if request.site != preferred and config.preferred_grace_ms > 0:
            held = self._held.get(request.pair)
            if held is None or held.epoch != state.epoch:
                held = _Held(request.site, state.epoch, now_ms)
                self._held[request.pair] = held
            held.handles.append(handle)
            self._release_held(now_ms, actions)
            return
        self._grant(request.pair, request.site, handle, actions)

    def _grant(self, pair: str, site: str, handle: int, actions: list[WitnessAction]) -> None:
        state = self.states[pair]
        new_state = replace(state, epoch=state.epoch + 1, mode=WitnessMode.SOLO, holder=site)
        self._set_state(pair, new_state, actions)
        self._reply(handle, Verdict.GRANTED, new_state, actions)
        held = self._held.pop(pair, None)
        if held is not None:
            for other in held.handles:
                verdict = Verdict.GRANTED if held.site == site else Verdict.DENIED
                self._reply(other, verdict, new_state, actions)

    def _release_held(self, now_ms: float, actions: list[WitnessAction]) -> None:
        for pair, held in list(self._held.items()):
            state = self.states[pair]
            if state.mode is not WitnessMode.SYNC or state.epoch != held.epoch:
                del self._held[pair]
                for handle in held.handles:
                    self._reply(handle, Verdict.DENIED, state, actions)
            elif now_ms - held.since_ms >= self.pairs[pair].preferred_grace_ms or self._preferred_silent(
                pair, state, now_ms
            ):
                handles = held.handles
                del self._held[pair]
                first, rest = handles[0], handles[1:]
                self._grant(pair, held.site, first, actions)
                new_state = self.states[pair]
                for handle in rest:
                    self._reply(handle, Verdict.GRANTED, new_state, actions)

    def _preferred_silent(self, pair: str, state: PairState, now_ms: float) -> bool:
        """The preferred site has sent nothing for preferred_silence_ms (see the module docstring)."""
        config = self.pairs[pair]
        if config.preferred_silence_ms <= 0:
            return False
        preferred = state.preferred or config.preferred
        heard = self._heard_ms.get((pair, preferred), self._started_ms if self._started_ms is not None else now_ms)
        return now_ms - heard >= config.preferred_silence_ms

    def _mark_synced(self, handle: int, request: MarkSynced, state: PairState, actions: list[WitnessAction]) -> None:
        if state.mode is WitnessMode.SOLO and state.holder == request.site and state.epoch == request.epoch:
            new_state = replace(state, epoch=state.epoch + 1, mode=WitnessMode.SYNC, holder="")
            self._set_state(request.pair, new_state, actions)
            self._reply(handle, Verdict.SYNCED, new_state, actions)
        elif state.mode is WitnessMode.SYNC and state.epoch == request.epoch + 1:
            # A retry of a MarkSynced that already went through.
            self._reply(handle, Verdict.SYNCED, state, actions)
        else:
            self._reply(handle, Verdict.DENIED, state, actions)

    def _on_report(self, handle: int, report: Report, config: PairConfig, actions: list[WitnessAction]) -> None:
        pair = report.pair
        state = self.states[pair]
        if pair not in self.fresh and report.epoch > state.epoch:
            # A site is ahead of us: our state was lost or restored from an older copy. Learn again.
            self.fresh.add(pair)
            self._held.pop(pair, None)
        if pair in self.fresh:
            reports = self.reports.setdefault(pair, {})
            reports[report.site] = report
            seeded: PairState | None = None
            if report.in_sync:
                seeded = replace(state, epoch=report.epoch, mode=WitnessMode.SYNC, holder="")
            elif all(site in reports for site in config.sites):
                top = max(reports.values(), key=lambda r: (r.epoch, r.holds_grant))
                if top.holds_grant:
                    seeded = replace(state, epoch=top.epoch, mode=WitnessMode.SOLO, holder=top.site)
                else:
                    seeded = replace(state, epoch=top.epoch, mode=WitnessMode.SYNC, holder="")
            if seeded is not None:
                self.fresh.discard(pair)
                self.reports.pop(pair, None)
                self._set_state(pair, seeded, actions)
        shown = PairState(epoch=0, preferred=state.preferred) if pair in self.fresh else self.states[pair]
        self._reply(handle, Verdict.STATE, shown, actions)

    # ------------------------------------------------------------ helpers
    def _set_state(self, pair: str, state: PairState, actions: list[WitnessAction]) -> None:
        self.states[pair] = state
        persist_id = self._next_persist_id
        self._next_persist_id += 1
        self._issued_persist_id = persist_id
        actions.append(WitnessPersist(persist_id, pair, state))

    def _reply(self, handle: int, verdict: Verdict, state: PairState, actions: list[WitnessAction]) -> None:
        answer = WitnessAnswer(verdict=verdict, epoch=state.epoch, mode=state.mode, holder=state.holder)
        self._replies.append((self._issued_persist_id, WitnessReply(handle, answer)))

    def _flush_replies(self, actions: list[WitnessAction]) -> None:
        waiting = []
        for needed, reply in self._replies:
            if needed <= self._durable_persist_id:
                actions.append(reply)
            else:
                waiting.append((needed, reply))
        self._replies = waiting

    def forget_pending(self) -> None:
        """After a crash: in-flight requests are gone with their connections."""
        self._replies.clear()
        self._held.clear()
