"""The settings a running session uses: one current value, the one place they are saved,
and the watch on the settings file.

Contract (every method runs on the session loop; :attr:`LiveSettings.value` may be read
from any thread, since settings are immutable and the reference is swapped atomically):

* :meth:`LiveSettings.replace` and :meth:`LiveSettings.set_pause` are the only writers
  of the current value.
* :meth:`LiveSettings.save_pause` is THE one place the session writes the settings file
  (through the injected ``save``, by default :func:`client.config.save_settings`). It
  saves on top of the file as it is now, so keys another process just wrote
  (``fedtray-client config set ...``) are kept; when the file already says the same
  pause it writes nothing. A failed save is logged, never raised.
* When a ``file`` is given it is polled every ``poll_interval`` seconds (content hash,
  :class:`client.settings_watch.SettingsFileWatch`); a change of its live keys
  (:func:`client.settings_watch.merge_live`) is logged and handed to ``apply``, so
  ``fedtray-client pause`` / ``resume`` / ``config set`` reach a running client. A bug
  in the watch is logged and the watch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from client.config import Settings
from client.settings_watch import SettingsFileWatch, merge_live, parse_settings_bytes

__all__ = ["LiveSettings"]

log = logging.getLogger(__name__)


class LiveSettings:
    """The session's current settings (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        save: Callable[[Settings], None],
        file: Path | None,
        poll_interval: float,
    ) -> None:
        self._value = settings
        self._save = save
        self.file = file
        self._poll_interval = poll_interval
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def value(self) -> Settings:
        """The settings in use now (any thread)."""
        return self._value

    def replace(self, settings: Settings) -> Settings:
        """Use ``settings`` from now on; returns the previous ones."""
        old, self._value = self._value, settings
        return old

    def set_pause(self, paused: bool, until: datetime | None) -> bool:
        """Set the user's pause in the current settings; True when that changed them."""
        until = until.astimezone(UTC) if paused and until is not None else None
        current = self._value
        if (current.paused, current.paused_until) == (paused, until):
            return False
        self._value = current.model_copy(update={"paused": paused, "paused_until": until})
        return True

    async def save_pause(self, changed: bool) -> None:
        """Save the current pause to the settings file (``changed``: as :meth:`set_pause`
        said; with nothing new and no file another process may have changed, nothing is
        written)."""
        if not changed and self.file is None:
            return
        paused, until = self._value.paused, self._value.paused_until
        try:
            await asyncio.to_thread(self._save_pause, paused, until)
        except OSError as exc:
            log.warning("could not save the pause setting: %s", exc)

    def _save_pause(self, paused: bool, until: datetime | None) -> None:
        """Runs in a worker thread. Writing back the session's older copy would undo keys
        another process changed since the last poll, so the file's current settings are
        the base."""
        base = self._value
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):
                from_file = parse_settings_bytes(self.file.read_bytes())
                if (from_file.paused, from_file.paused_until) == (paused, until):
                    return  # the file says so already (`fedtray-client pause` wrote it)
                base = from_file
        self._save(base.model_copy(update={"paused": paused, "paused_until": until}))

    async def start_watching(self, apply: Callable[[Settings], Awaitable[None]]) -> None:
        """Remember the file's content now, then poll it in a loop task (no file: nothing)."""
        if self.file is None:
            return
        watch = await asyncio.to_thread(SettingsFileWatch, self.file)
        self._watch_task = asyncio.ensure_future(self._watch(watch, apply))

    async def stop(self) -> None:
        """Stop watching the file."""
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(
        self, watch: SettingsFileWatch, apply: Callable[[Settings], Awaitable[None]]
    ) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                from_file = await asyncio.to_thread(watch.poll)
            except Exception:  # a bug here must not stop the session; keep watching
                log.exception("watching the settings file failed")
                continue
            if from_file is None:
                continue
            merged = merge_live(self._value, from_file)
            if merged != self._value:
                changed = sorted(
                    k
                    for k in Settings.model_fields
                    if getattr(merged, k) != getattr(self._value, k)
                )
                log.info("the settings file changed (%s); applying it", ", ".join(changed))
                await apply(merged)
