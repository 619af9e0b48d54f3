"""The settings, declared once: each key's type, default, words and whether it applies live.

Contract:

* :class:`Settings` is an immutable pydantic model; every field is validated with a
  plain-words message naming the field and what is allowed. Construction is strict
  (no silent ``"50"`` -> ``50`` coercion): strings from a command line go through
  :mod:`client.settings_text`, which convert and validate them.
* Each field is declared ONCE, as ``Annotated[type, Key(...), AfterValidator(check)] =
  default``: :class:`Key` holds what the key accepts (in the words every error message
  uses), what it does, whether a running session applies a change at once (``live``)
  and, for the keys ``config set`` may not change, why. Every other table is derived
  from the model: :data:`KEYS`, :data:`ALLOWED`, :data:`LIVE_KEYS`,
  :data:`SETTABLE_KEYS`, how :func:`client.settings_text.parse_setting` reads a string
  (from the field's type) and which check it runs (the field's own validator). Adding a
  setting is one field here.
* ``paused_until`` (a timezone-aware datetime, stored in UTC) is when a timed pause
  ends. It means something only with ``paused = true``: a model with ``paused = false``
  drops it (so a stale deadline never lingers).
* Everything here is pure (no I/O); the file lives in :mod:`client.config`. The token
  never appears in an error message or in :func:`redacted` output.
"""

from __future__ import annotations

import re
import secrets
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, get_origin
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from client.schedule import SCHEDULE_WORDS, parse_schedule

__all__ = [
    "ALLOWED",
    "DEFAULT_SERVER_URL",
    "KEYS",
    "LIVE_KEYS",
    "SETTABLE_KEYS",
    "TABLE_KEYS",
    "WHILE_IN_USE",
    "Key",
    "Settings",
    "SettingsError",
    "explain_validation_error",
    "redacted",
    "validation_problems",
    "with_changes",
]

DEFAULT_SERVER_URL: Final = "http://localhost:3001"
URL_SCHEMES: Final = ("http", "https", "ws", "wss")
MAX_NAME_LEN: Final = 64
MAX_TOKEN_LEN: Final = 512
MAX_PATH_LEN: Final = 4096
MAX_TASK_FOLDERS: Final = 256
REDACTED: Final = "***"
#: What ``while_in_use`` may be: pause, a light budget, or the idle (full) budget.
WHILE_IN_USE: Final = ("pause", "light", "full")
MAX_CORES: Final = 1024
_CORES_WORDS: Final = f"a whole number of cores from 0 to {MAX_CORES} (0 = all but one)"
_SHARE_WORDS: Final = "a whole percent from 1 to 100"


class SettingsError(ValueError):
    """A setting value or key was refused; the message says which key and what is allowed."""


@dataclass(frozen=True)
class Key:
    """What one setting is, beside its type and default (declared in :class:`Settings`)."""

    allowed: str
    """What the key accepts, in plain words; every error message about the key uses it."""
    about: str
    """What the key does, for help texts."""
    live: bool
    """A running session applies a change at once (else at the next start)."""
    fixed: str | None = None
    """Why ``config set`` cannot change the key, or None when it can."""
    default_words: str | None = None
    """The default in words, when it is made at first start (else the field's default)."""


# ---------------------------------------------------------------------------
# Pure field checks. Each returns the (possibly normalised) value or raises ValueError
# with a message that names the field and uses the field's ``Key.allowed`` words.


def _refusal(key: str, value: object) -> ValueError:
    return ValueError(f"{key} must be {ALLOWED[key]}, got {value!r}")


def _check_server_url(value: str) -> str:
    ok = not any(ch.isspace() or not ch.isprintable() for ch in value)
    if ok:
        try:
            parts = urlsplit(value)
            _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
            ok = parts.scheme.lower() in URL_SCHEMES and bool(parts.hostname)
        except ValueError:
            ok = False
    if ok:
        return value
    raise _refusal("server_url", value)


def _check_device_name(value: str) -> str:
    if 1 <= len(value) <= MAX_NAME_LEN and value.isprintable() and value.strip() != "":
        return value
    raise _refusal("device_name", value)


def check_device_id(value: str) -> str:
    try:
        # Normalise to the canonical lower-case hyphenated form so one id has one spelling.
        return str(uuid.UUID(value))
    except ValueError:
        raise _refusal("device_id", value) from None


def _percent_check(key: str, highest: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if 0 <= value <= highest:
            return value
        raise ValueError(f"{key} must be {ALLOWED[key]}, got {value}")

    return check


def _range_check(key: str, lowest: int, highest: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if lowest <= value <= highest:
            return value
        raise ValueError(f"{key} must be {ALLOWED[key]}, got {value}")

    return check


def _check_while_in_use(value: str) -> str:
    if value in WHILE_IN_USE:
        return value
    raise _refusal("while_in_use", value)


def _check_schedule(value: str) -> str:
    window = parse_schedule(value)  # ValueError names the key and the form
    return "" if window is None else str(window)


def _check_temperature(value: int) -> int:
    if value == 0 or 40 <= value <= 110:
        return value
    raise _refusal("max_temperature", value)


def _check_token(value: str | None) -> str | None:
    if value is None:
        return None
    if (
        1 <= len(value) <= MAX_TOKEN_LEN
        and value.isprintable()
        and not any(ch.isspace() for ch in value)
    ):
        return value
    # Never echo the token itself, even a malformed one.
    raise ValueError(f"auth_token must be {ALLOWED['auth_token']} (got {len(value)} characters)")


def _check_ca_file(value: str | None) -> str | None:
    if value is None:
        return None
    if 1 <= len(value) <= MAX_PATH_LEN and value.isprintable() and value.strip() != "":
        return value
    raise _refusal("ca_file", value)


_TASK_NAME: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def _check_folder(key: str, value: str) -> str:
    if 1 <= len(value) <= MAX_PATH_LEN and value.isprintable() and value.strip() != "":
        return value
    raise ValueError(f"{key} must be a folder path, got {value!r}")


def _check_task_data(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_TASK_FOLDERS:
        raise ValueError(f"task_data holds at most {MAX_TASK_FOLDERS} tasks, got {len(value)}")
    for task, folder in value.items():
        if not _TASK_NAME.match(task):
            raise ValueError(f"task_data: {task!r} is not a task name ({ALLOWED['task_data']})")
        _check_folder(f"task_data.{task}", folder)
    return value


def _check_paused_until(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"paused_until must be {ALLOWED['paused_until']}: {value.isoformat()} has no "
            "time zone, so when it ends is ambiguous"
        )
    # One spelling for one instant: the file always says UTC.
    return value.astimezone(UTC)


def _new_device_id() -> str:
    return str(uuid.uuid4())


def _new_device_name() -> str:
    """Short hostname plus a short random suffix, e.g. ``myhost-3f9a``."""
    try:
        host = socket.gethostname()
    except OSError:  # pragma: no cover - gethostname practically never fails
        host = ""
    short = "".join(ch for ch in host.split(".")[0] if ch.isprintable() and not ch.isspace())
    short = short[: MAX_NAME_LEN - 5] or "device"
    return f"{short}-{secrets.token_hex(2)}"


_BOOL_WORDS: Final = "true or false (also yes/no, on/off, 1/0)"


class Settings(BaseModel):
    """Everything the user can configure, plus this device's permanent identity."""

    # hide_input_in_errors: a ValidationError printed anywhere must not show the token.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, hide_input_in_errors=True)

    server_url: Annotated[
        str,
        Key(
            "an http://, https://, ws:// or wss:// URL with a host",
            "http/https/ws/wss URL of the training server",
            live=True,
        ),
        AfterValidator(_check_server_url),
    ] = DEFAULT_SERVER_URL
    device_name: Annotated[
        str,
        Key(
            f"1 to {MAX_NAME_LEN} printable characters, not only spaces",
            "shown to the server's operator (1–64 characters)",
            live=True,
            default_words="host name + suffix",
        ),
        AfterValidator(_check_device_name),
    ] = Field(default_factory=_new_device_name)
    device_id: Annotated[
        str,
        Key(
            "a UUID such as 3f0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11",
            "the device's identity on the server; never changes",
            live=False,
            default_words="a UUID, generated once",
            fixed=(
                "device_id is this device's permanent identity on the server and cannot be "
                "changed; delete the config file to start over as a new device"
            ),
        ),
        AfterValidator(check_device_id),
    ] = Field(default_factory=_new_device_id)
    battery_threshold: Annotated[
        int,
        Key(
            "a whole percent from 0 to 100 (100 = only when plugged in, 0 = always)",
            "train on battery only above this percent (100: only when plugged in; 0: always)",
            live=True,
        ),
        AfterValidator(_percent_check("battery_threshold", 100)),
    ] = 50
    battery_hysteresis: Annotated[
        int,
        Key(
            "a whole percent from 0 to 50",
            "after a low-battery pause, resume at threshold + this",
            live=True,
        ),
        AfterValidator(_percent_check("battery_hysteresis", 50)),
    ] = 5
    paused: Annotated[
        bool, Key(_BOOL_WORDS, "the user's pause, kept across restarts", live=True)
    ] = False
    auth_token: Annotated[
        str | None,
        Key(
            f"1 to {MAX_TOKEN_LEN} printable characters without spaces, or 'none' to clear it",
            "token the server requires, if any (never printed)",
            live=True,
        ),
        AfterValidator(_check_token),
    ] = None
    autostart: Annotated[
        bool, Key(_BOOL_WORDS, "start the tray app at login (the tray's menu follows)", live=True)
    ] = False
    ca_file: Annotated[
        str | None,
        Key(
            "the path of a PEM CA bundle, or 'none' to clear it",
            "a private CA bundle to trust for `https://` servers",
            live=True,
        ),
        AfterValidator(_check_ca_file),
    ] = None
    paused_until: Annotated[
        datetime | None,
        Key(
            "a date and time with a time zone (e.g. 2026-05-04T13:30:00Z), or unset",
            (
                "when a timed pause ends (UTC date-time; set by `fedtray-client pause --for "
                '1h` / `--until-tomorrow` or the tray\'s "Pause for a while", cleared by '
                "`resume`; the client resumes by itself then, even after a restart)"
            ),
            live=True,
            fixed=(
                "paused_until is set together with the pause: use `fedtray-client pause --for "
                "DURATION` (e.g. 30m, 1h, 2h30m); `fedtray-client resume` clears it"
            ),
        ),
        AfterValidator(_check_paused_until),
    ] = None

    task_data: Annotated[
        dict[str, str],
        Key(
            "task names with a folder each (task_data.NAME = /path/to/folder)",
            (
                "the folder with this device's own data for a task whose data stays on the "
                "device (`config set task_data.NAME FOLDER`; `none` removes it)"
            ),
            live=True,
            default_words="no folders",
        ),
        AfterValidator(_check_task_data),
    ] = Field(default_factory=dict)

    while_in_use: Annotated[
        str,
        Key(
            "pause, light or full",
            "while you use the computer: pause training, train lightly (in_use_cores at "
            "in_use_cpu_percent) or at full (idle) budget",
            live=True,
        ),
        AfterValidator(_check_while_in_use),
    ] = "light"
    idle_after_seconds: Annotated[
        int,
        Key("a whole number of seconds from 5 to 86400", "no input for this long = idle", True),
        AfterValidator(_range_check("idle_after_seconds", 5, 86400)),
    ] = 180
    in_use_cores: Annotated[
        int,
        Key(_CORES_WORDS, "cores (torch threads) training uses while you use the computer", True),
        AfterValidator(_range_check("in_use_cores", 0, MAX_CORES)),
    ] = 1
    in_use_cpu_percent: Annotated[
        int,
        Key(_SHARE_WORDS, "share of those cores' time training uses while in use", True),
        AfterValidator(_range_check("in_use_cpu_percent", 1, 100)),
    ] = 50
    idle_cores: Annotated[
        int,
        Key(
            _CORES_WORDS,
            "cores (torch threads) training uses while the computer is idle (0: all but one)",
            True,
            default_words="0 (all but one)",
        ),
        AfterValidator(_range_check("idle_cores", 0, MAX_CORES)),
    ] = 0
    idle_cpu_percent: Annotated[
        int,
        Key(_SHARE_WORDS, "share of those cores' time training uses while idle", True),
        AfterValidator(_range_check("idle_cpu_percent", 1, 100)),
    ] = 100
    step_aside_cpu_percent: Annotated[
        int,
        Key(
            "a whole percent from 0 to 100 (0 = off)",
            "pause while other programs use more than this share of the whole CPU (0: off)",
            True,
        ),
        AfterValidator(_range_check("step_aside_cpu_percent", 0, 100)),
    ] = 50
    max_temperature: Annotated[
        int,
        Key(
            "a whole number of degrees Celsius from 40 to 110, or 0 (off)",
            "pause when the CPU is this hot (°C); resume 10 °C lower (0: off)",
            True,
        ),
        AfterValidator(_check_temperature),
    ] = 85
    pause_when_fullscreen: Annotated[
        bool, Key(_BOOL_WORDS, "pause while a full-screen app or game is in front", True)
    ] = True
    schedule: Annotated[
        str,
        Key(
            SCHEDULE_WORDS,
            'train only inside this daily window (e.g. "22:00-07:00"; "": any time)',
            True,
            default_words="any time",
        ),
        AfterValidator(_check_schedule),
    ] = ""

    @model_validator(mode="before")
    @classmethod
    def _drop_deadline_when_not_paused(cls, data: Any) -> Any:
        # A deadline without a pause means nothing; keeping it would make a later plain
        # pause end by itself. Only an explicit `paused = false` drops it (a wrong type
        # for `paused` still fails validation with its own message).
        stale = isinstance(data, dict) and data.get("paused", False) is False
        if stale and data.get("paused_until") is not None:
            data = {**data, "paused_until": None}
        return data


# ---------------------------------------------------------------------------
# Tables derived from the declaration above.


def _key_of(name: str) -> Key:
    (key,) = (m for m in Settings.model_fields[name].metadata if isinstance(m, Key))
    return key


KEYS: Final[tuple[str, ...]] = tuple(Settings.model_fields)
SPECS: Final[Mapping[str, Key]] = {name: _key_of(name) for name in KEYS}
ALLOWED: Final[Mapping[str, str]] = {name: spec.allowed for name, spec in SPECS.items()}
#: Settings a running session applies when they change.
LIVE_KEYS: Final[tuple[str, ...]] = tuple(name for name in KEYS if SPECS[name].live)
#: Settings that are tables of entries, changed one entry at a time (``task_data.NAME``).
TABLE_KEYS: Final = frozenset(
    n for n in KEYS if get_origin(Settings.model_fields[n].annotation) is dict
)
#: Settings ``config set`` may change.
SETTABLE_KEYS: Final[tuple[str, ...]] = tuple(n for n in KEYS if SPECS[n].fixed is None)


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(key, words)`` for every problem in ``exc``: the top-level settings key it is
    about (``""`` for the whole table) and one plain-words sentence naming the field."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        key = str(err["loc"][0]) if err["loc"] else ""
        ctx_error = err.get("ctx", {}).get("error")
        if err["type"] == "value_error" and ctx_error is not None:
            words = str(ctx_error)
        elif err["type"] == "extra_forbidden":
            words = f"{field} is not a setting (valid keys: {', '.join(KEYS)})"
        elif field in ALLOWED:
            got = "a secret value" if field == "auth_token" else repr(err["input"])
            kind = type(err["input"]).__name__
            words = f"{field} must be {ALLOWED[field]}, got {kind} {got}"
        else:
            words = f"{field}: {err['msg']}"
        problems.append((key, words))
    return problems


def explain_validation_error(exc: ValidationError) -> str:
    """One line, in plain words, for every problem in ``exc`` (each names its field)."""
    return "; ".join(words for _, words in validation_problems(exc))


def with_changes(settings: Settings, changes: Mapping[str, object]) -> Settings:
    """A validated copy of ``settings`` with typed ``changes`` applied (pure).

    A key ``TABLE.ENTRY`` (e.g. ``task_data.digits``) sets one entry of a table setting,
    or removes it when the value is None, keeping the table's other entries. Raises
    :class:`SettingsError` listing every problem (unknown keys included); the given
    ``settings`` are never changed.
    """
    data = settings.model_dump()
    for key, value in changes.items():
        table, dot, entry = key.partition(".")
        if dot and table in TABLE_KEYS:
            entries = dict(data[table])
            if value is None:
                entries.pop(entry, None)
            else:
                entries[entry] = value
            data[table] = entries
        else:
            data[key] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(explain_validation_error(exc)) from None


def redacted(settings: Settings) -> dict[str, object]:
    """The settings as a plain dict for display, with the auth token replaced by ``***``.

    ``paused_until`` is an ISO 8601 string (UTC), so the dict is JSON-ready.
    """
    data: dict[str, object] = settings.model_dump()
    if data.get("auth_token") is not None:
        data["auth_token"] = REDACTED
    if settings.paused_until is not None:
        data["paused_until"] = settings.paused_until.isoformat()
    return data
