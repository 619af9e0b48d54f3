"""Single instance, settings form validation, the CLI and the app logic with fakes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from client import __version__
from client.config import (
    ALLOWED,
    Settings,
    SettingsError,
    load_settings,
    save_settings,
    update_settings,
)
from client.snapshot import ClientSnapshot
from tests.waiting import holds_for, scaled
from tray import single_instance
from tray.app import TICK_S, TrayApp
from tray.autostart import AutostartEnv
from tray.menu import MenuEntry, MenuNode, find_entry
from tray.settings_dialog import validate_form

ROOT = Path(__file__).resolve().parent.parent


# -- single instance -------------------------------------------------------------------


def test_second_lock_is_refused_and_asks_first_to_show(tmp_path: Path) -> None:
    first = single_instance.acquire(tmp_path)
    assert not first.take_show_request()
    # A separate process, as a second launch would be (flock is per open file).
    code = (
        "import sys; from pathlib import Path; from tray import single_instance as s\n"
        "try:\n    s.acquire(Path(sys.argv[1]))\nexcept s.AlreadyRunningError as e:\n"
        "    print(e); sys.exit(1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert f"already running (process {os.getpid()})" in proc.stdout
    assert first.take_show_request()
    assert not first.take_show_request()  # once per request
    first.release()
    first.release()
    again = single_instance.acquire(tmp_path)  # released: a new tray may start
    again.release()


def test_stale_lock_file_does_not_block(tmp_path: Path) -> None:
    (tmp_path / single_instance.LOCK_FILENAME).write_text("999999\n", encoding="ascii")
    (tmp_path / single_instance.SHOW_REQUEST_FILENAME).touch()
    lock = single_instance.acquire(tmp_path)
    assert not lock.take_show_request()  # an old request is dropped at start
    assert (tmp_path / single_instance.LOCK_FILENAME).read_text() == f"{os.getpid()}\n"
    lock.release()


# -- settings form -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "name", "token", "expected"),
    [
        (
            "https://fed.example:8443",
            "my pc",
            "s3cret",
            ("https://fed.example:8443", "my pc", "s3cret"),
        ),
        (" http://h:1 ", "pc", "", ("http://h:1", "pc", None)),
        ("http://h:1", "pc", "none", ("http://h:1", "pc", None)),
    ],
)
def test_validate_form_accepts(
    url: str, name: str, token: str, expected: tuple[str, str, str | None]
) -> None:
    changes = validate_form(url, name, token)
    assert changes == dict(zip(("server_url", "device_name", "auth_token"), expected, strict=True))


def test_validate_form_sets_or_removes_a_task_folder() -> None:
    changes = validate_form("http://h:1", "pc", "", "digits", "/data/digits")
    assert changes["task_data.digits"] == "/data/digits"
    assert validate_form("http://h:1", "pc", "", "digits", "")["task_data.digits"] is None
    assert not any(k.startswith("task_data") for k in validate_form("http://h:1", "pc", ""))
    with pytest.raises(SettingsError, match="'no good' is not a task name"):
        validate_form("http://h:1", "pc", "", "no good", "/x")


@pytest.mark.parametrize(
    ("typed", "saved"),
    [("22:00-07:00", "22:00-07:00"), (" 9:00 – 17:30 ", "09:00-17:30"), ("", ""), ("  ", "")],
)
def test_validate_form_schedule(typed: str, saved: str) -> None:
    assert validate_form("http://h:1", "pc", "", schedule=typed)["schedule"] == saved
    assert "schedule" not in validate_form("http://h:1", "pc", "")  # not shown: unchanged


@pytest.mark.parametrize("typed", ["22-07", "10pm-7am", "25:00-07:00", "22:00"])
def test_validate_form_refuses_a_bad_schedule_with_the_form(typed: str) -> None:
    with pytest.raises(SettingsError) as info:
        validate_form("http://h:1", "pc", "", schedule=typed)
    # One line naming the field and the form it wants (the setting's own words).
    (line,) = str(info.value).splitlines()
    assert line.startswith("schedule must be ") and ALLOWED["schedule"] in line
    assert "22:00-07:00" in line and repr(typed) in line


def test_validate_form_lists_every_problem_without_the_token() -> None:
    with pytest.raises(SettingsError) as info:
        validate_form("ftp://x", "   ", "has space secret")
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("server_url must be")
    assert lines[1].startswith("device_name must be")
    assert lines[2].startswith("auth_token must be")
    assert "secret" not in str(info.value)


# -- command line ----------------------------------------------------------------------


def test_version_starts_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tray", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"fedtray {__version__}"


def test_tray_never_imports_torch() -> None:
    code = (
        "import sys, tray.app, tray.__main__, tray.settings_dialog, client.session\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# -- app logic with a fake session and a fake icon ------------------------------------


class FakeClient:
    """Records calls; like the real session, owns the settings: it saves changes and the
    user's pause to ``config`` and publishes the settings it runs with in the snapshot."""

    def __init__(self, snapshot: ClientSnapshot, config: Path) -> None:
        self.snap = snapshot
        self.config = config
        self.calls: list[str] = []
        self.untils: list[datetime | None] = []
        self.subscribers: list[Callable[[ClientSnapshot], None]] = []
        self.changes: list[dict[str, object]] = []

    def _save(self, **changes: object) -> Settings:
        saved = update_settings(self.config, **changes)
        self.publish(settings=saved)
        return saved

    def follow_file(self) -> None:
        """What the session does when another process changed the settings file."""
        self.publish(settings=load_settings(self.config))

    def start(self) -> None:
        self.calls.append("start")

    def stop(self, timeout: float = 15.0) -> bool:
        self.calls.append("stop")
        return True

    def connect(self) -> None:
        self.calls.append("connect")

    def disconnect(self) -> None:
        self.calls.append("disconnect")

    def pause(self, until: datetime | None = None) -> None:
        self.untils.append(until)
        self._save(paused=True, paused_until=until)
        self.calls.append("pause")

    def resume(self) -> None:
        self._save(paused=False, paused_until=None)
        self.calls.append("resume")

    def end_timed_pause(self) -> None:
        """What the session does when ``paused_until`` passes: clear it, resume, publish."""
        self._save(paused=False, paused_until=None)
        self.publish(device_state="idle", pause_reason=None)

    def update_settings(self, **changes: object) -> Future[Settings]:
        self.changes.append(changes)
        done: Future[Settings] = Future()
        done.set_result(self._save(**changes))
        return done

    def snapshot(self) -> ClientSnapshot:
        return self.snap

    def subscribe(self, callback: Callable[[ClientSnapshot], None]) -> Callable[[], None]:
        self.subscribers.append(callback)
        callback(self.snap)
        return lambda: None

    def publish(self, **changes: Any) -> None:
        self.snap = replace(self.snap, **changes)
        for cb in self.subscribers:
            cb(self.snap)


class FakeIcon:
    has_menu = True

    def __init__(self) -> None:
        self.images: list[Image.Image] = []
        self.titles: list[str] = []
        self.menus: list[tuple[MenuNode, ...]] = []
        self.notes: list[tuple[str, str]] = []
        self.stopped = threading.Event()
        self.on_action: Callable[[MenuEntry], None] | None = None

    def set_image(self, image: Image.Image) -> None:
        self.images.append(image)

    def set_title(self, title: str) -> None:
        self.titles.append(title)

    def set_menu(self, menu: tuple[MenuNode, ...], on_action: Callable[[MenuEntry], None]) -> None:
        self.menus.append(menu)
        self.on_action = on_action

    def notify(self, title: str, message: str) -> None:
        self.notes.append((title, message))

    def run(self, setup: Callable[[], None]) -> None:
        setup()
        assert self.stopped.wait(scaled(20)), "the app did not quit"

    def stop(self) -> None:
        self.stopped.set()

    def click(self, label: str) -> None:
        entry = find_entry(self.menus[-1], label)
        assert entry is not None and entry.enabled, label
        assert self.on_action is not None
        self.on_action(entry)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    done = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        done.wait(0.02)


@pytest.fixture
def app_parts(tmp_path: Path) -> tuple[TrayApp, FakeClient, FakeIcon, Clock, Path]:
    config = tmp_path / "config.toml"
    settings = Settings(server_url="http://127.0.0.1:3001", device_name="pc")
    save_settings(settings, config)
    client = FakeClient(ClientSnapshot(settings=settings, connection="connecting"), config)
    icon = FakeIcon()
    clock = Clock()
    app = TrayApp(
        client,
        icon,
        log_dir=tmp_path,
        config_file=config,
        autostart_env=AutostartEnv("linux", tmp_path, ("fedtray",), xdg_config_home=tmp_path / "x"),
        clock=clock,
        wall_clock=lambda: datetime(2026, 5, 4, 14, 30),
    )
    return app, client, icon, clock, config


def run_app(app: TrayApp) -> threading.Thread:
    box: dict[str, int] = {}
    thread = threading.Thread(target=lambda: box.setdefault("code", app.run()), daemon=True)
    thread.start()
    return thread


def test_app_follows_session_and_menu_drives_it(
    app_parts: tuple[TrayApp, FakeClient, FakeIcon, Clock, Path], tmp_path: Path
) -> None:
    app, client, icon, clock, config = app_parts
    thread = run_app(app)
    wait_until(lambda: "start" in client.calls, "session start")
    assert icon.titles[-1] == "Connecting to 127.0.0.1:3001…"
    client.publish(connection="connected")
    wait_until(lambda: icon.titles[-1].startswith("fedtray — connected"), "connected title")
    wait_until(lambda: [t for t, _ in icon.notes] == ["fedtray is connected"], "notification")
    images_before = len(icon.images)

    icon.click("Pause training")
    wait_until(lambda: client.calls[-1] == "pause", "pause")
    client.publish(device_state="paused", pause_reason="user_paused")
    wait_until(lambda: find_entry(icon.menus[-1], "Resume training") is not None, "resume item")
    assert len(icon.images) == images_before + 1  # the paused icon
    icon.click("Resume training")
    wait_until(lambda: client.calls[-1] == "resume", "resume")

    # Pause for a while, 1 hour: the session gets the deadline (the wall clock says
    # 14:30 local)...
    icon.click("1 hour")
    wait_until(lambda: client.calls[-1] == "pause", "snooze pause")
    assert client.untils[-1] == datetime(2026, 5, 4, 15, 30).astimezone(UTC)
    assert load_settings(config).paused_until == datetime(2026, 5, 4, 15, 30).astimezone(UTC)
    client.publish(device_state="paused", pause_reason="user_paused")
    wait_until(lambda: icon.titles[-1] == "Paused by you until 15:30", "snooze title")
    # ...and the session, not the tray, ends it: the tray keeps no timer of its own.
    clock.t += 2 * 3600.0
    app._wake.set()
    # The wake-up runs the tray's loop at once; wait half a tick more (scaled: a busy
    # machine may run that loop late).
    holds_for(
        lambda: client.calls[-1] == "pause", scaled(1.5 * TICK_S), "no resume from the tray's clock"
    )
    client.end_timed_pause()
    wait_until(lambda: icon.titles[-1].startswith("fedtray — connected"), "resumed title")
    wait_until(lambda: find_entry(icon.menus[-1], "Pause training") is not None, "pause item")
    assert load_settings(config).paused_until is None

    # 3 hours and until tomorrow: the deadline the label promised (wall clock 14:30 Mon).
    def deadline_saved(local: datetime, what: str) -> None:
        expected = local.astimezone(UTC)
        wait_until(lambda: load_settings(config).paused_until == expected, what)
        assert client.untils[-1] == expected

    icon.click("3 hours (until 17:30)")
    deadline_saved(datetime(2026, 5, 4, 17, 30), "3 hours")
    icon.click("Until tomorrow (Tue 07:00)")
    deadline_saved(datetime(2026, 5, 5, 7, 0), "until tomorrow")
    # With a schedule, tomorrow means tomorrow's window.
    update_settings(config, schedule="22:00-07:00")
    client.follow_file()
    wait_until(lambda: find_entry(icon.menus[-1], "Until tomorrow (Tue 22:00)") is not None, "")
    icon.click("Until tomorrow (Tue 22:00)")
    deadline_saved(datetime(2026, 5, 5, 22, 0), "until tomorrow night")
    assert len(client.untils) == 5  # plain pause, then one call per snooze
    client.publish(device_state="paused", pause_reason="user_paused")
    wait_until(lambda: find_entry(icon.menus[-1], "Resume training") is not None, "resume")
    icon.click("Resume training")
    wait_until(lambda: client.calls[-1] == "resume", "resume after the snoozes")
    client.publish(device_state="idle", pause_reason=None)
    assert load_settings(config).paused_until is None

    # While I'm using this computer: asks the session to change while_in_use.
    def in_use_checked() -> list[str]:
        sub = find_entry(icon.menus[-1], "While I'm using this computer")
        assert sub is not None
        return [n.label for n in sub.submenu if isinstance(n, MenuEntry) and n.checked]

    assert in_use_checked() == ["Light"]
    icon.click("Full")
    wait_until(lambda: load_settings(config).while_in_use == "full", "while_in_use saved")
    assert client.changes[-1] == {"while_in_use": "full"}
    wait_until(lambda: in_use_checked() == ["Full"], "the radio follows the session")

    icon.click("Above 80 %")
    wait_until(lambda: load_settings(config).battery_threshold == 80, "threshold saved")
    assert client.changes[-1] == {"battery_threshold": 80}  # asked the session, once
    wait_until(
        lambda: find_entry(icon.menus[-1], "Above 80 %").checked is True,  # type: ignore[union-attr]
        "the menu shows the session's new threshold",
    )

    icon.click("Start at login")
    desktop = tmp_path / "x" / "autostart" / "fedtray.desktop"
    wait_until(desktop.is_file, "autostart file")
    wait_until(lambda: load_settings(config).autostart, "autostart setting")
    wait_until(
        lambda: find_entry(icon.menus[-1], "Start at login").checked is True,  # type: ignore[union-attr]
        "checkbox",
    )

    icon.click("Disconnect")
    wait_until(lambda: client.calls[-1] == "disconnect", "disconnect")
    icon.click("Quit")
    thread.join(scaled(10))
    assert not thread.is_alive()
    assert client.calls[-1] == "stop"


def test_settings_window_saves_through_the_file_and_leaves_the_facade_alone(
    app_parts: tuple[TrayApp, FakeClient, FakeIcon, Clock, Path], tmp_path: Path
) -> None:
    app, client, icon, _clock, _config = app_parts
    # Stand-in for the dialog process: writes new settings and exits 0.
    script = tmp_path / "dialog.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom client.config import update_settings\n"
        "p = Path(sys.argv[sys.argv.index('--config') + 1])\n"
        "update_settings(p, server_url='http://127.0.0.1:9')\n",
        encoding="utf-8",
    )
    app._dialog_command = [sys.executable, str(script)]
    thread = run_app(app)
    wait_until(lambda: bool(icon.menus), "menu")
    icon.click("Settings…")
    wait_until(lambda: app._dialog is not None and app._dialog.poll() == 0, "window saved", 30)
    assert load_settings(_config).server_url == "http://127.0.0.1:9"
    assert client.changes == []  # the session follows the file; no call from that thread
    icon.click("Quit")
    thread.join(scaled(10))
    assert not thread.is_alive()


def test_menu_follows_settings_changed_by_another_process(
    app_parts: tuple[TrayApp, FakeClient, FakeIcon, Clock, Path],
) -> None:
    app, _client, icon, _clock, config = app_parts
    thread = run_app(app)
    wait_until(lambda: bool(icon.menus), "menu")

    def threshold_checked(label: str) -> bool:
        entry = find_entry(icon.menus[-1], label)
        return entry is not None and entry.checked is True

    assert threshold_checked("Above 50 %")
    # What `fedtray-client config set battery_threshold 80` does from another terminal,
    # and the session following the file.
    update_settings(config, battery_threshold=80)
    _client.follow_file()
    wait_until(lambda: threshold_checked("Above 80 %"), "the menu shows the new threshold")
    icon.click("Quit")
    thread.join(scaled(10))
    assert not thread.is_alive()


def test_tooltip_shows_a_deadline_set_by_another_process(
    app_parts: tuple[TrayApp, FakeClient, FakeIcon, Clock, Path],
) -> None:
    app, client, icon, _clock, config = app_parts
    thread = run_app(app)
    wait_until(lambda: bool(icon.menus), "menu")
    client.publish(connection="connected")
    # What `fedtray-client pause --for 40m` writes; the session then reports the pause.
    until = datetime(2026, 5, 4, 15, 10).astimezone(UTC)
    update_settings(config, paused=True, paused_until=until)
    client.follow_file()
    client.publish(device_state="paused", pause_reason="user_paused")
    wait_until(lambda: icon.titles[-1] == "Paused by you until 15:10", "the deadline shown")
    # `fedtray-client pause` (no --for) drops the deadline: plain "Paused by you" again.
    update_settings(config, paused_until=None)
    client.follow_file()
    wait_until(lambda: icon.titles[-1] == "Paused by you", "the deadline dropped")
    icon.click("Quit")
    thread.join(scaled(10))
    assert not thread.is_alive()


def test_xharness_names_missing_programs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import xharness

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to find
    with pytest.raises(RuntimeError, match=r"missing: Xvfb \(apt package xvfb\)"):
        xharness.start_xsession(tmp_path)
