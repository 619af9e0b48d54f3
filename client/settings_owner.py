"""The one owner of a running client's settings.

Contract:

* :class:`SettingsOwner` lives on the session's event loop and is not thread-safe (its
  constructor reads the file once, to know later what changed): the session is its only
  caller, and every other part of the process (the tray, the headless progress line)
  reads the settings from the session's snapshot.
* :meth:`SettingsOwner.update` is the one way a running client changes its settings:
  with a file it calls :func:`client.config.update_settings` (read-merge-validate-
  atomic-write under the file's lock) in a worker thread, so another process's changes
  to other keys are kept; without a file (tests, embedding) it validates in memory.
  Updates are serialised. It raises :class:`client.config.SettingsError` (nothing
  changed) or :class:`OSError` (the file was not written; the running settings stay).
* :meth:`SettingsOwner.follow_file` returns the new settings when another process
  changed a live key (:data:`client.config.LIVE_KEYS`) in the file, else ``None``; a
  broken file is logged and ignored (see :mod:`client.settings_watch`); non-live keys
  (the device id) never change under a running session.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from client.config import Settings, update_settings, with_changes
from client.settings_watch import SettingsFileWatch, merge_live

__all__ = ["SettingsOwner"]


class SettingsOwner:
    """Holds the settings a session runs with; see the module docstring."""

    def __init__(self, settings: Settings, path: Path | None) -> None:
        self._current = settings
        self.path = path
        self._watch = SettingsFileWatch(path) if path is not None else None
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Settings:
        return self._current

    async def update(self, **changes: Any) -> Settings:
        """Apply ``changes`` (typed values), persist them, and return the new settings."""
        async with self._lock:
            if self.path is None:
                written = with_changes(self._current, changes)
            else:
                written = await asyncio.to_thread(update_settings, self.path, **changes)
            # Keep what this session runs with for the keys it does not apply live;
            # take the rest (ours and other processes' live changes) from the file.
            self._current = merge_live(self._current, written).model_copy(update=changes)
            return self._current

    async def follow_file(self) -> Settings | None:
        """The settings with another process's live changes, when there are any."""
        if self._watch is None:
            return None
        from_file = await asyncio.to_thread(self._watch.poll)
        if from_file is None:
            return None
        merged = merge_live(self._current, from_file)
        if merged == self._current:
            return None
        self._current = merged
        return merged
