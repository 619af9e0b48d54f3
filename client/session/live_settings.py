"""The settings a running session uses: their one owner and writer in the process.

Contract (every method runs on the session loop; :attr:`LiveSettings.value` may be read
from any thread, since settings are immutable and the reference is swapped atomically):

* :meth:`LiveSettings.update` is THE one way a running client changes its settings
  (the user's pause, the tray's menu, new connection settings). With a ``file`` it
  calls :func:`client.config.update_settings` in a worker thread (read the file as it
  is now, apply only these keys, validate, write atomically under the file's lock), so
  keys another process changed meanwhile are kept; without one (tests, embedding) the
  change is validated and kept in memory. Updates are serialised. A refused change
  raises :class:`client.config.SettingsError` and changes nothing; when the disk
  refuses, the change still applies to this run and :class:`OSError` is raised after
  (the caller says it was not saved).
* When a ``file`` is given it is polled every ``poll_interval`` seconds (content hash,
  :class:`client.settings_watch.SettingsFileWatch`); a change of its live keys
  (:data:`client.config.LIVE_KEYS`) made by another process (``fedtray-client pause``,
  ``config set``, the Settings window) is logged and applied. Keys that do not apply
  live (the device id) never change under a running session. A bug in the watch is
  logged and the watch goes on.
* A changed file with invalid values (one typo) or lines that are not TOML still
  applies **every other live key**; each refused key keeps its running value, and the
  problem goes into :attr:`LiveSettings.report`.
* :attr:`LiveSettings.report` (a :class:`client.config.SettingsReport`) is THE one
  owner of "which keys were reset and why" in a running client: it starts with what
  the start-up load repaired, gains what a later file read refused, and loses a key's
  reset when that key gets a new value (set through :meth:`update`, or a valid value
  in the file; see :meth:`SettingsReport.carried`). A run on temporary settings (the
  file could not be read at start) is reported until the restart. Every change of the
  report is announced once to ``on_report(report)`` (the session puts it in the
  snapshot, where the tray and the headless status read it).
* Every change, from either path, is announced once to ``on_change(old, new)`` (set by
  the session: the snapshot, the pause sources and the connection follow it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from client.config import Settings, SettingsReport, update_settings_and_report, with_changes
from client.settings_watch import SettingsFileWatch, merge_live

__all__ = ["LiveSettings", "ReportListener", "SettingsListener"]

log = logging.getLogger(__name__)

#: Told of every change: ``await on_change(old, new)``.
SettingsListener = Callable[[Settings, Settings], Awaitable[None]]


#: Told of every change of the report: ``on_report(report)``.
ReportListener = Callable[[SettingsReport], None]


async def _nobody(old: Settings, new: Settings) -> None:
    """The listener until the session sets one."""


def _no_one(report: SettingsReport) -> None:
    """The report listener until the session sets one."""


class LiveSettings:
    """The session's current settings (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        file: Path | None,
        poll_interval: float,
        report: SettingsReport | None = None,
    ) -> None:
        self._value = settings
        self._report = report if report is not None else SettingsReport()
        self.on_report: ReportListener = _no_one
        self.file = file
        self._poll_interval = poll_interval
        self._lock = asyncio.Lock()  # binds to the session loop at first use
        self._watch_task: asyncio.Task[None] | None = None
        self.on_change: SettingsListener = _nobody

    @property
    def value(self) -> Settings:
        """The settings in use now (any thread)."""
        return self._value

    @property
    def report(self) -> SettingsReport:
        """Which keys were reset and why (any thread; empty when nothing was)."""
        return self._report

    async def update(self, **changes: Any) -> Settings:
        """Apply ``changes`` (typed values, e.g. ``paused=True``), save them, announce them."""
        async with self._lock:
            wanted = with_changes(self._value, changes)  # SettingsError: nothing changes
            repaired = SettingsReport()
            unsaved: OSError | None = None
            if self.file is not None:
                try:
                    written, repaired = await asyncio.to_thread(
                        partial(
                            update_settings_and_report,
                            self.file,
                            if_missing=self._value,
                            **changes,
                        )
                    )
                    # Another process's live changes come along; our keys are as asked.
                    wanted = with_changes(merge_live(self._value, written), changes)
                except OSError as exc:
                    log.warning("could not save the settings to %s: %s", self.file, exc)
                    unsaved = exc
            old = self._value
            await self._adopt(wanted)
            self._set_report(self._report.carried(old, wanted, repaired).without(changes))
        if unsaved is not None:
            raise unsaved
        return self._value

    def _set_report(self, report: SettingsReport) -> None:
        if report != self._report:
            self._report = report
            self.on_report(report)

    async def _adopt(self, new: Settings) -> None:
        old, self._value = self._value, new
        if new != old:
            await self.on_change(old, new)

    async def start_watching(self) -> None:
        """Remember the file's content now, then poll it in a loop task (no file: nothing)."""
        if self.file is None:
            return
        watch = await asyncio.to_thread(SettingsFileWatch, self.file)
        self._watch_task = asyncio.ensure_future(self._watch(watch))

    async def stop(self) -> None:
        """Stop watching the file."""
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(self, watch: SettingsFileWatch) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                async with self._lock:
                    from_file = await asyncio.to_thread(watch.poll, self._value)
                    if from_file is not None:
                        await self._follow(*from_file)
            except Exception:  # a bug here must not stop the session; keep watching
                log.exception("watching the settings file failed")

    async def _follow(self, from_file: Settings, fresh: SettingsReport) -> None:
        merged = merge_live(self._value, from_file)
        old = self._value
        if merged != old:
            changed = sorted(
                k for k in Settings.model_fields if getattr(merged, k) != getattr(old, k)
            )
            log.info("the settings file changed (%s); applying it", ", ".join(changed))
            await self._adopt(merged)
        self._set_report(self._report.carried(old, merged, fresh))
