"""The settings' one writer: update_settings (file, lock) and LiveSettings (a running client)."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

from client import settings_doc, settings_model, settings_text
from client.config import (
    ALLOWED,
    KEYS,
    LIVE_KEYS,
    SETTABLE_KEYS,
    Settings,
    SettingsError,
    load_settings,
    save_settings,
    update_settings,
)
from client.session.live_settings import LiveSettings

FIXED_ID = "3f0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11"


# --- the tables are derived from the one declaration -------------------------------------


@pytest.mark.parametrize(
    ("key", "live", "settable"),
    [
        ("server_url", True, True),
        ("device_name", True, True),
        ("device_id", False, False),
        ("battery_threshold", True, True),
        ("battery_hysteresis", True, True),
        ("paused", True, True),
        ("auth_token", True, True),
        ("autostart", True, True),
        ("ca_file", True, True),
        ("paused_until", True, False),
    ],
)
def test_each_key_is_declared_once_with_its_traits(key: str, live: bool, settable: bool) -> None:
    assert (key in LIVE_KEYS, key in SETTABLE_KEYS) == (live, settable)
    assert ALLOWED[key] == settings_model.SPECS[key].allowed
    assert settings_model.SPECS[key].about


def test_every_field_of_the_model_is_a_declared_key() -> None:
    assert set(KEYS) == set(Settings.model_fields) == set(settings_model.SPECS)


def test_the_readme_settings_table_is_current() -> None:
    readme = settings_doc.README_PATH.read_text(encoding="utf-8")
    assert settings_doc.with_table(readme) == readme, "run `python -m client.settings_doc`"
    for key in KEYS:
        assert f"| `{key}` |" in readme


def test_the_table_needs_its_markers() -> None:
    with pytest.raises(ValueError, match="the README needs the lines"):
        settings_doc.with_table("# no table here\n")


# --- update_settings: read, merge, validate, write ---------------------------------------


def test_update_changes_only_the_given_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    save_settings(Settings(device_id=FIXED_ID, device_name="a", battery_threshold=30), path)
    updated = update_settings(path, paused=True)
    assert updated.paused and updated.battery_threshold == 30 and updated.device_name == "a"
    assert load_settings(path) == updated


def test_a_refused_update_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    save_settings(Settings(device_id=FIXED_ID, device_name="a"), path)
    before = path.read_bytes()
    with pytest.raises(SettingsError, match="battery_threshold must be a whole percent"):
        update_settings(path, battery_threshold=101, paused=True)
    with pytest.raises(SettingsError, match="colour is not a setting"):
        update_settings(path, colour="red")
    assert path.read_bytes() == before


def _hammer(path: str, key: str, values: list[object]) -> None:
    for value in values:
        update_settings(Path(path), **{key: value})


def test_two_processes_changing_different_keys_never_undo_each_other(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    save_settings(Settings(device_id=FIXED_ID, device_name="start"), path)
    rounds = 100  # battery_threshold goes up to 100
    ctx = multiprocessing.get_context("spawn")
    writers = [
        ctx.Process(
            target=_hammer, args=(str(path), "battery_threshold", list(range(1, rounds + 1)))
        ),
        ctx.Process(
            target=_hammer,
            args=(str(path), "device_name", [f"name-{i}" for i in range(1, rounds + 1)]),
        ),
    ]
    for proc in writers:
        proc.start()
    for proc in writers:
        proc.join()
        assert proc.exitcode == 0
    final = load_settings(path)
    # Without the read-merge-write under one lock, one writer's older copy of the other
    # key would win now and then.
    assert (final.battery_threshold, final.device_name) == (rounds, f"name-{rounds}")
    assert final.device_id == FIXED_ID


# --- LiveSettings: the running client's settings, their one owner -----------------------


Announced = list[tuple[Settings, Settings]]


def _live(start: Settings, path: Path | None) -> tuple[LiveSettings, Announced]:
    live = LiveSettings(start, file=path, poll_interval=0.01)
    announced: Announced = []

    async def listen(old: Settings, new: Settings) -> None:
        announced.append((old, new))

    live.on_change = listen
    return live, announced


def test_live_settings_write_through_the_file_and_keep_other_processes_keys(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    start = Settings(device_id=FIXED_ID, device_name="a")
    save_settings(start, path)
    live, announced = _live(start, path)
    update_settings(path, battery_threshold=80)  # another process, not yet followed
    after = asyncio.run(live.update(paused=True))
    on_disk = load_settings(path)
    assert after.paused and on_disk.paused
    assert after.battery_threshold == on_disk.battery_threshold == 80
    assert announced == [(start, after)]


def test_a_missing_file_is_written_from_the_running_settings_not_a_new_identity(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gone" / "config.toml"
    start = Settings(device_id=FIXED_ID, device_name="a", battery_threshold=70)
    live, _ = _live(start, path)
    asyncio.run(live.update(paused=True))
    on_disk = load_settings(path)
    assert (on_disk.device_id, on_disk.battery_threshold, on_disk.paused) == (FIXED_ID, 70, True)


def test_live_settings_follow_live_keys_and_never_the_identity(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    start = Settings(device_id=FIXED_ID, device_name="a")
    save_settings(start, path)
    live, announced = _live(start, path)
    other = "0b0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11"

    async def scenario() -> None:
        await live.start_watching()
        save_settings(start.model_copy(update={"battery_threshold": 90, "device_id": other}), path)
        for _ in range(500):  # the watch polls every 10 ms; each poll is one small read
            if announced:
                break
            await asyncio.sleep(0.01)
        await live.stop()

    asyncio.run(scenario())
    assert [new.battery_threshold for _, new in announced] == [90]
    assert live.value.battery_threshold == 90
    assert live.value.device_id == FIXED_ID


def test_a_disk_that_refuses_still_applies_the_change_to_this_run(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the settings folder should be", encoding="utf-8")
    start = Settings(device_id=FIXED_ID, device_name="a")
    live, announced = _live(start, blocker / "config.toml")
    with pytest.raises(OSError):
        asyncio.run(live.update(paused=True))
    assert live.value.paused
    assert len(announced) == 1


def test_live_settings_without_a_file_validate_in_memory() -> None:
    start = Settings(device_id=FIXED_ID, device_name="a")
    live, announced = _live(start, None)
    with pytest.raises(SettingsError):
        asyncio.run(live.update(battery_threshold=-1))
    assert live.value == start and announced == []
    assert asyncio.run(live.update(autostart=True)).autostart


# --- a table setting: one folder per task ---------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("task_data.digits", "/data/digits", "/data/digits"),
        ("task_data.digits", " /data/x y ", "/data/x y"),
        ("task_data.my-task.v2", "/d", "/d"),
        ("task_data.digits", "none", None),
        ("task_data.digits", "", None),
    ],
)
def test_parse_a_task_folder(key: str, raw: str, expected: str | None) -> None:
    assert settings_text.parse_setting(key, raw) == expected


def test_a_relative_task_folder_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert settings_text.parse_setting("task_data.t", "data") == str(tmp_path / "data")


@pytest.mark.parametrize(
    ("key", "raw", "fragment"),
    [
        ("task_data", "/x", "set one entry at a time: `config set task_data.NAME VALUE`"),
        ("task_data.bad name", "/x", "'bad name' is not a task name"),
        ("task_data.t", "tab\there", "task_data.t must be a folder path"),
    ],
)
def test_bad_task_folders_are_refused(key: str, raw: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings_text.parse_setting(key, raw)
    assert fragment in str(info.value)


def test_one_task_folder_changes_and_the_others_stay(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    save_settings(Settings(device_id=FIXED_ID, device_name="a"), path)
    update_settings(path, **{"task_data.a": "/data/a"})
    update_settings(path, **{"task_data.b": "/data/b"})
    assert load_settings(path).task_data == {"a": "/data/a", "b": "/data/b"}
    update_settings(path, **{"task_data.a": None})
    assert load_settings(path).task_data == {"b": "/data/b"}
    assert "[task_data]" in path.read_text(encoding="utf-8")
