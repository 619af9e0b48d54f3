"""Watching the battery: turn readings of a :class:`client.resources.BatterySource` into
the session's ``"power"`` pause decision.

Contract:

* :class:`PowerMonitor` runs on the session's asyncio loop. :meth:`PowerMonitor.run`
  reads the battery every ``interval`` seconds in a worker thread (``psutil`` may block
  briefly; the loop never does) and calls ``apply(decision)`` only when the power
  decision changes, after logging the change in plain words.
* :meth:`PowerMonitor.evaluate` recomputes the decision from the last reading at once
  (the session calls it when the battery settings change, so a new threshold applies
  without waiting for the next reading).
* The user's pause is NOT decided here (it is its own pause source): the policy is
  always asked with ``user_paused=False``.
* A source that raises counts as "no battery" (never pauses), as
  :func:`client.resources.read_battery` does for every OS failure; it is logged at
  debug level only, since it would repeat on every poll.
* :func:`power_settings` and :func:`transition_words` are pure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from client.config import Settings
from client.power import PowerSettings, decide
from client.protocol import BatteryStatus
from client.resources import BatterySource
from client.snapshot import ALLOW, PauseDecision

__all__ = [
    "DEFAULT_POLL_INTERVAL_S",
    "PowerMonitor",
    "power_settings",
    "transition_words",
]

log = logging.getLogger(__name__)

#: Seconds between battery readings (a pause lands within this plus one batch).
DEFAULT_POLL_INTERVAL_S: Final = 5.0


def power_settings(settings: Settings) -> PowerSettings:
    """The battery part of the user's settings."""
    return PowerSettings(
        threshold=settings.battery_threshold, hysteresis=settings.battery_hysteresis
    )


def transition_words(old: PauseDecision, new: PauseDecision) -> str | None:
    """A log line for a change of the power decision (``None`` when nothing changed)."""
    if old == new:
        return None
    if new.allowed:
        return "power: training allowed again (plugged in or the battery is charged enough)"
    return f"power: pausing training ({new.reason}): {new.detail}"


class PowerMonitor:
    """Polls a battery source and keeps the current power decision (loop-only object)."""

    def __init__(self, source: BatterySource, interval: float = DEFAULT_POLL_INTERVAL_S) -> None:
        if not interval > 0:
            raise ValueError(f"the power poll interval must be positive, got {interval}")
        self.source = source
        self.interval = interval
        self.reading: BatteryStatus | None = None
        self.decision: PauseDecision = ALLOW

    def cached_reading(self) -> BatteryStatus | None:
        """The last reading (for heartbeats: reading it again would block the loop)."""
        return self.reading

    async def read(self) -> BatteryStatus | None:
        """One reading, taken in a worker thread; ``None`` when the source fails."""
        try:
            self.reading = await asyncio.to_thread(self.source)
        except Exception as exc:  # an injected source may fail any way; never pause for it
            log.debug("battery reading failed: %r", exc)
            self.reading = None
        return self.reading

    def evaluate(self, settings: PowerSettings) -> PauseDecision | None:
        """Recompute from the last reading; the new decision when it changed, else None."""
        new = decide(self.reading, settings, user_paused=False, previous=self.decision)
        words = transition_words(self.decision, new)
        if words is None:
            return None
        log.info("%s", words)
        self.decision = new
        return new

    async def poll_once(
        self, settings: Callable[[], PowerSettings], apply: Callable[[PauseDecision], None]
    ) -> None:
        """Read, decide and apply a changed decision (the body of :meth:`run`)."""
        await self.read()
        changed = self.evaluate(settings())
        if changed is not None:
            apply(changed)

    async def run(
        self, settings: Callable[[], PowerSettings], apply: Callable[[PauseDecision], None]
    ) -> None:
        """Poll until cancelled; ``settings`` is asked afresh for every decision."""
        while True:
            await self.poll_once(settings, apply)
            await asyncio.sleep(self.interval)
