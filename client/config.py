"""The one settings object and its TOML file.

Contract:

* :class:`Settings` is an immutable pydantic model; every field is validated with a
  plain-words message naming the field and what is allowed. Construction is strict
  (no silent ``"50"`` -> ``50`` coercion): strings from a command line go through
  :func:`parse_setting` / :func:`with_setting`, which convert and validate them.
* The file lives at :func:`config_path` (``platformdirs.user_config_dir("fedtray")``,
  which honours ``XDG_CONFIG_HOME`` on Linux; computed at call time).
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
    never change silently. Nothing else is
    salvaged: the original bytes stay in the moved-aside file. If the file cannot be
    moved aside, it is left untouched and defaults are used in memory only;
  - unknown keys are ignored with a warning (a newer version may have written them),
    not treated as corruption.

* :func:`save_settings` writes atomically (0600 temp file in the same directory,
  fsync, ``os.replace``), creates the directory with mode 0700 when missing, and
  raises :class:`OSError` on disk problems.
* ``paused_until`` (a timezone-aware datetime, stored in UTC; TOML writes it natively)
  is when a timed pause ends. It means something only with ``paused = true``: a model
  with ``paused = false`` drops it (so a stale deadline never lingers). It is set by
  ``fedtray-client pause --for`` and the tray's "Pause for 1 hour", never by
  :func:`parse_setting`, which refuses it with a message naming those commands.
* Validation and parsing (:class:`Settings`, :func:`parse_setting`,
  :func:`with_setting`, :func:`redacted`) do no I/O. The token is never part of
  :func:`redacted` output.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import tomllib
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import platformdirs
import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from client.atomicfile import write_atomic

__all__ = [
    "DEFAULT_SERVER_URL",
    "SETTABLE_KEYS",
    "Settings",
    "SettingsError",
    "config_path",
    "load_settings",
    "parse_setting",
    "redacted",
    "save_settings",
    "with_setting",
]

log = logging.getLogger(__name__)

APP_NAME: Final = "fedtray"
CONFIG_FILENAME: Final = "config.toml"
DEFAULT_SERVER_URL: Final = "http://localhost:3001"
URL_SCHEMES: Final = ("http", "https", "ws", "wss")
MAX_NAME_LEN: Final = 64
MAX_TOKEN_LEN: Final = 512
MAX_PATH_LEN: Final = 4096
REDACTED: Final = "***"

# What each key accepts, in plain words; used in every error message about that key.
ALLOWED: Final[Mapping[str, str]] = {
    "server_url": "an http://, https://, ws:// or wss:// URL with a host",
    "device_name": f"1 to {MAX_NAME_LEN} printable characters, not only spaces",
    "device_id": "a UUID such as 3f0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11",
    "battery_threshold": "a whole percent from 0 to 100 (100 = only when plugged in, 0 = always)",
    "battery_hysteresis": "a whole percent from 0 to 50",
    "paused": "true or false (also yes/no, on/off, 1/0)",
    "auth_token": (
        f"1 to {MAX_TOKEN_LEN} printable characters without spaces, or 'none' to clear it"
    ),
    "autostart": "true or false (also yes/no, on/off, 1/0)",
    "ca_file": "the path of a PEM CA bundle, or 'none' to clear it",
    "paused_until": "a date and time with a time zone (e.g. 2026-05-04T13:30:00Z), or unset",
}


class SettingsError(ValueError):
    """A setting value or key was refused; the message says which key and what is allowed."""


# ---------------------------------------------------------------------------
# Pure field checks. Each returns the (possibly normalised) value or raises
# ValueError with a message that names the field; the model and parse_setting
# share them so the CLI and the file get the same words.


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
    raise ValueError(f"server_url must be {ALLOWED['server_url']}, got {value!r}")


def _check_device_name(value: str) -> str:
    if 1 <= len(value) <= MAX_NAME_LEN and value.isprintable() and value.strip() != "":
        return value
    raise ValueError(f"device_name must be {ALLOWED['device_name']}, got {value!r}")


def _check_device_id(value: str) -> str:
    try:
        # Normalise to the canonical lower-case hyphenated form so one id has one spelling.
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"device_id must be {ALLOWED['device_id']}, got {value!r}") from None


def _check_threshold(value: int) -> int:
    if 0 <= value <= 100:
        return value
    raise ValueError(f"battery_threshold must be {ALLOWED['battery_threshold']}, got {value}")


def _check_hysteresis(value: int) -> int:
    if 0 <= value <= 50:
        return value
    raise ValueError(f"battery_hysteresis must be {ALLOWED['battery_hysteresis']}, got {value}")


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
    raise ValueError(f"ca_file must be {ALLOWED['ca_file']}, got {value!r}")


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


class Settings(BaseModel):
    """Everything the user can configure, plus this device's permanent identity."""

    # hide_input_in_errors: a ValidationError printed anywhere must not show the token.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, hide_input_in_errors=True)

    server_url: str = DEFAULT_SERVER_URL
    device_name: str = Field(default_factory=_new_device_name)
    device_id: str = Field(default_factory=_new_device_id)
    battery_threshold: int = 50
    battery_hysteresis: int = 5
    paused: bool = False
    auth_token: str | None = None
    autostart: bool = False
    ca_file: str | None = None
    paused_until: datetime | None = None

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

    @field_validator("server_url")
    @classmethod
    def _v_server_url(cls, v: str) -> str:
        return _check_server_url(v)

    @field_validator("device_name")
    @classmethod
    def _v_device_name(cls, v: str) -> str:
        return _check_device_name(v)

    @field_validator("device_id")
    @classmethod
    def _v_device_id(cls, v: str) -> str:
        return _check_device_id(v)

    @field_validator("battery_threshold")
    @classmethod
    def _v_threshold(cls, v: int) -> int:
        return _check_threshold(v)

    @field_validator("battery_hysteresis")
    @classmethod
    def _v_hysteresis(cls, v: int) -> int:
        return _check_hysteresis(v)

    @field_validator("auth_token")
    @classmethod
    def _v_token(cls, v: str | None) -> str | None:
        return _check_token(v)

    @field_validator("ca_file")
    @classmethod
    def _v_ca_file(cls, v: str | None) -> str | None:
        return _check_ca_file(v)

    @field_validator("paused_until")
    @classmethod
    def _v_paused_until(cls, v: datetime | None) -> datetime | None:
        return _check_paused_until(v)


KEYS: Final[tuple[str, ...]] = tuple(Settings.model_fields)
# device_id is the identity the server knows this device by; changing it would make
# the server see a new device and lose its history, so users cannot set it.
# paused_until belongs to a pause: `pause --for` sets both together, `resume` clears both.
_UNSETTABLE: Final = frozenset({"device_id", "paused_until"})
SETTABLE_KEYS: Final[tuple[str, ...]] = tuple(k for k in KEYS if k not in _UNSETTABLE)
_OPTIONAL_KEYS: Final = frozenset({"auth_token", "ca_file"})
_INT_KEYS: Final = frozenset({"battery_threshold", "battery_hysteresis"})
_BOOL_KEYS: Final = frozenset({"paused", "autostart"})
_TRUE: Final = frozenset({"true", "yes", "1", "on"})
_FALSE: Final = frozenset({"false", "no", "0", "off"})

_CHECKS: Final[Mapping[str, Callable[[Any], object]]] = {
    "server_url": _check_server_url,
    "device_name": _check_device_name,
    "battery_threshold": _check_threshold,
    "battery_hysteresis": _check_hysteresis,
    "auth_token": _check_token,
    "ca_file": _check_ca_file,
}


def explain_validation_error(exc: ValidationError) -> str:
    """One line, in plain words, for every problem in ``exc`` (each names its field)."""
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        ctx_error = err.get("ctx", {}).get("error")
        if err["type"] == "value_error" and ctx_error is not None:
            problems.append(str(ctx_error))
        elif err["type"] == "extra_forbidden":
            problems.append(f"{field} is not a setting (valid keys: {', '.join(KEYS)})")
        elif field in ALLOWED:
            got = "a secret value" if field == "auth_token" else repr(err["input"])
            kind = type(err["input"]).__name__
            problems.append(f"{field} must be {ALLOWED[field]}, got {kind} {got}")
        else:
            problems.append(f"{field}: {err['msg']}")
    return "; ".join(problems)


def parse_setting(key: str, raw: str) -> object:
    """Convert the command-line string ``raw`` to the type of setting ``key`` and validate it.

    Booleans accept true/false, yes/no, on/off, 1/0 (any case); ``none`` or an empty
    string clears an optional setting (``auth_token``, ``ca_file``). Surrounding
    whitespace is ignored. Raises :class:`SettingsError` naming the key and what is
    allowed; an unknown key lists the valid ones; ``device_id`` is refused.
    """
    if key == "device_id":
        raise SettingsError(
            "device_id is this device's permanent identity on the server and cannot be "
            "changed; delete the config file to start over as a new device"
        )
    if key == "paused_until":
        raise SettingsError(
            "paused_until is set together with the pause: use `fedtray-client pause --for "
            "DURATION` (e.g. 30m, 1h, 2h30m); `fedtray-client resume` clears it"
        )
    if key not in SETTABLE_KEYS:
        raise SettingsError(f"unknown setting {key!r}; valid keys: {', '.join(SETTABLE_KEYS)}")
    text = raw.strip()
    value: object
    if key in _OPTIONAL_KEYS and text.lower() in ("", "none"):
        return None
    if key in _BOOL_KEYS:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise SettingsError(f"{key} must be {ALLOWED[key]}, got {raw!r}")
    if key in _INT_KEYS:
        try:
            value = int(text, 10)
        except ValueError:
            raise SettingsError(f"{key} must be {ALLOWED[key]}, got {raw!r}") from None
    else:
        value = text
    try:
        return _CHECKS[key](value)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def with_setting(settings: Settings, key: str, raw: str) -> Settings:
    """A copy of ``settings`` with ``key`` set from the command-line string ``raw``.

    Raises :class:`SettingsError` exactly as :func:`parse_setting` does.
    """
    value = parse_setting(key, raw)
    data = settings.model_dump()
    data[key] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:  # pragma: no cover - parse_setting already validated
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
    # TOML has no null: optional settings that are unset are simply left out.
    body = tomli_w.dumps(settings.model_dump(exclude_none=True))
    header = "# fedtray settings; edit with `fedtray-client config set KEY VALUE`.\n"
    return (header + body).encode("utf-8")


def save_settings(settings: Settings, path: Path | None = None) -> None:
    """Write ``settings`` atomically to ``path`` (default :func:`config_path`), mode 0600.

    The parent directory is created with mode 0700 when missing. Raises :class:`OSError`
    when the disk refuses; the previous file, if any, is then left as it was and no
    temporary file is left behind.
    """
    target = path if path is not None else config_path()
    parent = target.parent
    if not parent.is_dir():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is masked by the umask; the config dir holds a token, so be exact.
        os.chmod(parent, 0o700)
    write_atomic(target, _toml_bytes(settings), mode=0o600)  # it may hold a token


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
            return _check_device_id(candidate)
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
