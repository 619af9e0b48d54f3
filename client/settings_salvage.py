"""Keeping every good setting from a damaged settings file, and the report of what was not.

Contract (pure: bytes and tables in, settings and words out; no I/O, no logging):

* :func:`salvage` validates a parsed table against :class:`client.settings_model.Settings`
  (the one declaration: types, checks and words come from there, never from a table
  here) and keeps **every valid key**. Each invalid key, and each invalid entry of a
  table key (``task_data.NAME``), is reset alone: to the ``fallback`` settings' value
  when given (a running client keeps what it runs with), else to the key's default. A
  bad ``device_id`` therefore becomes a fresh one only when there is no fallback. It
  never raises for any table of TOML values.
* :func:`salvage_lines` reads text that is not valid TOML one line at a time (within
  its ``[table]``): lines that parse alone are kept, the others are listed by number,
  and a key found on two lines is kept from neither ("trust neither", e.g. two
  different ``device_id`` lines). Multi-line values do not occur in a settings file,
  so this costs one small parse per line.
* :func:`read_settings_bytes` is the two together: file bytes (valid or not, UTF-8 or
  not) to the best settings they hold and what was wrong, in plain words.
* :class:`SettingsReport` is "which keys were reset and why" (plus whether the file as
  a whole was unusable, where the original was kept, and whether the client runs on
  settings it could not save). It never holds a value of ``auth_token``: a refused
  token is described by its length only, and the value now in use is shown as ``***``.
  :meth:`SettingsReport.carried` and :meth:`SettingsReport.without` are the rules for
  how long a reset is reported: until the key gets a new value.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from pydantic import ValidationError

from client.settings_model import (
    KEYS,
    REDACTED,
    TABLE_KEYS,
    Settings,
    validation_problems,
)

__all__ = [
    "ReadResult",
    "Reset",
    "SettingsReport",
    "read_settings_bytes",
    "salvage",
    "salvage_lines",
    "value_words",
]

#: A table header on a line of its own: ``[task_data]``.
_HEADER: Final = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(?:#.*)?$")
#: Lines after a header that could not be read belong to no known table: ignored.
_LOST_TABLE: Final = "\0lost"


@dataclass(frozen=True)
class Reset:
    """One key (or ``TABLE.ENTRY``) whose value was refused, why, and what is used now."""

    key: str
    problem: str
    """Plain words naming the key and what it accepts (never the token itself)."""
    now: str
    """The value used instead, as ``config show`` prints it (the token as ``***``)."""

    def describe(self) -> str:
        """``"battery_threshold must be ..., got 150 — now 50"``."""
        return f"{self.problem} — now {self.now}"


@dataclass(frozen=True)
class SettingsReport:
    """What was wrong with the settings file and what fedtray did about it.

    Empty (``ok``) when nothing was. ``in_memory``: the file was left exactly as it was
    (it could not be read, or not be kept aside) and the settings in use are not saved;
    writing over such a file is refused (:func:`client.config.update_settings`).
    """

    resets: tuple[Reset, ...] = ()
    file_problem: str | None = None
    """The file as a whole (cannot be read, not UTF-8, not TOML), in plain words."""
    kept_aside: str | None = None
    """Where the original file was moved before the repaired one was written."""
    in_memory: bool = False

    @property
    def ok(self) -> bool:
        return not self.resets and self.file_problem is None and not self.in_memory

    @property
    def reset_keys(self) -> tuple[str, ...]:
        return tuple(r.key for r in self.resets)

    def marks(self) -> dict[str, str]:
        """``{key: "reset: <why>"}`` for ``config show`` (entries as ``TABLE.ENTRY``)."""
        return {r.key: r.problem for r in self.resets}

    def summary(self) -> str:
        """One or two sentences for a notification or a status line ("" when ok)."""
        if self.ok:
            return ""
        parts: list[str] = []
        if self.in_memory and not self.resets and self.file_problem is not None:
            parts.append(
                f"Cannot use the settings file ({self.file_problem}): fedtray runs on "
                "temporary settings and leaves the file as it is. Fix it, then restart"
            )
        else:
            if self.file_problem is not None:
                parts.append(f"The settings file was damaged ({self.file_problem})")
            if self.resets:
                keys = ", ".join(self.reset_keys)
                noun = "setting was" if len(self.resets) == 1 else "settings were"
                parts.append(f"{len(self.resets)} {noun} not valid and reset: {keys}")
            parts.append("every other setting was kept")
            if self.in_memory:
                parts.append("the file was left as it is and changes are not saved")
        if self.kept_aside is not None:
            parts.append(f"the original is kept at {self.kept_aside}")
        text = "; ".join(parts)
        return text[0].upper() + text[1:] + "."

    def lines(self) -> tuple[str, ...]:
        """Every detail, one line each (for a terminal)."""
        if self.ok:
            return ()
        out: list[str] = []
        if self.file_problem is not None:
            out.append(f"the settings file: {self.file_problem}")
        out.extend(f"reset: {r.describe()}" for r in self.resets)
        if self.kept_aside is not None:
            out.append(f"the original file is kept at {self.kept_aside}")
        if self.in_memory:
            out.append(
                "the file was left untouched; these settings are not saved (a temporary "
                "identity when the file could not be read): fix the file and restart"
            )
        return tuple(out)

    def without(self, keys: Iterable[str]) -> SettingsReport:
        """The report once the user set ``keys`` (a table key clears its entries too)."""
        gone = set(keys)

        def cleared(key: str) -> bool:
            return key in gone or key.partition(".")[0] in gone

        kept = tuple(r for r in self.resets if not cleared(r.key))
        if kept == self.resets:
            return self
        aside = self.kept_aside if kept or self.in_memory else None
        return replace(self, resets=kept, kept_aside=aside)

    def carried(self, before: Settings, after: Settings, fresh: SettingsReport) -> SettingsReport:
        """The report after the running settings went from ``before`` to ``after`` by
        following a file read reported as ``fresh``: ``fresh``'s problems, plus each
        earlier reset whose key still holds the value it was reset to (the user has not
        dealt with it yet). A run on temporary settings stays so until a restart."""
        fresh_keys = set(fresh.reset_keys)
        still = tuple(
            r
            for r in self.resets
            if r.key not in fresh_keys and _value(before, r.key) == _value(after, r.key)
        )
        resets = fresh.resets + still
        return SettingsReport(
            resets=resets,
            file_problem=fresh.file_problem
            if fresh.file_problem is not None or not self.in_memory
            else self.file_problem,
            kept_aside=fresh.kept_aside or (self.kept_aside if still else None),
            in_memory=fresh.in_memory or self.in_memory,
        )


def _value(settings: Settings, key: str) -> object:
    table, dot, entry = key.partition(".")
    if dot and table in TABLE_KEYS:
        entries = getattr(settings, table)
        return entries.get(entry) if isinstance(entries, dict) else None
    return getattr(settings, key, None)


def value_words(settings: Settings, key: str) -> str:
    """A key's value as ``config show`` prints it; the token as ``***``."""
    value = _value(settings, key)
    if value is None:
        return "(not set)"
    if key == "auth_token":
        return REDACTED
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {v!r}" for k, v in sorted(value.items())) + "}"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return repr(str(value))


def _problems(data: Mapping[str, Any]) -> tuple[Settings | None, dict[str, list[str]]]:
    """The settings when ``data`` validates, else the problems by top-level key."""
    try:
        return Settings.model_validate(data), {}
    except ValidationError as exc:
        by_key: dict[str, list[str]] = {}
        for key, words in validation_problems(exc):
            by_key.setdefault(key, []).append(words)
        return None, by_key


def _fallback_value(fallback: Settings | None, key: str) -> tuple[bool, object]:
    if fallback is None:
        return False, None
    return True, getattr(fallback, key)


def salvage(
    data: Mapping[str, Any],
    fallback: Settings | None = None,
    *,
    also_reset: Mapping[str, str] | None = None,
) -> tuple[Settings, tuple[Reset, ...]]:
    """Settings from ``data`` keeping every valid key; the invalid ones reset alone.

    ``data`` holds only known keys (callers drop unknown ones). ``also_reset`` names
    keys the caller dropped for its own reason (e.g. found twice), with the words why;
    they are reported like the others. See the module docstring.
    """
    work: dict[str, Any] = {k: v for k, v in data.items() if k in KEYS}
    why: dict[str, list[str]] = {}
    entry_why: dict[str, str] = {}
    for key, words in (also_reset or {}).items():
        if key not in KEYS:  # an entry of a table key (already left out of ``data``)
            entry_why[key] = words
            continue
        why[key] = [words]
        work.pop(key, None)
        has, value = _fallback_value(fallback, key)
        if has:
            work[key] = value
    split_tables: set[str] = set()
    settings: Settings | None = None
    for _ in range(len(KEYS) + 2):  # each pass removes at least one key
        settings, problems = _problems(work)
        if settings is not None:
            break
        for key, found in problems.items():
            if key not in KEYS:  # a problem with the table as a whole: start over
                work = {}
                continue
            table = work.get(key)
            if key in TABLE_KEYS and key not in split_tables and isinstance(table, dict):
                split_tables.add(key)
                work[key] = _salvage_table(key, table, fallback, entry_why)
                continue
            why.setdefault(key, []).extend(found)
            work.pop(key, None)
            has, value = _fallback_value(fallback, key)
            if has:
                work[key] = value
    if settings is None:  # pragma: no cover - defaults always validate
        settings = fallback if fallback is not None else Settings()
    resets = [Reset(k, "; ".join(w), value_words(settings, k)) for k, w in why.items()]
    resets += [
        Reset(k, w, value_words(settings, k))
        for k, w in entry_why.items()
        if k.partition(".")[0] not in why
    ]
    return settings, tuple(sorted(resets, key=lambda r: r.key))


def _salvage_table(
    table: str, entries: dict[str, Any], fallback: Settings | None, why: dict[str, str]
) -> dict[str, Any]:
    """The entries of a table key that are valid on their own; the others' problems go
    to ``why`` (as ``TABLE.ENTRY``) and their value comes from ``fallback`` if it has one."""
    kept: dict[str, Any] = {}
    known = getattr(fallback, table) if fallback is not None else {}
    for entry, value in entries.items():
        alone, problems = _problems({table: {entry: value}})
        if alone is not None:
            kept[entry] = value
            continue
        why[f"{table}.{entry}"] = "; ".join(w for ws in problems.values() for w in ws)
        if entry in known:
            kept[entry] = known[entry]
    return kept


def _merge(target: dict[str, Any], parsed: Mapping[str, Any], twice: set[str], at: str) -> None:
    for key, value in parsed.items():
        name = f"{at}{key}"
        old = target.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            _merge(old, value, twice, f"{name}.")
        elif key in target:
            twice.add(name)
        else:
            target[key] = value


def salvage_lines(text: str) -> tuple[dict[str, Any], list[int], set[str]]:
    """``(table, bad line numbers, keys found more than once)`` from text that is not
    valid TOML (see the module docstring). Keys found twice are removed from the table."""
    data: dict[str, Any] = {}
    bad: list[int] = []
    twice: set[str] = set()
    table: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "\ufffd" in line:  # a byte that was not UTF-8: the value is not what was meant
            bad.append(number)
            continue
        header = _HEADER.match(line)
        if header is not None:
            table = header.group(1)
            continue
        if stripped.startswith("["):  # a header that cannot be read: its lines go nowhere
            bad.append(number)
            table = _LOST_TABLE
            continue
        if table == _LOST_TABLE:
            bad.append(number)
            continue
        try:
            parsed = tomllib.loads(line)
        except tomllib.TOMLDecodeError:
            bad.append(number)
            continue
        if table is None:
            _merge(data, parsed, twice, "")
            continue
        target = data.setdefault(table, {})
        if isinstance(target, dict):
            _merge(target, parsed, twice, f"{table}.")
        else:
            bad.append(number)
    for name in twice:
        *parents, last = name.split(".")
        holder: Any = data
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if isinstance(holder, dict):
            holder.pop(last, None)
    return data, bad, twice


@dataclass(frozen=True)
class ReadResult:
    """What a settings file's bytes hold: the best settings, what was wrong, what was
    not a setting."""

    settings: Settings
    resets: tuple[Reset, ...]
    file_problem: str | None
    unknown: tuple[str, ...]
    complete: bool
    """True when the file had every key that makes the identity (nothing was generated)."""


def _lines_words(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10]) + (", …" if len(numbers) > 10 else "")
    return f"line{'s' if len(numbers) != 1 else ''} {shown}"


def read_settings_bytes(raw: bytes, fallback: Settings | None = None) -> ReadResult:
    """The settings in a file's bytes, keeping every good key (see the module docstring).

    With ``fallback`` (a running client's settings), an invalid key keeps the fallback's
    value, and so does every key a damaged (not TOML) file lost with its lines.
    """
    problem: str | None = None
    twice: set[str] = set()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        text = raw.decode("utf-8", errors="replace")
    parsed: dict[str, Any] | None = None
    if problem is None:
        try:
            parsed = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            problem = f"not valid TOML ({exc})"
    if parsed is not None:
        data = parsed
    else:
        data, bad, twice = salvage_lines(text)
        problem = problem or "not valid TOML"
        if bad:
            problem += f"; ignored {_lines_words(bad)}"
        if fallback is not None:  # what the lost lines held stays as it runs
            data = {**{k: getattr(fallback, k) for k in KEYS}, **data}
    unknown = tuple(sorted(set(data) - set(KEYS)))
    known = {k: v for k, v in data.items() if k in KEYS}
    also = {k: f"{k} appears more than once in the damaged file" for k in twice}
    settings, resets = salvage(known, fallback, also_reset=also)
    complete = (
        "device_id" in known
        and "device_name" in known
        and not any(r.key in ("device_id", "device_name") for r in resets)
    )
    return ReadResult(settings, resets, problem, unknown, complete)
