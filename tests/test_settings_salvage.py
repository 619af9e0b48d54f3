"""One typo resets only that key: salvage by key and by line, an unreadable file left
untouched, a running client following a file with a typo, and the report the user sees."""

from __future__ import annotations

import asyncio
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from client.config import (
    KEYS,
    SETTABLE_KEYS,
    Settings,
    SettingsReport,
    load_settings,
    load_settings_and_report,
    save_settings,
    update_settings,
)
from client.session.live_settings import LiveSettings
from client.settings_salvage import Reset, read_settings_bytes, salvage, salvage_lines
from tests.waiting import scaled

FIXED_ID = "3f0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11"
TOKEN = "s3cret-Token_value"
DEADLINE = datetime(2026, 5, 4, 13, 30, tzinfo=UTC)

#: A file with every key set, each to a valid value that is not its default.
GOOD: dict[str, Any] = {
    "server_url": "https://fed.example.org:8443",
    "device_name": "lab-pc",
    "device_id": FIXED_ID,
    "battery_threshold": 80,
    "battery_hysteresis": 10,
    "paused": True,
    "auth_token": TOKEN,
    "autostart": True,
    "ca_file": "/etc/fedtray/ca.pem",
    "paused_until": DEADLINE,
    "task_data": {"digits": "/data/digits"},
    "while_in_use": "pause",
    "idle_after_seconds": 60,
    "in_use_cores": 2,
    "in_use_cpu_percent": 30,
    "idle_cores": 4,
    "idle_cpu_percent": 80,
    "step_aside_cpu_percent": 70,
    "max_temperature": 90,
    "pause_when_fullscreen": False,
    "schedule": "22:00-07:00",
}

#: Typos a person makes, per key (values of the right type that a check refuses).
TYPOS: dict[str, object] = {
    "server_url": "localhost:3001",
    "device_name": "",
    "device_id": "not-a-uuid",
    "battery_threshold": 150,
    "battery_hysteresis": 99,
    "auth_token": "two words",
    "ca_file": "",
    "paused_until": datetime(2026, 5, 4, 13, 30),  # no time zone
    "task_data": {"digits": ""},
    "while_in_use": "slow",
    "idle_after_seconds": 2,
    "in_use_cores": -1,
    "in_use_cpu_percent": 0,
    "idle_cores": 5000,
    "idle_cpu_percent": 101,
    "step_aside_cpu_percent": 150,
    "max_temperature": 30,
    "schedule": "25:00-07:00",
}


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


def _write(path: Path, data: dict[str, Any]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = tomli_w.dumps(data).encode("utf-8")
    path.write_bytes(raw)
    return raw


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def test_the_good_file_sets_every_key_away_from_its_default() -> None:
    # Guards the tests below: a kept key must be told apart from a reset one.
    assert set(GOOD) == set(KEYS)
    default = Settings()
    good = Settings.model_validate(GOOD)
    assert all(getattr(good, k) != getattr(default, k) for k in KEYS)
    assert set(TYPOS) | {"paused", "autostart", "pause_when_fullscreen"} == set(
        KEYS
    )  # booleans have no typo


def _expect_kept(settings: Settings, bad: str) -> None:
    for key in KEYS:
        if key == bad or (bad == "paused" and key == "paused_until"):
            continue  # a deadline means nothing without the pause (the model drops it)
        assert getattr(settings, key) == getattr(Settings.model_validate(GOOD), key), key


@pytest.mark.parametrize("key", [*SETTABLE_KEYS, "device_id"])
@pytest.mark.parametrize("kind", ["wrong type", "typo"])
def test_each_bad_key_alone_keeps_every_other_key(cfg_path: Path, key: str, kind: str) -> None:
    bad: object = [1, 2] if kind == "wrong type" else TYPOS.get(key, "yes")
    original = _write(cfg_path, {**GOOD, key: bad})
    settings, report = load_settings_and_report(cfg_path)
    _expect_kept(settings, key)
    if key != "device_id":
        assert settings.device_id == FIXED_ID  # the identity is never lost to a typo
    if key in Settings.model_fields and Settings.model_fields[key].default_factory is None:
        assert getattr(settings, key) == Settings.model_fields[key].default
    # Only that key is reported, with its words; a table entry is reported alone.
    reset = "task_data.digits" if (key, kind) == ("task_data", "typo") else key
    assert report.reset_keys == (reset,)
    assert key in report.resets[0].problem and key in report.summary()
    assert TOKEN not in repr(report) and "two words" not in repr(report)
    # The original is kept aside, the repaired file saved: the next load is clean.
    (moved,) = _aside(cfg_path)
    assert moved.read_bytes() == original
    assert report.kept_aside == str(moved) and str(moved) in report.summary()
    assert load_settings_and_report(cfg_path) == (settings, SettingsReport())


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    return tmp_path / "conf" / "config.toml"


# --- pure: salvage and salvage_lines ------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fallback", "expected", "resets"),
    [
        ({"battery_threshold": 150}, None, {"battery_threshold": 50}, ["battery_threshold"]),
        # a running client keeps what it runs with instead of the default
        (
            {"battery_threshold": 150, "paused": True},
            Settings(battery_threshold=70),
            {"battery_threshold": 70, "paused": True},
            ["battery_threshold"],
        ),
        # two bad keys: both reset, each with its own words
        (
            {"server_url": "ftp://x", "battery_hysteresis": -1, "device_name": "ok"},
            None,
            {"server_url": "http://localhost:3001", "battery_hysteresis": 5, "device_name": "ok"},
            ["battery_hysteresis", "server_url"],
        ),
        # one bad entry of a table: the other entries stay
        (
            {"task_data": {"a": "/a", "b": "", "c!": "/c"}},
            None,
            {"task_data": {"a": "/a"}},
            ["task_data.b", "task_data.c!"],
        ),
        ({"paused": True, "autostart": False}, None, {"paused": True}, []),
    ],
)
def test_salvage(
    data: dict[str, Any], fallback: Settings | None, expected: dict[str, Any], resets: list[str]
) -> None:
    settings, found = salvage(data, fallback)
    assert {k: getattr(settings, k) for k in expected} == expected
    assert [r.key for r in found] == resets


def test_a_reset_token_is_never_shown() -> None:
    settings, (reset,) = salvage({"auth_token": "has space"}, Settings(auth_token=TOKEN))
    assert settings.auth_token == TOKEN
    assert reset == Reset("auth_token", reset.problem, "***")
    assert "has space" not in reset.describe()


@pytest.mark.parametrize(
    ("text", "data", "bad", "twice"),
    [
        (
            'server_url = "https://h"\nbattery_threshold = = 3\n',
            {"server_url": "https://h"},
            [2],
            [],
        ),
        # a key on two lines is trusted on neither
        (
            f'device_id = "{FIXED_ID}"\ndevice_id = "0{FIXED_ID[1:]}"\npaused = true\n[x',
            {"paused": True},
            [4],
            ["device_id"],
        ),
        # entries under their table; a header that cannot be read loses its lines only
        (
            '[task_data]\na = "/a"\nb = \n[task_data\nc = "/c"\n',
            {"task_data": {"a": "/a"}},
            [3, 4, 5],
            [],
        ),
        ('# comment\n\nname = "caf\ufffd"\nautostart = true\n', {"autostart": True}, [3], []),
    ],
)
def test_salvage_lines(text: str, data: dict[str, Any], bad: list[int], twice: list[str]) -> None:
    assert salvage_lines(text) == (data, bad, set(twice))


def test_a_file_that_is_not_toml_keeps_its_good_lines(cfg_path: Path) -> None:
    cfg_path.parent.mkdir(parents=True)
    raw = (
        f'server_url = "https://fed.example.org"\nauth_token = "{TOKEN}"\n'
        f'device_id = "{FIXED_ID}"\nbattery_threshold = 8O\n'
    ).encode()
    cfg_path.write_bytes(raw)
    settings, report = load_settings_and_report(cfg_path)
    assert (settings.server_url, settings.auth_token, settings.device_id) == (
        "https://fed.example.org",
        TOKEN,
        FIXED_ID,
    )
    assert settings.battery_threshold == 50
    assert report.file_problem is not None and "ignored line 4" in report.file_problem
    (moved,) = _aside(cfg_path)
    assert moved.read_bytes() == raw and report.kept_aside == str(moved)


def test_a_running_client_keeps_what_a_damaged_file_lost() -> None:
    running = Settings.model_validate(GOOD)
    read = read_settings_bytes(b"battery_threshold = 30\nserver_url = = \n", fallback=running)
    assert read.settings == running.model_copy(update={"battery_threshold": 30})
    assert read.file_problem is not None and "line 2" in read.file_problem


# --- the report's life -------------------------------------------------------------------

R_THRESHOLD = Reset("battery_threshold", "battery_threshold must be ..., got 150", "50")
R_URL = Reset("server_url", "server_url must be ..., got 'x'", '"http://localhost:3001"')


@pytest.mark.parametrize(
    ("before", "after", "fresh", "kept"),
    [
        # the key still holds the value it was reset to: still reported
        ({"paused": False}, {"paused": True}, [], ["battery_threshold", "server_url"]),
        # the key got a new value: the user dealt with it
        ({}, {"battery_threshold": 70}, [], ["server_url"]),
        # a new problem in the file replaces the old words for that key
        ({}, {}, [R_URL], ["server_url", "battery_threshold"]),
    ],
)
def test_a_reset_is_reported_until_its_key_gets_a_new_value(
    before: dict[str, Any], after: dict[str, Any], fresh: list[Reset], kept: list[str]
) -> None:
    report = SettingsReport(resets=(R_THRESHOLD, R_URL), kept_aside="/x.corrupt")
    old = Settings(device_id=FIXED_ID, device_name="n", **before)
    new = old.model_copy(update=after)
    carried = report.carried(old, new, SettingsReport(resets=tuple(fresh)))
    assert list(carried.reset_keys) == kept
    assert carried.kept_aside == "/x.corrupt"
    assert report.without(["battery_threshold", "server_url"]) == SettingsReport()


# --- a file that cannot be read ----------------------------------------------------------


@pytest.fixture
def unreadable(cfg_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A settings file with mode 000. Root reads any file, so for root the read of this
    one path is refused as the OS refuses it for everyone else."""
    raw = _write(cfg_path, GOOD)
    os.chmod(cfg_path, 0)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == cfg_path and stat.S_IMODE(self.stat().st_mode) & 0o444 == 0:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return raw


def _on_disk(path: Path) -> bytes:
    os.chmod(path, 0o600)
    try:
        return path.read_bytes()
    finally:
        os.chmod(path, 0)


def test_an_unreadable_file_is_left_untouched_and_said_loudly(
    cfg_path: Path, unreadable: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("ERROR", logger="client.config"):
        settings, report = load_settings_and_report(cfg_path)
    assert report.in_memory and report.file_problem is not None
    assert "Permission denied" in report.summary() and "temporary" in report.summary()
    assert "TEMPORARY" in caplog.text
    assert settings.device_id != FIXED_ID  # a temporary identity, never saved
    # Nothing writes over it: not the load, not `config set`, not a running client.
    with pytest.raises(PermissionError, match="not writing over"):
        update_settings(cfg_path, battery_threshold=90)
    live = LiveSettings(settings, file=cfg_path, poll_interval=1.0, report=report)
    with pytest.raises(OSError):
        asyncio.run(live.update(paused=False))
    assert live.value.paused is False and live.report.in_memory  # this run only
    assert _aside(cfg_path) == []
    assert _on_disk(cfg_path) == unreadable  # device_id and auth_token still there
    os.chmod(cfg_path, 0o600)  # fixed: the identity is back
    assert (load_settings(cfg_path).device_id, load_settings(cfg_path).auth_token) == (
        FIXED_ID,
        TOKEN,
    )


def test_a_directory_in_its_place_is_moved_aside(cfg_path: Path) -> None:
    cfg_path.mkdir(parents=True)
    (cfg_path / "mine.txt").write_text("mine")
    _, report = load_settings_and_report(cfg_path)
    (moved,) = _aside(cfg_path)
    assert (moved / "mine.txt").read_text() == "mine"
    assert report.kept_aside == str(moved) and not report.in_memory


def test_a_file_that_cannot_be_kept_aside_is_never_written_over(
    cfg_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _write(cfg_path, {**GOOD, "battery_threshold": 150})

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    settings, report = load_settings_and_report(cfg_path)
    assert settings.server_url == GOOD["server_url"] and report.in_memory
    with pytest.raises(PermissionError):
        update_settings(cfg_path, paused=False)
    assert cfg_path.read_bytes() == raw


# --- a running client: a typo in the file while it runs ----------------------------------


def test_a_typo_while_running_applies_every_other_key_and_tells(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    start = Settings(device_id=FIXED_ID, device_name="a", battery_threshold=70)
    save_settings(start, path)
    live = LiveSettings(start, file=path, poll_interval=0.01)
    reports: list[SettingsReport] = []
    live.on_report = reports.append
    edited = {**start.model_dump(exclude_none=True), "server_url": "https://new.example"}

    async def until(what: Any) -> None:
        for _ in range(int(scaled(5.0) / 0.01)):
            if what():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the watch did not follow the file")

    async def scenario() -> None:
        await live.start_watching()
        _write(path, {**edited, "battery_threshold": 150, "device_name": "b"})
        await until(lambda: live.value.server_url == "https://new.example")
        assert live.value.device_name == "b"
        assert live.value.battery_threshold == 70  # the running value, not a jump to 50
        assert live.report.reset_keys == ("battery_threshold",)
        assert "now 70" in live.report.lines()[0]
        # Fixed in the file: the report clears.
        _write(path, {**edited, "battery_threshold": 60, "device_name": "b"})
        await until(lambda: live.value.battery_threshold == 60)
        await until(lambda: live.report.ok)
        await live.stop()

    asyncio.run(scenario())
    assert [r.reset_keys for r in reports] == [("battery_threshold",), ()]
    assert (
        path.read_bytes()
        == tomli_w.dumps({**edited, "battery_threshold": 60, "device_name": "b"}).encode()
    )  # the watch never writes


def test_a_pause_while_the_file_has_a_typo_reports_the_repair(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    start = Settings(device_id=FIXED_ID, device_name="a")
    _write(path, {**start.model_dump(exclude_none=True), "battery_threshold": 150})
    live = LiveSettings(start, file=path, poll_interval=1.0)
    asyncio.run(live.update(paused=True))
    assert live.value.paused
    assert live.report.reset_keys == ("battery_threshold",)
    assert live.report.kept_aside is not None and Path(live.report.kept_aside).exists()
    asyncio.run(live.update(battery_threshold=80))  # set by the user: dealt with
    assert live.report.ok


def test_the_session_shows_the_report_in_its_snapshot(tmp_path: Path) -> None:
    from client.session import DistributedClient

    report = SettingsReport(resets=(R_THRESHOLD,), kept_aside="/x.corrupt")
    client = DistributedClient(
        Settings(device_id=FIXED_ID, device_name="a"),
        settings_file=None,
        data_dir=tmp_path / "data",
        settings_report=report,
    )
    assert client.snapshot().settings_report == report
    later = SettingsReport(resets=(R_THRESHOLD, R_URL))
    client._session.settings.on_report(later)  # as LiveSettings announces it
    assert client.snapshot().settings_report == later
