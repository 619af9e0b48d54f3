"""client/activity on a real X server (Xvfb): xdotool input resets the idle time, which
then grows; a window made full-screen under a real window manager (openbox, via wmctrl)
is seen as full-screen, and un-full-screened or closed it is not; no window manager, or
an X server that goes away, answers None (never raises) and describe() says why."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client.activity import default_probe
from client.activity.x11 import X11Probe
from tests.waiting import poll, scaled, wait_until
from tests.xharness import _read_line

pytestmark = pytest.mark.slow

# program -> Debian package (.ci/system-packages.txt)
REQUIRED = {"Xvfb": "xvfb", "xdotool": "xdotool", "xdpyinfo": "x11-utils",
            "xmessage": "x11-utils", "openbox": "openbox", "wmctrl": "wmctrl"}  # fmt: skip
TITLE = "fedtray-fullscreen-probe"


@dataclass
class Desktop:
    display: str
    env: dict[str, str]
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def run(self, *args: str) -> str:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=scaled(30), check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{args} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def start(self, *args: str) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(list(args), env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        self.procs.append(proc)
        return proc

    def windows(self) -> str:
        """``wmctrl -l``; empty until the window manager publishes its client list."""
        try:
            return self.run("wmctrl", "-l")
        except RuntimeError:
            return ""


def managed_window(desktop: Desktop, attempts: int = 3) -> subprocess.Popen[Any]:
    """An xmessage window the window manager manages. A window mapped while openbox is
    still starting up (after it publishes EWMH, before it takes map requests) can stay
    unmanaged for good (about one run in six here): such a window is closed and opened
    again, at most ``attempts`` times."""
    for attempt in range(1, attempts + 1):
        window = desktop.start("xmessage", "-title", TITLE, "training should step aside")
        try:
            wait_until(lambda: TITLE in desktop.windows(), 10, "the window to be managed")
            return window
        except TimeoutError:
            stop(window)
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(scaled(5))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(scaled(5))


@contextlib.contextmanager
def xvfb(workdir: Path) -> Iterator[Desktop]:
    missing = [f"{p} (apt package {pkg})" for p, pkg in REQUIRED.items() if not shutil.which(p)]
    if missing:
        pytest.fail("missing programs: " + ", ".join(missing), pytrace=False)
    # -displayfd: Xvfb picks a free display itself and tells us which (no race).
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", "1", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
        stdout=subprocess.PIPE, stderr=(workdir / "xvfb.log").open("wb"), text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        display = ":" + _read_line(server.stdout, server, 30, "Xvfb")
        env = {"PATH": "/usr/bin:/bin", "DISPLAY": display, "HOME": str(workdir)}
        desktop = Desktop(display, env)

        def answers() -> bool:
            return subprocess.run(["xdpyinfo"], env=env, capture_output=True,
                                  timeout=scaled(10), check=False).returncode == 0  # fmt: skip

        wait_until(answers, 30, f"the X server on {display} to answer")
        yield desktop
        for proc in reversed(desktop.procs):
            stop(proc)
    finally:
        stop(server)


@pytest.fixture(scope="module")
def desktop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desktop]:
    with xvfb(tmp_path_factory.mktemp("activity-x")) as running:
        yield running


def probe_on(desktop: Desktop, tmp_path: Path) -> Any:
    nowhere = f"unix:path={tmp_path}/no-bus"  # no D-Bus: only X answers
    environ = {"DISPLAY": desktop.display, "DBUS_SESSION_BUS_ADDRESS": nowhere,
               "DBUS_SYSTEM_BUS_ADDRESS": nowhere}  # fmt: skip
    return default_probe(environ, "linux")


def test_input_resets_idle_time_which_then_grows(desktop: Desktop, tmp_path: Path) -> None:
    probe = probe_on(desktop, tmp_path)
    assert isinstance(probe, X11Probe)
    assert "X11 screensaver extension" in probe.describe(), probe.describe()
    # Nobody touches this X server: its idle time grows past a second...
    poll(probe.idle_seconds, lambda v: v is not None and v >= 1.0, 5, "idle time >= 1 s")
    for x in (17, 230):  # ...and a pointer motion resets it, twice
        desktop.run("xdotool", "mousemove", str(x), str(x + 3))
        poll(probe.idle_seconds, lambda v: v is not None and v < 1.0, 2, "idle time reset")
        poll(probe.idle_seconds, lambda v: v is not None and v >= 1.0, 5, "idle time >= 1 s")


def test_without_window_manager_fullscreen_is_unknown(desktop: Desktop, tmp_path: Path) -> None:
    probe = probe_on(desktop, tmp_path)
    assert probe.fullscreen_active() is None
    assert "full-screen unknown: no EWMH window manager" in probe.describe(), probe.describe()
    assert probe.idle_seconds() is not None  # idle time needs no window manager


def test_fullscreen_window_under_a_window_manager(desktop: Desktop, tmp_path: Path) -> None:
    probe = probe_on(desktop, tmp_path)
    wm = desktop.start("openbox")
    try:
        # Once openbox manages the screen it publishes its EWMH check window: no window yet.
        poll(probe.fullscreen_active, lambda v: v is False, 15, "the WM to publish EWMH")
        assert "full-screen from the window manager" in probe.describe(), probe.describe()
        window = managed_window(desktop)
        desktop.run("wmctrl", "-F", "-a", TITLE)
        poll(probe.fullscreen_active, lambda v: v is False, 10, "active, not full-screen")

        desktop.run("wmctrl", "-F", "-r", TITLE, "-b", "add,fullscreen")
        poll(probe.fullscreen_active, lambda v: v is True, 10, "full-screen seen")
        desktop.run("wmctrl", "-F", "-r", TITLE, "-b", "remove,fullscreen")
        poll(probe.fullscreen_active, lambda v: v is False, 10, "full-screen left")

        desktop.run("wmctrl", "-F", "-r", TITLE, "-b", "add,fullscreen")
        poll(probe.fullscreen_active, lambda v: v is True, 10, "full-screen again")
        stop(window)  # closing the full-screen window ends it
        poll(probe.fullscreen_active, lambda v: v is False, 10, "closed window not full-screen")
    finally:
        stop(wm)


def test_x_server_going_away_answers_none(tmp_path: Path) -> None:
    with xvfb(tmp_path) as gone:
        probe = probe_on(gone, tmp_path)
        assert probe.idle_seconds() is not None
    # The X server has exited: no exception, no guess, and describe() says so.
    assert probe.idle_seconds() is None
    assert probe.fullscreen_active() is None
    assert "not reachable" in probe.describe(), probe.describe()
