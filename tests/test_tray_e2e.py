"""End to end on a real X server: the tray docks, its menu drives the server-visible state,
a notification arrives, and Quit exits 0 quickly.

Uses ``tests/xharness.py`` (Xvfb + trayer + D-Bus + a notification service) and the
reference server from ``tests/server_harness.py``. Screenshots of the menu and of each icon
state reached go to ``test-artifacts/tray/``; the menu one is also saved as
``docs/tray-menu.png`` for the README when ``FEDTRAY_UPDATE_DOC_SHOTS=1`` is set (so a
test run does not change tracked files).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from server_harness import running_server
from xharness import XSession, _poll, xsession  # noqa: F401  (fixture)

from client.config import Settings, load_settings, save_settings
from client.snapshot import ClientSnapshot
from tests.waiting import scaled
from tray.menu import MenuEntry, build_menu, find_entry

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "tray"
DEVICE_ID = "3f0c8a52-6d1e-4b8e-9a43-0d2a1f7e5c11"


def selectable_labels(snapshot: ClientSnapshot) -> list[str]:
    """The top-level items a keyboard can select, in order (GTK skips disabled items)."""
    menu = build_menu(snapshot, monotonic_now=0.0, wall_now=datetime.now())
    return [n.label for n in menu if isinstance(n, MenuEntry) and n.enabled]


def submenu_labels(snapshot: ClientSnapshot, parent: str, item: str) -> int:
    """The position of the entry starting with ``item`` in ``parent``'s submenu."""
    menu = build_menu(snapshot, monotonic_now=0.0, wall_now=datetime.now())
    found = find_entry(menu, parent)
    assert found is not None, parent
    labels = [n.label for n in found.submenu if isinstance(n, MenuEntry)]
    return next(i for i, text in enumerate(labels) if text.startswith(item))


CONNECTED = ClientSnapshot(
    settings=Settings(server_url="http://h:1", device_id=DEVICE_ID, device_name="tray-e2e"),
    connection="connected",
)


@dataclass
class Tray:
    proc: subprocess.Popen[bytes]
    x: XSession
    icon: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def icon_center(self) -> tuple[int, int]:
        left, top, width, height = self.x.window_geometry(self.icon)
        return left + width // 2, top + height // 2

    def menu_window(self) -> int | None:
        """The open popup menu of the tray process (its biggest visible window)."""
        out = self.x.run("xdotool", "search", "--onlyvisible", "--pid", str(self.proc.pid),
                         check=False)  # fmt: skip
        best: tuple[int, int] | None = None
        for token in out.split():
            try:
                _l, _t, width, height = self.x.window_geometry(int(token))
            except (RuntimeError, KeyError):
                continue  # the window went away between the search and the query
            if height >= 150 and (best is None or width * height > best[1]):
                best = (int(token), width * height)
        return best[0] if best else None

    def popups(self) -> list[tuple[int, int, int, int]]:
        """(x, y, width, height) of every open menu window of the tray process."""
        out = self.x.run("xdotool", "search", "--onlyvisible", "--pid", str(self.proc.pid),
                         check=False)  # fmt: skip
        found: list[tuple[int, int, int, int]] = []
        for token in out.split():
            try:
                geometry = self.x.window_geometry(int(token))
            except (RuntimeError, KeyError):
                continue  # the window went away between the search and the query
            if geometry[3] >= 60 and geometry[1] >= 8:  # not the icon in the panel
                found.append(geometry)
        return found

    def open_menu(self) -> int:
        x, y = self.icon_center()
        self.x.xdotool("mousemove", str(x), str(y), "click", "3")
        return int(_poll(self.menu_window, 10, "the menu to open"))

    def choose(self, label: str, snapshot: ClientSnapshot, item: str | None = None) -> None:
        """Open the menu and activate ``label`` (or, in its submenu, the entry whose label
        starts with ``item``) with the keyboard."""
        presses = selectable_labels(snapshot).index(label) + 1
        keys = ["Down"] * presses
        if item is not None:
            # Right opens the submenu with its first entry selected.
            keys += ["Right", *(["Down"] * submenu_labels(snapshot, label, item))]
        self.open_menu()
        self.x.xdotool("key", "--delay", "60", *keys, "Return")
        _poll(lambda: self.menu_window() is None, 10, "the menu to close")

    def icon_shot(self, name: str) -> Path:
        left, top, width, height = self.x.window_geometry(self.icon)
        box = (left, top, left + width, top + height)
        return self.x.screenshot(ARTIFACTS / f"icon-{name}.png", box)

    def title(self) -> str:
        """What X says about the icon window; its title is the tooltip sentence."""
        return self.x.run("xwininfo", "-id", str(self.icon))


@contextlib.contextmanager
def launched_tray(
    xsession: XSession,  # noqa: F811
    tmp_path: Path,
    settings: Settings,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Tray]:
    """Run ``python -m tray`` with ``settings`` in user dirs under ``tmp_path``; yield it
    once its icon is docked. The process is always killed on exit."""
    env = dict(xsession.env)
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        path = tmp_path / "user" / var.lower()
        path.mkdir(parents=True)
        env[var] = str(path)
    env["HOME"] = str(tmp_path / "user")
    # The X session's environment was taken before this test's own (tests/conftest.py):
    # carry its stand-ins, so the tray sees an idle computer and no other load, as every
    # session under test does (the politeness tests read the real X server themselves).
    env.update({k: v for k, v in os.environ.items() if k.startswith("FEDTRAY_SIMULATE_")})
    env.update(extra_env or {})
    save_settings(settings, config_file(tmp_path))
    log = tmp_path / "tray-output.txt"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tray", "--log-level", "DEBUG"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        icon = xsession.wait_for_docked(60)
        yield Tray(proc, xsession, icon, log)
    finally:
        # SIGTERM first so the tray stops its training worker itself; kill if it lingers.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(scaled(10))


def config_file(tmp_path: Path) -> Path:
    """The settings file of a tray started by :func:`launched_tray` with this ``tmp_path``."""
    return tmp_path / "user" / "xdg_config_home" / "fedtray" / "config.toml"


@pytest.fixture
def tray(xsession: XSession, tmp_path: Path) -> Iterator[tuple[Tray, Any]]:  # noqa: F811
    with running_server(tmp_path) as server:
        settings = Settings(server_url=server.url, device_name="tray-e2e", device_id=DEVICE_ID)
        with launched_tray(xsession, tmp_path, settings) as app:
            yield app, server


def device(status: dict[str, Any]) -> dict[str, Any]:
    found = [d for d in status.get("devices", []) if d.get("id") == DEVICE_ID]
    return found[0] if found else {}


def test_tray_end_to_end(tray: tuple[Tray, Any], xsession: XSession) -> None:  # noqa: F811
    app, server = tray
    server.wait_for(lambda s: device(s).get("connected") is True, 30, "the tray's device online")

    note = xsession.wait_for_notification(lambda n: n["summary"] == "fedtray is connected", 20)
    assert server.url.removeprefix("http://") in note["body"]
    _poll(lambda: "waiting for a round" in app.x.run("xwininfo", "-id", str(app.icon)), 10,
          "the tooltip title")  # fmt: skip
    app.icon_shot("idle")

    # The menu, as the README shows it.
    menu = app.open_menu()
    left, top, width, height = app.x.window_geometry(menu)
    tray_left, _t, tray_width, _h = app.x.window_geometry(app.x.tray_window)
    box = (max(0, left - 8), 0, min(800, max(left + width, tray_left + tray_width) + 8),
           top + height + 8)  # fmt: skip
    shot = app.x.screenshot(ARTIFACTS / "menu.png", box)
    if os.environ.get("FEDTRAY_UPDATE_DOC_SHOTS"):  # refresh the README's picture on demand
        (ROOT / "docs" / "tray-menu.png").write_bytes(shot.read_bytes())
    # ...and with "Pause for a while" open: every snooze says when it ends.
    presses = selectable_labels(CONNECTED).index("Pause for a while") + 1
    app.x.xdotool("key", "--delay", "60", *(["Down"] * presses), "Right")
    popups = _poll(lambda: p if len(p := app.popups()) >= 2 else None, 10, "the submenu")
    box = (max(0, min(b[0] for b in popups) - 8), 0,
           min(800, max(b[0] + b[2] for b in popups) + 8),
           max(b[1] + b[3] for b in popups) + 8)  # fmt: skip
    shot = app.x.screenshot(ARTIFACTS / "menu-snooze.png", box)
    if os.environ.get("FEDTRAY_UPDATE_DOC_SHOTS"):
        (ROOT / "docs" / "tray-menu-snooze.png").write_bytes(shot.read_bytes())
    app.x.xdotool("key", "Escape", "Escape")
    _poll(lambda: app.menu_window() is None, 10, "the menu to close")

    app.choose("Pause training", CONNECTED)
    paused = server.wait_for(
        lambda s: device(s).get("pauseReason") == "user_paused", 20, "the device paused by the user"
    )
    assert device(paused)["state"] == "paused"
    user_paused = ClientSnapshot(**{**CONNECTED.__dict__, "pause_reason": "user_paused",
                                    "device_state": "paused"})  # fmt: skip
    _poll(lambda: "Paused by you" in app.x.run("xwininfo", "-id", str(app.icon)), 10, "title")
    app.icon_shot("paused-user")

    app.choose("Resume training", user_paused)
    server.wait_for(
        lambda s: device(s).get("pauseReason") is None and device(s).get("state") == "idle",
        20,
        "the device resumed",
    )

    app.choose("Disconnect", CONNECTED)
    server.wait_for(lambda s: device(s).get("connected") is False, 20, "the device offline")
    _poll(lambda: "Not connected" in app.x.run("xwininfo", "-id", str(app.icon)), 10, "title")
    app.icon_shot("disconnected")
    off = ClientSnapshot(**{**CONNECTED.__dict__, "connection": "disconnected"})
    app.choose("Connect", off)
    server.wait_for(lambda s: device(s).get("connected") is True, 20, "the device back online")

    started = time.monotonic()
    app.choose("Quit", CONNECTED)
    code = app.proc.wait(scaled(15))
    elapsed = time.monotonic() - started
    assert code == 0, app.output()
    assert elapsed < 10, f"Quit took {elapsed:.1f} s"
    server.wait_for(lambda s: device(s).get("connected") is False, 20, "the device offline")
    assert "Traceback" not in app.output()


def test_snooze_and_while_in_use_from_the_menu(
    tray: tuple[Tray, Any],
    tmp_path: Path,
) -> None:
    """Pause for a while ▸ 3 hours, then While I'm using this computer ▸ Full, clicked in
    the real menu, land in the settings file (and the pause reaches the server)."""
    app, server = tray
    server.wait_for(lambda s: device(s).get("connected") is True, 30, "the tray's device online")
    config = config_file(tmp_path)

    before = datetime.now(UTC)
    app.choose("Pause for a while", CONNECTED, "3 hours")
    saved = _poll(lambda: load_settings(config).paused_until, 10, "paused_until saved")
    after = datetime.now(UTC)
    # The label's minute is the deadline's: within the seconds the click took.
    assert before + timedelta(hours=3) - timedelta(minutes=1) <= saved
    assert saved <= after + timedelta(hours=3)
    assert load_settings(config).paused is True
    server.wait_for(
        lambda s: device(s).get("pauseReason") == "user_paused", 20, "the device paused by 3 h"
    )
    until = f"{saved.astimezone():%H:%M}"
    _poll(lambda: f"Paused by you until {until}" in app.title(), 10, "the deadline in the title")

    assert load_settings(config).while_in_use == "light"  # the default
    paused = ClientSnapshot(**{**CONNECTED.__dict__, "pause_reason": "user_paused",
                               "device_state": "paused"})  # fmt: skip
    app.choose("While I'm using this computer", paused, "Full")
    _poll(lambda: load_settings(config).while_in_use == "full", 10, "while_in_use = full saved")
    # And back: the radio entry of the current mode is not the only one that works.
    app.choose("While I'm using this computer", paused, "Light")
    _poll(lambda: load_settings(config).while_in_use == "light", 10, "while_in_use = light")

    app.choose("Resume training", paused)
    server.wait_for(lambda s: device(s).get("pauseReason") is None, 20, "the device resumed")
    assert load_settings(config).paused_until is None
    assert "Traceback" not in app.output()


def test_second_launch_is_refused(tray: tuple[Tray, Any], xsession: XSession) -> None:  # noqa: F811
    app, _server = tray
    env = dict(xsession.env)
    # The same user dirs as the running tray: read them back from its environment.
    proc_env = Path(f"/proc/{app.proc.pid}/environ").read_bytes().split(b"\0")
    for item in proc_env:
        key, _, value = item.decode(errors="replace").partition("=")
        if key.startswith("XDG_") or key == "HOME":
            env[key] = value
    second = subprocess.run(
        [sys.executable, "-m", "tray"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=scaled(60), check=False,
    )  # fmt: skip
    assert second.returncode == 1
    assert f"fedtray is already running (process {app.proc.pid})" in second.stderr
    xsession.wait_for_notification(lambda n: n["summary"] == "fedtray is already running", 15)
    assert app.proc.poll() is None  # the first one keeps running


def test_sigterm_quits_like_the_menu(tray: tuple[Tray, Any]) -> None:
    """A logout (or `kill`) sends SIGTERM: the tray disconnects and exits 0, quickly."""
    app, server = tray
    server.wait_for(lambda s: device(s).get("connected") is True, 30, "the tray's device online")
    started = time.monotonic()
    app.proc.send_signal(signal.SIGTERM)
    code = app.proc.wait(scaled(15))
    assert code == 0, app.output()
    assert time.monotonic() - started < 10
    assert "terminated by a signal: quitting" in app.output()
    server.wait_for(lambda s: device(s).get("connected") is False, 20, "the device offline")
