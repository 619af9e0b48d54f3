"""Tests for client.config: validation tables, parsing, the file's life cycle and recovery."""

from __future__ import annotations

import logging
import os
import stat
import tomllib
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from client import atomicfile, config
from client.config import (
    SETTABLE_KEYS,
    Settings,
    SettingsError,
    config_path,
    load_settings,
    parse_setting,
    redacted,
    save_settings,
    with_setting,
)

FIXED_ID = "3f0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11"
TOKEN = "s3cret-Token_value"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return tmp_path / "conf" / "config.toml"


def corrupt_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


# --- validation (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("server_url", "ftp://example.org"),
        ("server_url", "localhost:3001"),
        ("server_url", "http://"),
        ("server_url", "http://exa mple.org"),
        ("server_url", "http://host:99999"),
        ("server_url", ""),
        ("device_name", ""),
        ("device_name", "   "),
        ("device_name", "a" * 65),
        ("device_name", "tab\there"),
        ("device_name", "bell\x07"),
        ("device_id", "not-a-uuid"),
        ("device_id", ""),
        ("battery_threshold", -1),
        ("battery_threshold", 101),
        ("battery_threshold", "50"),
        ("battery_threshold", True),
        ("battery_hysteresis", 51),
        ("battery_hysteresis", -5),
        ("paused", "yes"),
        ("autostart", 1),
        ("auth_token", ""),
        ("auth_token", "has space"),
        ("auth_token", "x" * 513),
        ("auth_token", "line\nbreak"),
        ("ca_file", ""),
        ("ca_file", "bad\x00path"),
    ],
)
def test_invalid_values_are_refused_with_a_message_naming_the_field(
    field: str, value: object
) -> None:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate({field: value})
    message = config.explain_validation_error(info.value)
    assert message.startswith(field), message
    assert "must be" in message


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        ("server_url", "http://localhost:3001", "http://localhost:3001"),
        ("server_url", "https://fed.example.org/base", "https://fed.example.org/base"),
        ("server_url", "ws://127.0.0.1:8080", "ws://127.0.0.1:8080"),
        ("server_url", "WSS://[::1]:443", "WSS://[::1]:443"),
        ("device_name", "x", "x"),
        ("device_name", "Ana's laptop é", "Ana's laptop é"),
        ("device_name", "a" * 64, "a" * 64),
        ("device_id", FIXED_ID.upper(), FIXED_ID),
        ("battery_threshold", 0, 0),
        ("battery_threshold", 100, 100),
        ("battery_hysteresis", 50, 50),
        ("auth_token", "x" * 512, "x" * 512),
        ("ca_file", "/etc/ssl/private ca.pem", "/etc/ssl/private ca.pem"),
    ],
)
def test_valid_values_are_accepted(field: str, value: object, stored: object) -> None:
    assert getattr(Settings.model_validate({field: value}), field) == stored


DEADLINE = datetime(2026, 5, 4, 13, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (datetime(2026, 5, 4, 13, 30), "has no time zone"),  # naive: when is that?
        ("2026-05-04T13:30:00Z", "got str"),  # strict: a string is not a datetime
        (1777901400, "got int"),
    ],
)
def test_paused_until_must_be_an_aware_datetime(value: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate({"paused": True, "paused_until": value})
    message = config.explain_validation_error(info.value)
    assert message.startswith("paused_until must be a date and time with a time zone"), message
    assert fragment in message


@pytest.mark.parametrize(
    ("data", "stored"),
    [
        ({"paused": True, "paused_until": DEADLINE}, DEADLINE),
        # Another offset is the same instant, stored in UTC.
        (
            {
                "paused": True,
                "paused_until": datetime(2026, 5, 4, 15, 30, tzinfo=timezone(timedelta(hours=2))),
            },
            DEADLINE,
        ),
        ({"paused": True}, None),
        # Without a pause a deadline means nothing: dropped, not an error.
        ({"paused": False, "paused_until": DEADLINE}, None),
        ({"paused_until": DEADLINE}, None),
        ({"paused_until": datetime(2026, 5, 4, 13, 30)}, None),
    ],
)
def test_paused_until_values(data: dict[str, object], stored: datetime | None) -> None:
    value = Settings.model_validate(data).paused_until
    assert value == stored
    if value is not None:
        assert value.utcoffset() == timedelta(0)


def test_unknown_field_is_refused_by_the_model() -> None:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate({"colour": "red"})
    assert "colour is not a setting" in config.explain_validation_error(info.value)


def test_validation_error_never_shows_the_token() -> None:
    bad = "tok en-" + TOKEN
    with pytest.raises(ValidationError) as info:
        Settings(auth_token=bad)
    assert TOKEN not in config.explain_validation_error(info.value)
    assert TOKEN not in str(info.value)


def test_defaults() -> None:
    s = Settings()
    assert s.server_url == "http://localhost:3001"
    assert (s.battery_threshold, s.battery_hysteresis) == (50, 5)
    assert (s.paused, s.autostart, s.auth_token, s.ca_file) == (False, False, None, None)
    assert uuid.UUID(s.device_id).version == 4
    host, _, suffix = s.device_name.rpartition("-")
    assert host and len(suffix) == 4 and int(suffix, 16) >= 0
    assert Settings().device_id != s.device_id


# --- parse_setting / with_setting (pure) --------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("server_url", " https://h:1 ", "https://h:1"),
        ("device_name", "lab pc", "lab pc"),
        ("battery_threshold", "100", 100),
        ("battery_threshold", " 0 ", 0),
        ("battery_hysteresis", "7", 7),
        ("paused", "true", True),
        ("paused", "YES", True),
        ("paused", "1", True),
        ("paused", "on", True),
        ("paused", "false", False),
        ("paused", "No", False),
        ("paused", "0", False),
        ("autostart", "off", False),
        ("auth_token", TOKEN, TOKEN),
        ("auth_token", "none", None),
        ("auth_token", "NONE", None),
        ("auth_token", "", None),
        ("ca_file", "/tmp/ca.pem", "/tmp/ca.pem"),
        ("ca_file", "", None),
    ],
)
def test_parse_setting(key: str, raw: str, expected: object) -> None:
    assert parse_setting(key, raw) == expected


@pytest.mark.parametrize(
    ("key", "raw", "fragment"),
    [
        ("server_url", "gopher://h", "server_url must be"),
        ("server_url", "none", "server_url must be"),
        ("device_name", "", "device_name must be"),
        ("battery_threshold", "abc", "battery_threshold must be a whole percent"),
        ("battery_threshold", "50.5", "battery_threshold must be"),
        ("battery_threshold", "101", "battery_threshold must be"),
        ("battery_hysteresis", "60", "battery_hysteresis must be a whole percent from 0 to 50"),
        ("paused", "maybe", "paused must be true or false"),
        ("autostart", "", "autostart must be true or false"),
        ("auth_token", "two words", "auth_token must be"),
        ("device_id", FIXED_ID, "device_id is this device's permanent identity"),
        ("paused_until", "2026-05-04T13:30:00Z", "use `fedtray-client pause --for DURATION`"),
        ("colour", "red", "unknown setting 'colour'; valid keys: server_url"),
    ],
)
def test_parse_setting_errors(key: str, raw: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_setting(key, raw)
    assert fragment in str(info.value)


def test_unknown_key_error_lists_every_settable_key() -> None:
    with pytest.raises(SettingsError) as info:
        parse_setting("nope", "1")
    for key in SETTABLE_KEYS:
        assert key in str(info.value)
    assert "device_id" not in SETTABLE_KEYS
    assert "paused_until" not in SETTABLE_KEYS


def test_with_setting_returns_a_new_settings_and_keeps_the_old() -> None:
    before = Settings(device_id=FIXED_ID, device_name="a")
    after = with_setting(before, "battery_threshold", "80")
    assert after.battery_threshold == 80
    assert before.battery_threshold == 50
    assert after.model_dump(exclude={"battery_threshold"}) == before.model_dump(
        exclude={"battery_threshold"}
    )
    cleared = with_setting(with_setting(before, "auth_token", TOKEN), "auth_token", "none")
    assert cleared.auth_token is None


def test_redacted_hides_the_token() -> None:
    shown = redacted(Settings(auth_token=TOKEN, device_id=FIXED_ID))
    assert shown["auth_token"] == "***"
    assert TOKEN not in repr(shown)
    assert shown["device_id"] == FIXED_ID
    assert redacted(Settings())["auth_token"] is None


def test_redacted_shows_the_deadline_as_iso_8601() -> None:
    shown = redacted(Settings(paused=True, paused_until=DEADLINE))
    assert shown["paused_until"] == "2026-05-04T13:30:00+00:00"
    assert redacted(Settings(paused=True))["paused_until"] is None


# --- files ---------------------------------------------------------------------------


def test_config_path_honours_xdg_config_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "one"))
    assert config_path() == tmp_path / "one" / "fedtray" / "config.toml"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "two"))  # read at call time
    assert config_path() == tmp_path / "two" / "fedtray" / "config.toml"
    load_settings()
    assert (tmp_path / "two" / "fedtray" / "config.toml").is_file()


def test_round_trip(cfg: Path) -> None:
    s = Settings(
        server_url="wss://fed.example.org:8443/x",
        device_name="lab pc ünï",
        device_id=FIXED_ID,
        battery_threshold=100,
        battery_hysteresis=0,
        paused=True,
        auth_token=TOKEN,
        autostart=True,
        ca_file="/etc/ca bundle.pem",
    )
    save_settings(s, cfg)
    assert load_settings(cfg) == s
    minimal = Settings(device_id=FIXED_ID, device_name="n")
    save_settings(minimal, cfg)
    data = tomllib.loads(cfg.read_text("utf-8"))
    assert "auth_token" not in data and "ca_file" not in data  # TOML has no null
    assert load_settings(cfg) == minimal


def test_round_trip_of_a_timed_pause_uses_a_toml_datetime(cfg: Path) -> None:
    s = Settings(device_id=FIXED_ID, device_name="n", paused=True, paused_until=DEADLINE)
    save_settings(s, cfg)
    text = cfg.read_text("utf-8")
    assert "paused_until = 2026-05-04 13:30:00+00:00" in text  # a TOML datetime, not a string
    assert tomllib.loads(text)["paused_until"] == DEADLINE
    assert load_settings(cfg) == s
    assert not corrupt_files(cfg)
    # Unset: the key is left out, like the other optional settings.
    save_settings(s.model_copy(update={"paused": False, "paused_until": None}), cfg)
    assert "paused_until" not in tomllib.loads(cfg.read_text("utf-8"))


def test_a_naive_deadline_in_the_file_is_moved_aside_with_a_clear_warning(
    cfg: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        f'device_id = "{FIXED_ID}"\npaused = true\npaused_until = 2026-05-04T13:30:00\n',
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING):
        s, report = config.load_settings_and_report(cfg)
    # Only the bad key is reset: the pause stays, without the ambiguous deadline.
    assert (s.device_id, s.paused, s.paused_until) == (FIXED_ID, True, None)
    assert report.reset_keys == ("paused_until",)
    assert "paused_until must be a date and time with a time zone" in caplog.text
    assert len(corrupt_files(cfg)) == 1


def test_save_sets_private_modes(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "config.toml"
    save_settings(Settings(), target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700


def test_failed_replace_keeps_old_file_and_leaves_no_temp(
    cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_settings(Settings(device_id=FIXED_ID, device_name="old"), cfg)
    before = cfg.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        save_settings(Settings(device_id=FIXED_ID, device_name="new"), cfg)
    assert cfg.read_bytes() == before
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.toml"]


def test_missing_file_creates_identity_once(cfg: Path) -> None:
    first = load_settings(cfg)
    assert cfg.is_file()
    second = load_settings(cfg)
    assert (second.device_id, second.device_name) == (first.device_id, first.device_name)
    assert second == first


def test_file_without_identity_gets_one_saved(cfg: Path) -> None:
    cfg.parent.mkdir(parents=True)
    cfg.write_text('server_url = "https://h"\n')
    first = load_settings(cfg)
    assert first.server_url == "https://h"
    assert load_settings(cfg).device_id == first.device_id


def test_unknown_keys_are_ignored_with_a_warning(
    cfg: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f'device_id = "{FIXED_ID}"\ndevice_name = "n"\nfuture_knob = 3\n')
    with caplog.at_level(logging.WARNING, logger="client.config"):
        s = load_settings(cfg)
    assert s.device_id == FIXED_ID
    assert "future_knob" in caplog.text
    assert corrupt_files(cfg) == []


FIXED_NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
STAMP = "20240506T070809Z"


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_utc_now", lambda: FIXED_NOW)


@pytest.mark.parametrize(
    ("content", "problem", "salvaged"),
    [
        (b"this is = = not toml", "not valid TOML", None),
        (f'device_id = "{FIXED_ID}"\nserver_url = [\n'.encode(), "not valid TOML", FIXED_ID),
        (b"\xff\xfe garbage", "not UTF-8", None),
        (
            f'device_id = "{FIXED_ID}"\nbattery_threshold = "high"\n'.encode(),
            "battery_threshold must be",
            FIXED_ID,
        ),
        (
            f'device_id = "{FIXED_ID}"\nserver_url = "ftp://nope"\n'.encode(),
            "server_url must be",
            FIXED_ID,
        ),
        (b'device_id = "not-a-uuid"\n', "device_id must be", None),
        (b"paused = 1\n", "paused must be", None),
    ],
)
@pytest.mark.usefixtures("frozen_clock")
def test_corrupt_file_is_moved_aside_and_defaults_used(
    cfg: Path,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
    problem: str,
    salvaged: str | None,
) -> None:
    cfg.parent.mkdir(parents=True)
    cfg.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="client.config"):
        s = load_settings(cfg)
    moved = cfg.with_name(f"config.toml.corrupt-{STAMP}")
    assert moved.read_bytes() == content
    assert problem in caplog.text
    assert str(moved) in caplog.text
    assert s.model_dump(exclude={"device_id", "device_name"}) == Settings().model_dump(
        exclude={"device_id", "device_name"}
    )
    if salvaged:
        assert s.device_id == salvaged
    # The defaults were saved, so the next load is clean and keeps the same identity.
    assert load_settings(cfg) == s
    assert corrupt_files(cfg) == [moved]


def test_corrupt_file_never_clobbers_an_earlier_one(
    cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "_utc_now", lambda: FIXED_NOW)
    cfg.parent.mkdir(parents=True)
    cfg.write_bytes(b"first = = bad")
    load_settings(cfg)
    cfg.write_bytes(b"second = = bad")
    load_settings(cfg)
    contents = {p.read_bytes() for p in corrupt_files(cfg)}
    assert contents == {b"first = = bad", b"second = = bad"}


def test_unreadable_path_is_moved_aside(
    cfg: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A directory where the file should be cannot be read even by root (unlike chmod 000).
    monkeypatch.setattr(config, "_utc_now", lambda: FIXED_NOW)
    cfg.mkdir(parents=True)
    (cfg / "keep.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="client.config"):
        s = load_settings(cfg)
    moved = cfg.with_name(f"config.toml.corrupt-{STAMP}")
    assert (moved / "keep.txt").read_text() == "mine"
    assert "cannot be read" in caplog.text
    assert cfg.is_file()
    assert load_settings(cfg) == s


def test_file_that_cannot_be_moved_is_left_untouched(
    cfg: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg.parent.mkdir(parents=True)
    cfg.write_bytes(b"bad = = toml")

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    with caplog.at_level(logging.WARNING, logger="client.config"):
        s = load_settings(cfg)
    assert cfg.read_bytes() == b"bad = = toml"
    assert corrupt_files(cfg) == []
    assert "leaving the file untouched" in caplog.text
    assert s.server_url == "http://localhost:3001"


def test_load_survives_an_unwritable_directory(
    cfg: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_disk(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomicfile, "_open_temp", no_disk)  # no file can be created
    with caplog.at_level(logging.WARNING, logger="client.config"):
        s = load_settings(cfg)
    assert isinstance(s, Settings)
    assert "could not save settings" in caplog.text
    assert not cfg.exists()


def test_saved_file_is_readable_toml_with_snake_case_keys(cfg: Path) -> None:
    save_settings(Settings(device_id=FIXED_ID, device_name="n", auth_token=TOKEN), cfg)
    data = tomllib.loads(cfg.read_text("utf-8"))
    assert set(data) == {
        "server_url",
        "device_name",
        "device_id",
        "battery_threshold",
        "battery_hysteresis",
        "paused",
        "auth_token",
        "autostart",
        "while_in_use",
        "idle_after_seconds",
        "in_use_cores",
        "in_use_cpu_percent",
        "idle_cores",
        "idle_cpu_percent",
        "step_aside_cpu_percent",
        "max_temperature",
        "pause_when_fullscreen",
        "schedule",
    }
    assert data["device_id"] == FIXED_ID
    assert os.access(cfg, os.R_OK)
