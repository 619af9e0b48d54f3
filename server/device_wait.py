"""The wait before a round: for ``--min-clients`` eligible devices, without walking the fleet.

Contract: :class:`DeviceWait` waits on the registry's incremental counts
(:meth:`server.registry.Registry.tally`) for the server's task. Its loop wakes only when

* the eligible count crosses ``min_clients`` (either way; the tally's listener),
* the next connected device may have turned stale (a timer at
  :meth:`server.registry.Registry.next_stale_at`: staleness changes with time alone;
  a change of the counts that brings that time before the armed timer wakes it too),
* the "round N waiting" line is due again (``wait_log_interval``), or
* :meth:`DeviceWait.nudge` is called;

a heartbeat never wakes it. A crossing wakes the loop from the event loop's next turn, so
the handler whose transition crossed (a registration, with its welcome) finishes first.
Each pass sweeps staleness (O(devices that changed)) and, once
enough devices are eligible, builds the eligible list (O(fleet), once per round start) and
returns it. While it waits, a change of the counts that does not cross ``min_clients`` (a
device registers, pauses, leaves) updates the waiting reason in the phase and logs it when
it changed, from the counts alone (O(distinct reasons)), without a pass. :attr:`wakes`
counts the passes (tests read it). The waiting text is exactly
:meth:`server.registry.Registry.waiting_summary`'s. Never raises but what the registry or
phase raise for a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from server.config import ServerConfig
from server.eligibility import Tally
from server.phase import PhaseMachine
from server.registry import DeviceRecord, Registry

log = logging.getLogger(__name__)

#: Staleness is strict (``> stale_after``): wake this long after a device may turn stale.
_STALE_MARGIN = 0.001


class DeviceWait:
    """The coordinator's wait for eligible devices (see the module docstring)."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        registry: Registry,
        phase: PhaseMachine,
        before_waiting: Callable[[], None],
    ) -> None:
        self._config = config
        self._registry = registry
        self._phase = phase
        self._before_waiting = before_waiting
        self._wake = asyncio.Event()
        self._tally: Tally | None = None
        self._number: int | None = None  # the round waited for; None when not waiting
        self._wakes_at = float("-inf")  # when the sleeping loop's timer fires
        self._last_reason: str | None = None
        self._last_logged = 0.0
        #: Passes of the wait loop (each wake), since the server started.
        self.wakes = 0

    def nudge(self) -> None:
        """Make the waiting loop look again now."""
        self._wake.set()

    def _watch(self, package_bytes: int | None) -> Tally:
        tally = self._tally
        if tally is None or tally.package_bytes != package_bytes:
            tally = self._tally = self._registry.tally(self._config.task, package_bytes)
            tally.listen(self._counts_changed)
        return tally

    def _counts_changed(self, before: int, after: int) -> None:
        """The tally's listener: wake on a crossing, else only refresh the reason."""
        if self._number is None or self._tally is None:
            return
        needed = self._config.min_clients
        next_stale = self._registry.next_stale_at()
        if (before >= needed) != (after >= needed) or (
            # A device that joined while the loop slept may turn stale before its timer.
            next_stale is not None and next_stale + _STALE_MARGIN < self._wakes_at
        ):
            # From the event loop's next turn, not from inside the registry transition:
            # the handler that registered a device finishes first (its ack, the welcome
            # that starts bringing it up to date), so a round never overtakes them.
            asyncio.get_running_loop().call_soon(self._wake.set)
        else:
            self._show(self._number, self._tally, time.monotonic())

    def _show(self, number: int, tally: Tally, now: float) -> None:
        """The waiting reason into the phase; logged when it changed or is due again."""
        cfg = self._config
        reason = tally.summary(cfg.min_clients)
        self._phase.wait(number, reason)
        if reason != self._last_reason or now - self._last_logged >= cfg.wait_log_interval:
            log.info("round %d waiting: %s", number, reason)
            self._last_reason, self._last_logged = reason, now

    async def wait(self, number: int, package_bytes: int | None) -> list[DeviceRecord]:
        """The eligible devices of round ``number`` once there are ``min_clients``; says
        why it waits (phase and log), never silently."""
        cfg, registry = self._config, self._registry
        tally = self._watch(package_bytes)
        self._last_reason, self._last_logged = None, 0.0
        self._number = number
        try:
            while True:
                self._wake.clear()
                self.wakes += 1
                now = time.monotonic()
                registry.sweep(now)
                if tally.eligible >= cfg.min_clients:
                    eligible = registry.eligible(cfg.task, now, package_bytes)
                    if len(eligible) >= cfg.min_clients:
                        return eligible
                self._before_waiting()
                self._show(number, tally, now)
                with contextlib.suppress(TimeoutError):
                    timeout = self._timeout(now)
                    self._wakes_at = now + timeout
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
        finally:
            self._number = None
            self._wakes_at = float("-inf")

    def _timeout(self, now: float) -> float:
        """Until the next device may turn stale or the log line is due again."""
        timeout = self._config.wait_log_interval - (now - self._last_logged)
        next_stale = self._registry.next_stale_at()
        if next_stale is not None:
            timeout = min(timeout, next_stale - now + _STALE_MARGIN)
        return max(timeout, _STALE_MARGIN)
