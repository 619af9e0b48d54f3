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
* :func:`load_settings` never raises for file problems, and never loses a valid key;
  :func:`load_settings_and_report` also returns the :class:`SettingsReport` (which keys
  were reset and why; empty when the file was fine):

  - missing file: defaults with a freshly generated ``device_id`` and ``device_name``,
    saved at once so the identity persists (if the save fails, a warning is logged);
  - invalid values (``battery_threshold = 150``, a wrong type, a bad ``task_data``
    entry): **every valid key is kept** and each invalid one alone is reset to its
    default (per key, by :func:`client.settings_salvage.salvage`, from the one
    declaration in :mod:`client.settings_model`); the original file is moved aside to
    ``config.toml.corrupt-<YYYYmmddTHHMMSSZ>`` (never clobbering an earlier one), a
    warning names each reset key, why, and where the original went, and the repaired
    settings are saved. A bad ``device_id`` is the one case that makes a new identity;
  - not TOML, or not UTF-8 (the file cannot be parsed): moved aside the same way, and
    salvaged line by line (:func:`client.settings_salvage.salvage_lines`): every line
    that reads alone is kept, the others are named by number in the warning and the
    report; a key on two lines (e.g. two different ``device_id`` lines) is trusted on
    neither. The original bytes stay in the moved-aside file;
  - a file that exists but cannot be read (permissions, e.g. mode 000): **left
    untouched** (not moved, never written over, since it may hold this device's
    ``device_id`` and ``auth_token``); an error is logged and the client runs on
    temporary in-memory defaults (``report.in_memory``: the default server, a temporary
    device id) until the file is fixed and the client restarted. Something other than
    a file in its place (a directory) is moved aside instead, as a damaged file;
  - if a damaged file cannot be moved aside, it is left untouched and the kept
    settings are used in memory only (``report.in_memory``);
  - unknown keys are ignored with a warning (a newer version may have written them),
    not treated as damage.

* :func:`update_settings` refuses with :class:`PermissionError` (an ``OSError``) to
  write over a file that :func:`load_settings` left untouched (``report.in_memory``),
  so a change made while the file cannot be read never replaces it.
* :func:`save_settings` writes a whole :class:`Settings` atomically (0600 temp file in
  the same directory, fsync, ``os.replace``), creating the directory with mode 0700
  when missing; it is the primitive under :func:`update_settings` and for a fresh
  identity, not for changing settings.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import platformdirs
import tomli_w

from client.atomicfile import write_atomic
from client.settings_model import (
    ALLOWED,
    DEFAULT_SERVER_URL,
    KEYS,
    LIVE_KEYS,
    SETTABLE_KEYS,
    Settings,
    SettingsError,
    explain_validation_error,
    redacted,
    with_changes,
)
from client.settings_salvage import ReadResult, Reset, SettingsReport, read_settings_bytes
from client.settings_text import parse_setting, with_setting

__all__ = [
    "ALLOWED",
    "DEFAULT_SERVER_URL",
    "KEYS",
    "LIVE_KEYS",
    "SETTABLE_KEYS",
    "Reset",
    "Settings",
    "SettingsError",
    "SettingsReport",
    "config_path",
    "data_dir",
    "explain_validation_error",
    "load_settings",
    "load_settings_and_report",
    "parse_setting",
    "redacted",
    "save_settings",
    "update_settings",
    "update_settings_and_report",
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

    See :func:`update_settings_and_report`, which this is without the report.
    """
    return update_settings_and_report(path, if_missing=if_missing, **changes)[0]


def update_settings_and_report(
    path: Path | None = None, /, *, if_missing: Settings | None = None, **changes: Any
) -> tuple[Settings, SettingsReport]:
    """Change the given keys in the settings file; the settings as saved, and the report
    of the repair the read needed (empty when the file was fine).

    Reads the file as it is now (recovering a broken one as :func:`load_settings`
    does), applies ``changes`` (typed values, e.g. ``paused=True``), validates, and
    writes atomically, all under the file's lock, so keys that another process changed
    meanwhile are kept. A missing file starts from ``if_missing`` when given (a running
    client's settings: its identity must not change because the file was deleted), else
    from a fresh identity. Raises :class:`SettingsError` (nothing written) or
    :class:`OSError` (the previous file stays).
    """
    target = path if path is not None else config_path()
    report = SettingsReport()
    with _file_lock(target):
        missing = if_missing is not None and not target.exists()
        if missing and if_missing is not None:
            current = if_missing
        else:
            current, report = load_settings_and_report(target)
            if report.in_memory and os.path.lexists(target):
                why = report.file_problem or "it could not be kept aside"
                raise PermissionError(
                    errno.EACCES,
                    "not writing over the settings file, which is left as it is so that "
                    f"nothing in it is lost ({why})",
                    str(target),
                )
        updated = with_changes(current, changes)
        if updated != current or missing:
            save_settings(updated, target)
    return updated, report.without(changes)


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


def _unreadable(target: Path, exc: OSError) -> tuple[Settings, SettingsReport]:
    """A file that is there but cannot be read: never moved, never written over."""
    problem = f"{target} cannot be read: {exc.strerror or exc}"
    settings = Settings()
    log.error(
        "%s; running on TEMPORARY settings (the default server, temporary device id %s) "
        "and leaving the file untouched, so its device id and token are not lost; "
        "changes made now are not saved. Fix the file's permissions and restart fedtray",
        problem,
        settings.device_id,
    )
    return settings, SettingsReport(file_problem=problem, in_memory=True)


def _keep_aside(target: Path, read: ReadResult) -> tuple[Settings, SettingsReport]:
    """Move the damaged file aside and save what was kept (or, if it cannot be moved,
    leave it untouched and run on the kept settings in memory)."""
    report = SettingsReport(resets=read.resets, file_problem=read.file_problem)
    what = "; ".join(
        ([read.file_problem] if read.file_problem else []) + [r.describe() for r in read.resets]
    )
    moved = _move_aside(target)
    if moved is None:
        log.warning(
            "settings file %s has problems (%s); kept every other setting, using them for "
            "now and leaving the file untouched",
            target,
            what,
        )
        return read.settings, replace(report, in_memory=True)
    log.warning(
        "settings file %s has problems (%s); moved it to %s and saved every other setting",
        target,
        what,
        moved,
    )
    _save_quietly(read.settings, target)
    return read.settings, replace(report, kept_aside=str(moved))


def load_settings(path: Path | None = None) -> Settings:
    """Read settings from ``path`` (default :func:`config_path`); never raises for file problems.

    See the module docstring for what happens to a missing, damaged or unreadable file.
    """
    return load_settings_and_report(path)[0]


def load_settings_and_report(path: Path | None = None) -> tuple[Settings, SettingsReport]:
    """:func:`load_settings`, and what was wrong with the file (empty when nothing was)."""
    target = path if path is not None else config_path()
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        settings = Settings()
        log.info(
            "no settings file at %s; created one for new device %s", target, settings.device_id
        )
        _save_quietly(settings, target)
        return settings, SettingsReport()
    except OSError as exc:
        if os.path.isfile(target):  # a file of ours we may not read: it may hold the identity
            return _unreadable(target, exc)
        # Something else in its place (a directory): moved aside, nothing in it is lost.
        problem = f"cannot be read: {exc.strerror or exc}"
        return _keep_aside(target, ReadResult(Settings(), (), problem, (), complete=False))

    read = read_settings_bytes(raw)
    if read.unknown:
        log.warning(
            "ignoring unknown settings in %s: %s (perhaps written by a newer version)",
            target,
            ", ".join(read.unknown),
        )
    if read.file_problem is not None or read.resets:
        return _keep_aside(target, read)
    if not read.complete:
        # A fresh identity was just generated: save it now or it would change next start.
        _save_quietly(read.settings, target)
    return read.settings, SettingsReport()
