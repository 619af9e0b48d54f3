"""Noticing changes to the settings file made by another process (``fedtray-client pause``,
``config set``, the Settings window) while a client runs.

Contract:

* :class:`SettingsFileWatch` never writes, moves or repairs the file (unlike
  :func:`client.config.load_settings`, which recovers a broken file): a running client
  only reads it. :meth:`SettingsFileWatch.poll` returns what the file holds when its
  content changed since the previous poll, else ``None``: the settings with **every
  valid key** taken from the file and each invalid key (or, for a file that is not
  TOML, each key on a line that cannot be read) kept at its running value, and the
  :class:`client.config.SettingsReport` of what was refused (see
  :func:`client.settings_salvage.read_settings_bytes`). A missing or unreadable file
  returns ``None`` (the running settings stay as they are); problems are logged once
  per distinct content.
* :func:`merge_live` is pure: it takes the keys a running session can apply
  (:data:`LIVE_KEYS`) from the file's settings; the device id never changes under a
  running session.
* Cheap enough to poll every second: one read of a small file and a hash. The content,
  not the modification time, decides (two saves within the clock's granularity have the
  same mtime).
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from pathlib import Path

from pydantic import ValidationError

from client.config import KEYS, LIVE_KEYS, Settings, SettingsReport, explain_validation_error
from client.settings_salvage import read_settings_bytes

__all__ = ["LIVE_KEYS", "SettingsFileWatch", "merge_live"]

log = logging.getLogger(__name__)


def merge_live(current: Settings, from_file: Settings) -> Settings:
    """``current`` with the :data:`LIVE_KEYS` of ``from_file``."""
    changes = {
        key: getattr(from_file, key)
        for key in LIVE_KEYS
        if getattr(from_file, key) != getattr(current, key)
    }
    return current.model_copy(update=changes) if changes else current


def parse_settings_bytes(raw: bytes) -> Settings:
    """Settings from a file's bytes, all or nothing; raises ValueError in plain words
    (nothing is repaired; :func:`client.settings_salvage.read_settings_bytes` keeps what
    it can)."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"not valid UTF-8 TOML: {exc}") from exc
    try:
        return Settings.model_validate({k: v for k, v in data.items() if k in KEYS})
    except ValidationError as exc:
        raise ValueError(explain_validation_error(exc)) from exc


class SettingsFileWatch:
    """Polls one settings file for changes (see the module docstring). Not thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._digest = self._hash(self._read())
        self._complained: str | None = None

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    @staticmethod
    def _hash(raw: bytes | None) -> str | None:
        return None if raw is None else hashlib.sha256(raw).hexdigest()

    def poll(self, running: Settings) -> tuple[Settings, SettingsReport] | None:
        """What the file holds when its content changed since the last poll, else None;
        an invalid key keeps its value from ``running``."""
        raw = self._read()
        digest = self._hash(raw)
        if digest == self._digest:
            return None
        self._digest = digest
        if raw is None:
            return None  # removed or unreadable: keep the running settings
        read = read_settings_bytes(raw, fallback=running)
        report = SettingsReport(resets=read.resets, file_problem=read.file_problem)
        if not report.ok and self._complained != digest:
            self._complained = digest
            log.warning(
                "the changed settings file %s has problems; every other setting applies: %s",
                self.path,
                " | ".join(report.lines()),
            )
        return read.settings, report
