"""Settings from text: how ``config set``, the tray's Settings window and the CLI turn a
string into a setting's value.

Contract (pure, no I/O): :func:`parse_setting` converts a string to the type of the
setting (derived from its declaration in :class:`client.settings_model.Settings`) and
runs the field's own checks; :func:`with_setting` applies one such string to a copy of
the settings. Both raise :class:`client.settings_model.SettingsError` naming the key and
what is allowed; nothing else is ever raised for a bad string.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any, Final, Union, cast, get_args, get_origin

from pydantic import AfterValidator

from client.settings_model import (
    _TASK_NAME,
    ALLOWED,
    SETTABLE_KEYS,
    SPECS,
    TABLE_KEYS,
    Settings,
    SettingsError,
    _check_folder,
    with_changes,
)

__all__ = ["parse_setting", "with_setting"]

_TRUE: Final = frozenset({"true", "yes", "1", "on"})
_FALSE: Final = frozenset({"false", "no", "0", "off"})


def _checks_of(name: str) -> tuple[Callable[[Any], Any], ...]:
    metadata = Settings.model_fields[name].metadata
    return tuple(
        cast(Callable[[Any], Any], m.func) for m in metadata if isinstance(m, AfterValidator)
    )


def _value_type(name: str) -> tuple[type, bool]:
    """The field's type without ``None``, and whether ``None`` is allowed."""
    annotation = Settings.model_fields[name].annotation
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        (only,) = args
        return only, True
    assert isinstance(annotation, type)
    return annotation, False


def parse_setting(key: str, raw: str) -> Any:
    """Convert the command-line string ``raw`` to the type of setting ``key`` and validate it.

    Booleans accept true/false, yes/no, on/off, 1/0 (any case); ``none`` or an empty
    string clears an optional setting. Surrounding whitespace is ignored. Raises
    :class:`SettingsError` naming the key and what is allowed; an unknown key lists the
    valid ones; a key ``config set`` may not change says why.
    """
    table, dot, entry = key.partition(".")
    if dot and table in TABLE_KEYS:
        return _parse_entry(table, entry, raw)
    spec = SPECS.get(key)
    if spec is not None and spec.fixed is not None:
        raise SettingsError(spec.fixed)
    if spec is None:
        raise SettingsError(f"unknown setting {key!r}; valid keys: {', '.join(SETTABLE_KEYS)}")
    if key in TABLE_KEYS:
        raise SettingsError(f"{key} is set one entry at a time: `config set {key}.NAME VALUE`")
    text = raw.strip()
    kind, optional = _value_type(key)
    if optional and text.lower() in ("", "none"):
        return None
    value: Any = text
    if kind is bool:
        low = text.lower()
        if low not in _TRUE | _FALSE:
            raise SettingsError(f"{key} must be {spec.allowed}, got {raw!r}")
        return low in _TRUE
    if kind is int:
        try:
            value = int(text, 10)
        except ValueError:
            raise SettingsError(f"{key} must be {spec.allowed}, got {raw!r}") from None
    try:
        for check in _checks_of(key):
            value = check(value)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    return value


def _parse_entry(table: str, entry: str, raw: str) -> str | None:
    """One entry of a table setting (``task_data.NAME``): a folder, or None to remove it."""
    if not _TASK_NAME.match(entry):
        raise SettingsError(f"{table}.{entry}: {entry!r} is not a task name ({ALLOWED[table]})")
    text = raw.strip()
    if text.lower() in ("", "none"):
        return None
    try:
        # Absolute, so a client started from another folder reads the same place.
        return _check_folder(f"{table}.{entry}", os.path.abspath(os.path.expanduser(text)))
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def with_setting(settings: Settings, key: str, raw: str) -> Settings:
    """A copy of ``settings`` with ``key`` set from the command-line string ``raw``.

    Raises :class:`SettingsError` exactly as :func:`parse_setting` does.
    """
    return with_changes(settings, {key: parse_setting(key, raw)})
