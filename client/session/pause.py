"""Pause sources and the board that combines them into the one decision the session applies.

Contract (loop-only objects):

* A pause source (:class:`PauseSource`) has a name, a first decision, and may watch
  something between :meth:`~PauseSource.start` and :meth:`~PauseSource.stop`; it
  reports a new decision with ``report(name, decision)`` (:meth:`PauseBoard.set`) and
  is told of new settings (:meth:`~PauseSource.settings_changed`). A new kind of pause
  ("in use", CPU, heat: :mod:`client.session.politeness`) is one more class registered
  with :meth:`PauseBoard.register`.
  Decisions from outside the session (:meth:`client.session.DistributedClient.
  set_pause_source`) are set by name without a source object.
* :class:`PauseBoard` combines the decisions with :func:`client.snapshot.
  effective_decision`, in the order first registered or set (so order = priority; the
  user's own pause comes first). When the combined decision changes it calls its
  ``apply(old, new)`` once: THE place where a pause takes effect (the session wires it
  to the worker, the ``paused`` progress, the snapshot and a heartbeat).
  :attr:`PauseBoard.applied` is what ``training:start`` refusals read.
* :class:`UserPause` is the user's persisted ``paused`` setting. A timed pause
  (``paused_until``: :meth:`client.session.DistributedClient.pause` with ``until``,
  ``fedtray-client pause --for``, the tray's "Pause for 1 hour") says "Paused by you
  until 15:30" (local time) and ends by itself at the deadline: a loop task wakes at
  least every :data:`DEADLINE_CHECK_S` (a suspended laptop or a changed clock cannot
  make it miss), resumes, clears ``paused`` and ``paused_until`` in the settings file
  and logs it. A session started after its deadline starts unpaused and clears them too.
* :class:`PowerPause` is the battery policy: a :class:`client.power_monitor.
  PowerMonitor` reads the battery every ``power_poll_interval`` seconds (once before
  connecting, so no round is accepted on a low battery); new battery settings re-decide
  from the last reading at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Protocol

from client.config import Settings
from client.power import PowerSettings
from client.power_monitor import PowerMonitor, power_settings
from client.session.decisions import user_decision
from client.session.live_settings import LiveSettings
from client.snapshot import ALLOW, PauseDecision, effective_decision

__all__ = ["DEADLINE_CHECK_S", "PauseBoard", "PauseSource", "PowerPause", "UserPause"]

log = logging.getLogger(__name__)

#: Longest sleep of the timed-pause task: wall-clock jumps (suspend, NTP) are noticed within it.
DEADLINE_CHECK_S: Final = 1.0

#: How a source reports: ``report(source_name, decision)``.
Report = Callable[[str, PauseDecision], None]


def utc_now() -> datetime:
    return datetime.now(UTC)


class PauseSource(Protocol):
    """One reason the session may pause (see the module docstring)."""

    @property
    def name(self) -> str: ...

    def first_decision(self) -> PauseDecision:
        """The decision before :meth:`start` (at session construction)."""
        ...

    async def start(self) -> None:
        """Begin watching (may report at once)."""
        ...

    def settings_changed(self, old: Settings, new: Settings) -> None:
        """Re-decide for new settings (report only what changed)."""
        ...

    async def stop(self) -> None:
        """Stop watching; report nothing afterwards."""
        ...


class PauseBoard:
    """Every pause source's decision, combined (see the module docstring)."""

    def __init__(self, apply: Callable[[PauseDecision, PauseDecision], None]) -> None:
        self._apply = apply
        self._decisions: dict[str, PauseDecision] = {}
        self._sources: list[PauseSource] = []
        self.applied: PauseDecision = ALLOW

    def register(self, source: PauseSource) -> None:
        """Add a source (before the session starts); its first decision counts at once."""
        self._sources.append(source)
        self._decisions[source.name] = source.first_decision()
        self.applied = effective_decision(self._decisions.values())

    def set(self, name: str, decision: PauseDecision) -> None:
        """Source ``name`` decided ``decision``; apply the combined decision if it changed."""
        self._decisions[name] = decision
        decision = effective_decision(self._decisions.values())
        if decision == self.applied:
            return
        old, self.applied = self.applied, decision
        self._apply(old, decision)

    def decision(self, name: str) -> PauseDecision:
        """Source ``name``'s last decision (ALLOW when it has none)."""
        return self._decisions.get(name, ALLOW)

    async def start(self) -> None:
        for source in self._sources:
            await source.start()

    def settings_changed(self, old: Settings, new: Settings) -> None:
        for source in self._sources:
            source.settings_changed(old, new)

    async def stop(self) -> None:
        for source in self._sources:
            await source.stop()


class UserPause:
    """The user's pause, timed or not (see the module docstring)."""

    name: Final = "user"

    def __init__(
        self, settings: LiveSettings, report: Report, now: Callable[[], datetime] = utc_now
    ) -> None:
        self._settings = settings
        self._report = report
        self._now = now
        self._deadline_task: asyncio.Task[None] | None = None
        self._stopped = False

    def _decide(self) -> PauseDecision:
        return user_decision(self._settings.value, self._now())

    def first_decision(self) -> PauseDecision:
        return self._decide()

    async def start(self) -> None:
        if self._settings.value.paused and self._decide() == ALLOW:
            log.info("the timed pause ended while fedtray was not running; resuming training")
            await self.set(False)
        self._arm_deadline()

    async def set(self, paused: bool, until: datetime | None = None) -> None:
        """The user's pause (``until``: when it ends by itself; ignored when resuming).

        Saved through the settings' owner, whose change announcement re-decides
        (:meth:`settings_changed`). A settings file the disk refuses is logged; the
        pause applies to this run all the same.
        """
        until = until.astimezone(UTC) if paused and until is not None else None
        with contextlib.suppress(OSError):  # logged by the owner; the pause holds this run
            await self._settings.update(paused=paused, paused_until=until)

    def settings_changed(self, old: Settings, new: Settings) -> None:
        self._report(self.name, self._decide())
        if (old.paused, old.paused_until) != (new.paused, new.paused_until):
            self._arm_deadline()  # a deadline already passed ends the pause at once

    async def stop(self) -> None:
        self._stopped = True
        task, self._deadline_task = self._deadline_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _arm_deadline(self) -> None:
        """(Re)start the task that ends a timed pause, or stop it when there is none."""
        task, self._deadline_task = self._deadline_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        settings = self._settings.value
        until = settings.paused_until
        if settings.paused and until is not None and not self._stopped:
            self._deadline_task = asyncio.ensure_future(self._end_pause_at(until))

    async def _end_pause_at(self, until: datetime) -> None:
        # Short sleeps against the wall clock rather than one long monotonic sleep: the
        # deadline is a wall-clock time, and a laptop may sleep through it.
        while (left := (until - self._now()).total_seconds()) > 0:
            await asyncio.sleep(min(left, DEADLINE_CHECK_S))
        if self._deadline_task is not asyncio.current_task():
            return  # replaced meanwhile
        self._deadline_task = None
        log.info("the pause until %s is over; resuming training", f"{until.astimezone():%H:%M}")
        await self.set(False)


class PowerPause:
    """The battery policy as a pause source (see the module docstring)."""

    name: Final = "power"

    def __init__(self, settings: LiveSettings, monitor: PowerMonitor, report: Report) -> None:
        self._settings = settings
        self._monitor = monitor
        self._report = report
        self._task: asyncio.Task[None] | None = None

    def first_decision(self) -> PauseDecision:
        return ALLOW

    def _power_settings(self) -> PowerSettings:
        return power_settings(self._settings.value)

    def _apply(self, decision: PauseDecision) -> None:
        self._report(self.name, decision)

    async def start(self) -> None:
        await self._monitor.poll_once(self._power_settings, self._apply)
        self._task = asyncio.ensure_future(self._monitor.run(self._power_settings, self._apply))

    def settings_changed(self, old: Settings, new: Settings) -> None:
        # A new threshold applies to the last reading at once, not at the next poll.
        decision = self._monitor.evaluate(power_settings(new))
        if decision is not None:
            self._report(self.name, decision)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
