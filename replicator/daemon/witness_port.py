"""The site's witness port: the driver's AskWitness over the gRPC witness client, and the
report loop that tells the witness where the site is (and checks the witness is not behind).

A mixin of `SiteDaemon` (replicator/daemon/site.py), which assembles the parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

from replicator.api.witness import PairMode, PairState
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.messages import Role
from replicator.daemon.logs import log

WITNESS_REPORT_S = 1.0  # how often a site reports where it is to the witness


class WitnessPortMixin:
    """The WitnessPort of the driver and the report loop (its attributes are the daemon's)."""

    def _init_witness_port(self) -> None:
        self.witness_reachable = False
        self.witness_report_now = asyncio.Event()
        self.witness_id = ""  # our witness's identity (from its answers)
        self.peer_witness_id = ""  # the peer's, from its link HELLO
        # Every identity our witness has had: a peer naming one of them is not misconfigured, only
        # behind us in learning a replaced witness's identity (or its HELLO is older than that).
        self.witness_ids_seen: set[str] = set()
        self.witness_mismatch_logged = -1e9
        self.witness_behind_logged = -1e9
        self.witness_preferred = ""  # as the witness holds it, from its answers to our reports

    def ask(self, request: msg.WitnessRequest) -> None:
        if self._witness_mismatch(request):
            # As if the witness could not be reached: no grant from a witness the peer does not use.
            asyncio.get_running_loop().call_soon(self.step, ev.WitnessFailed(request))
            return
        asyncio.get_running_loop().create_task(self._ask_witness(request))

    async def _ask_witness(self, request: msg.WitnessRequest) -> None:
        try:
            if isinstance(request, msg.Arbitrate):
                outcome = await self.witness.arbitrate(request.pair, request.site, request.epoch, request.force)
                verdict = msg.Verdict.GRANTED if outcome.granted else msg.Verdict.DENIED
            elif isinstance(request, msg.Query):
                states = [s for s in await self.witness.status(request.pair) if s.pair == request.pair]
                # A pair the witness never changed is SYNC in its first epoch.
                outcome = states[0] if states else PairState(request.pair, 1, PairMode.SYNC, "")
                verdict = msg.Verdict.STATE
            else:
                outcome = await self.witness.mark_synced(request.pair, request.site, request.epoch)
                verdict = msg.Verdict.SYNCED if outcome.granted else msg.Verdict.DENIED
        except Exception as error:  # the witness unreachable, a deadline, a refused call
            self.witness_reachable = False
            log("witness_failed", level="warning", request=type(request).__name__, error=str(error)[:200])
            self.step(ev.WitnessFailed(request))
            return
        self.witness_reachable = True
        mode = msg.WitnessMode.SOLO if outcome.mode.name == "SOLO" else msg.WitnessMode.SYNC
        answer = msg.WitnessAnswer(verdict, outcome.epoch, mode, outcome.holder)
        log("witness_answer", request=type(request).__name__, verdict=verdict.name, epoch=outcome.epoch)
        self.step(ev.WitnessAnswered(request, answer))

    async def _probe_witness(self) -> None:
        """Report where this site is to the witness every second, and at once when the pair is SYNC
        again (a witness without state for the pair learns its epoch from these before it grants
        anything); keep `witness_reachable` true to life; warn loudly when the witness is behind."""
        while True:
            view = self.core.snapshot()
            try:
                states, identity = await self.witness.report(
                    self.config.site.pair_id,
                    self.name,
                    view.epoch,
                    holds_grant=view.holds_grant and view.role in (Role.SOLO, Role.RESYNC_SOURCE),
                    in_sync=view.role is Role.SYNC and view.peer_connected,
                )
                self.witness_reachable = True
                self._check_witness_epoch(states)
                ours = [state for state in states if state.pair == self.config.site.pair_id]
                self.witness_preferred = ours[0].preferred if ours else ""
                if identity and identity != self.witness_id:
                    log("witness_identity", witness=self.config.witness.address, witness_id=identity)
                    self.witness_id = identity
                    self.witness_ids_seen.add(identity)
                    if self.link is not None and self.link.up:
                        self.link.reset("our witness changed: tell the peer in a new HELLO")
            except Exception:
                self.witness_reachable = False
            self.witness_report_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.witness_report_now.wait(), WITNESS_REPORT_S)

    def _witness_mismatch(self, request: msg.WitnessRequest) -> bool:
        """The two sites use different witnesses (a misconfiguration): going on alone could split the
        pair (each granted by its own witness), so no Arbitrate goes out, except an operator's forced one."""
        if not self._witnesses_differ():
            return False
        if not isinstance(request, msg.Arbitrate) or request.force:
            return False
        self._log_witness_mismatch()
        return True

    def _witnesses_differ(self) -> bool:
        return bool(self.witness_id and self.peer_witness_id) and self.peer_witness_id not in self.witness_ids_seen

    def _log_witness_mismatch(self) -> None:
        if time.monotonic() - self.witness_mismatch_logged >= 10.0:
            self.witness_mismatch_logged = time.monotonic()
            log(
                "witness_mismatch",
                level="critical",
                site=self.name,
                witness=self.config.witness.address,
                witness_id=self.witness_id,
                peer_witness_id=self.peer_witness_id,
                action="not asking to go on alone: the two sites must use the same witness (witness.address)",
            )

    def _check_witness_epoch(self, states: Sequence[PairState]) -> None:
        epoch = next((state.epoch for state in states if state.pair == self.config.site.pair_id), 0)
        behind = max(self.core.epoch - epoch, 0)
        if epoch == 0 and self.core.epoch == 1:
            behind = 0  # a new pair: the witness learns epoch 1 once the sites have met
        self.m_witness_behind.set(behind)
        if behind and time.monotonic() - self.witness_behind_logged >= 10.0:
            self.witness_behind_logged = time.monotonic()
            log(
                "witness_behind",
                level="error",
                site=self.name,
                epoch=self.core.epoch,
                witness_epoch=epoch,
                reason="the witness has no state for the pair (replaced?)"
                if epoch == 0
                else "the witness is behind this site (its state lost or restored from an older copy?)",
                action="the witness learns the pair's epoch from the sites' reports; see docs/operations.md",
            )
