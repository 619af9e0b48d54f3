"""The settings file: where it lives, reading it without ever failing, and the one writer.

The settings themselves (keys, types, defaults, words, validation) are declared once in
:mod:`client.settings_model`; this module re-exports them, so ``client.config`` is the
one import for settings.

Contract:

* The file lives at :func:`config_path` (``platformdirs.user_config_dir("fedtray")``,
  which honours ``XDG_CONFIG_HOME`` on Linux; computed at call time).
* :func:`update_settings` is THE way to change the file: under an inter-process lock
  (an advisory lock on ``config.toml.lock`` beside it, where the OS has one) it reads
  the file as it is now, applies only the given changes, validates and writes
  atomically. Two processes changing different keys therefore never undo each other
  (the tray saving a pause while ``fedtray-client config set`` changes the threshold).
  It raises :class:`SettingsError` for a refused change (nothing is written) and
  :class:`OSError` when the disk refuses (the previous file stays as it was).
* :func:`load_settings` never raises for file problems:

  - missing file: defaults with a freshly generated ``device_id`` and ``device_name``,
    saved at once so the identity persists (if the save fails, a warning is logged);
  - corrupt file (bad TOML, not UTF-8, wrong types, invalid values) or unreadable
    path (e.g. a directory in its place): moved aside to
    ``config.toml.corrupt-<YYYYmmddTHHMMSSZ>`` (never clobbering an earlier one), a
    warning says what was wrong and where the old file went, and defaults are used and
    saved. **A valid ``device_id`` found in the corrupt file is kept** (from the parsed
    table, or, when the file is not TOML at all, from a single intact
    ``device_id = "<uuid>"`` line), because this device's identity on the server must
    never change silently. Nothing else is salvaged: the original bytes stay in the
    moved-aside file. If the file cannot be moved aside, it is left untouched and
    defaults are used in memory only;
  - unknown keys are ignored with a warning (a newer version may have written them),
    not treated as corruption.

* :func:`save_settings` writes a whole :class:`Settings` atomically (0600 temp file in
  the same directory, fsync, ``os.replace``), creating the directory with mode 0700
  when missing; it is the primitive under :func:`update_settings` and for a fresh
  identity, not for changing settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import platformdirs
import tomli_w
from pydantic import ValidationError

from client.atomicfile import write_atomic
from client.settings_model import (
    ALLOWED,
    DEFAULT_SERVER_URL,
    KEYS,
    LIVE_KEYS,
    SETTABLE_KEYS,
    Settings,
    SettingsError,
    check_device_id,
    explain_validation_error,
    parse_setting,
    redacted,
    with_changes,
    with_setting,
)

__all__ = [
    "ALLOWED",
    "DEFAULT_SERVER_URL",
    "KEYS",
    "LIVE_KEYS",
    "SETTABLE_KEYS",
    "Settings",
    "SettingsError",
    "config_path",
    "data_dir",
    "explain_validation_error",
    "load_settings",
    "parse_setting",
    "redacted",
    "save_settings",
    "update_settings",
    "with_changes",
    "with_setting",
]

log = logging.getLogger(__name__)

APP_NAME: Final = "fedtray"
CONFIG_FILENAME: Final = "config.toml"


# ---------------------------------------------------------------------------
# File I/O


def config_path() -> Path:
    """Where the settings file lives; computed on each call so env changes take effect."""
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / CONFIG_FILENAME


def data_dir() -> Path:
    """The user data dir (global weights, pending updates, work files); computed per call."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _toml_bytes(settings: Settings) -> bytes:
    # TOML has no null: optional settings that are unset, and empty tables, are left out.
    data = {k: v for k, v in settings.model_dump(exclude_none=True).items() if v != {}}
    body = tomli_w.dumps(data)
    header = "# fedtray settings; edit with `fedtray-client config set KEY VALUE`.\n"
    return (header + body).encode("utf-8")


def _ensure_private_dir(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is masked by the umask; the config dir holds a token, so be exact.
        os.chmod(directory, 0o700)


def save_settings(settings: Settings, path: Path | None = None) -> None:
    """Write ``settings`` atomically to ``path`` (default :func:`config_path`), mode 0600.

    The parent directory is created with mode 0700 when missing. Raises :class:`OSError`
    when the disk refuses; the previous file, if any, is then left as it was and no
    temporary file is left behind.
    """
    target = path if path is not None else config_path()
    _ensure_private_dir(target.parent)
    write_atomic(target, _toml_bytes(settings), mode=0o600)  # it may hold a token


@contextlib.contextmanager
def _file_lock(target: Path) -> Iterator[None]:
    """Hold an advisory lock beside ``target`` while reading-merging-writing it.

    POSIX: ``flock`` on ``<file>.lock``; Windows: ``msvcrt.locking`` on its first byte.
    Both wait for the holder (writers hold it for one small read and write).
    """
    _ensure_private_dir(target.parent)
    fd = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock on every OS


def update_settings(
    path: Path | None = None, /, *, if_missing: Settings | None = None, **changes: Any
) -> Settings:
    """Change the given keys in the settings file and return the settings as saved.

    Reads the file as it is now (recovering a broken one as :func:`load_settings`
    does), applies ``changes`` (typed values, e.g. ``paused=True``), validates, and
    writes atomically, all under the file's lock, so keys that another process changed
    meanwhile are kept. A missing file starts from ``if_missing`` when given (a running
    client's settings: its identity must not change because the file was deleted), else
    from a fresh identity. Raises :class:`SettingsError` (nothing written) or
    :class:`OSError` (the previous file stays).
    """
    target = path if path is not None else config_path()
    with _file_lock(target):
        missing = if_missing is not None and not target.exists()
        current = if_missing if missing and if_missing is not None else load_settings(target)
        updated = with_changes(current, changes)
        if updated != current or missing:
            save_settings(updated, target)
    return updated


# For a file that is not valid TOML at all: a line that still reads like `device_id = "..."`.
_DEVICE_ID_LINE: Final = re.compile(
    r"""^[ \t]*device_id[ \t]*=[ \t]*["']([0-9A-Fa-f-]{32,36})["'][ \t]*(?:#.*)?$""",
    re.MULTILINE,
)


def _salvage_device_id(data: object) -> str | None:
    """A valid device_id from parsed data (a dict) or raw text, else None."""
    candidate: object = None
    if isinstance(data, dict):
        candidate = data.get("device_id")
    elif isinstance(data, str):
        found = _DEVICE_ID_LINE.findall(data)
        candidate = found[0] if len(found) == 1 else None  # two different ids: trust neither
    if isinstance(candidate, str):
        try:
            return check_device_id(candidate)
        except ValueError:
            return None
    return None


def _move_aside(target: Path) -> Path | None:
    """Rename ``target`` to a ``.corrupt-<UTC stamp>`` sibling that does not exist yet."""
    stamp = _utc_now().strftime("%Y%m%dT%H%M%SZ")
    base = target.with_name(f"{target.name}.corrupt-{stamp}")
    candidate = base
    n = 1
    while candidate.exists() or candidate.is_symlink():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    try:
        os.rename(target, candidate)
    except OSError as exc:
        log.warning("could not move the bad settings file %s aside: %s", target, exc)
        return None
    return candidate


def _save_quietly(settings: Settings, target: Path) -> None:
    try:
        save_settings(settings, target)
    except OSError as exc:
        log.warning(
            "could not save settings to %s (%s); they will not persist until this is fixed",
            target,
            exc,
        )


def _recover(target: Path, problem: str, data: object) -> Settings:
    salvaged = _salvage_device_id(data)
    settings = Settings(device_id=salvaged) if salvaged else Settings()
    moved = _move_aside(target)
    kept = f"; kept device_id {salvaged}" if salvaged else ""
    if moved is None:
        log.warning(
            "settings file %s is unusable (%s); using defaults for now and leaving the "
            "file untouched%s",
            target,
            problem,
            kept,
        )
        return settings
    log.warning(
        "settings file %s is unusable (%s); moved it to %s and started from defaults%s",
        target,
        problem,
        moved,
        kept,
    )
    _save_quietly(settings, target)
    return settings


def load_settings(path: Path | None = None) -> Settings:
    """Read settings from ``path`` (default :func:`config_path`); never raises for file problems.

    See the module docstring for what happens to a missing, corrupt or unreadable file.
    """
    target = path if path is not None else config_path()
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        settings = Settings()
        log.info(
            "no settings file at %s; created one for new device %s", target, settings.device_id
        )
        _save_quietly(settings, target)
        return settings
    except OSError as exc:
        return _recover(target, f"cannot be read: {exc.strerror or exc}", None)

    try:
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        return _recover(target, f"not UTF-8 text: {exc.reason} at byte {exc.start}", text)
    except tomllib.TOMLDecodeError as exc:
        return _recover(target, f"not valid TOML: {exc}", raw.decode("utf-8"))

    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        log.warning(
            "ignoring unknown settings in %s: %s (perhaps written by a newer version)",
            target,
            ", ".join(unknown),
        )
    known = {k: v for k, v in data.items() if k in KEYS}
    try:
        settings = Settings.model_validate(known)
    except ValidationError as exc:
        return _recover(target, explain_validation_error(exc), known)

    if "device_id" not in known or "device_name" not in known:
        # A fresh identity was just generated: save it now or it would change next start.
        _save_quietly(settings, target)
    return settings
