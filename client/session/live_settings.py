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

from client.config import Settings, update_settings, with_changes
from client.settings_watch import SettingsFileWatch, merge_live

__all__ = ["LiveSettings", "SettingsListener"]

log = logging.getLogger(__name__)

#: Told of every change: ``await on_change(old, new)``.
SettingsListener = Callable[[Settings, Settings], Awaitable[None]]


async def _nobody(old: Settings, new: Settings) -> None:
    """The listener until the session sets one."""


class LiveSettings:
    """The session's current settings (see the module docstring)."""

    def __init__(self, settings: Settings, *, file: Path | None, poll_interval: float) -> None:
        self._value = settings
        self.file = file
        self._poll_interval = poll_interval
        self._lock = asyncio.Lock()  # binds to the session loop at first use
        self._watch_task: asyncio.Task[None] | None = None
        self.on_change: SettingsListener = _nobody

    @property
    def value(self) -> Settings:
        """The settings in use now (any thread)."""
        return self._value

    async def update(self, **changes: Any) -> Settings:
        """Apply ``changes`` (typed values, e.g. ``paused=True``), save them, announce them."""
        async with self._lock:
            wanted = with_changes(self._value, changes)  # SettingsError: nothing changes
            unsaved: OSError | None = None
            if self.file is not None:
                try:
                    written = await asyncio.to_thread(
                        partial(update_settings, self.file, if_missing=self._value, **changes)
                    )
                    # Another process's live changes come along; our keys are as asked.
                    wanted = with_changes(merge_live(self._value, written), changes)
                except OSError as exc:
                    log.warning("could not save the settings to %s: %s", self.file, exc)
                    unsaved = exc
            await self._adopt(wanted)
        if unsaved is not None:
            raise unsaved
        return self._value

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
                from_file = await asyncio.to_thread(watch.poll)
                if from_file is not None:
                    async with self._lock:
                        await self._follow(from_file)
            except Exception:  # a bug here must not stop the session; keep watching
                log.exception("watching the settings file failed")

    async def _follow(self, from_file: Settings) -> None:
        merged = merge_live(self._value, from_file)
        if merged == self._value:
            return
        old = self._value
        changed = sorted(k for k in Settings.model_fields if getattr(merged, k) != getattr(old, k))
        log.info("the settings file changed (%s); applying it", ", ".join(changed))
        await self._adopt(merged)
