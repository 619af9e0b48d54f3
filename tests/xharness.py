"""A real X desktop for tray tests: Xvfb, a system tray, a D-Bus session and a notification
service whose received notifications tests can read.

Stable API:

* fixture ``xsession`` (module-scoped): starts everything once per test module and yields an
  :class:`XSession`; everything is torn down at the end of the module. If a needed program
  is missing the fixture FAILS (never skips) and names the Debian packages to install.
* :class:`XSession`: ``.env`` (DISPLAY, DBUS_SESSION_BUS_ADDRESS, PYSTRAY_BACKEND=gtk, to
  merge into a child's environment), ``.notifications()``, ``.wait_for_notification(pred,
  timeout)``, ``.tray_window``, ``.docked_icons()``, ``.wait_for_docked(timeout)``,
  ``.xdotool(*args)``, ``.screenshot(path, box=None)``, ``.window_geometry(wid)``.

Nothing sleeps blindly: every wait polls a condition with a timeout and fails with the
last state it saw. Run ``python -m tests.xharness --notification-service FILE`` to start
only the notification service (that is how the fixture starts it): it owns
``org.freedesktop.Notifications`` on the session bus, appends each notification as one
JSON line to FILE and prints ``ready`` once the name is owned.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from tests.waiting import scaled

# program -> Debian package that provides it
REQUIRED = {
    "Xvfb": "xvfb",
    "trayer": "trayer",
    "dbus-daemon": "dbus",
    "xdotool": "xdotool",
    "xwininfo": "x11-utils",
    "xdpyinfo": "x11-utils",
    "import": "imagemagick",
}
SCREEN = (800, 600)
TRAY_HEIGHT = 32


def _poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; raise TimeoutError otherwise.

    ``timeout`` is in reference seconds (scaled, see tests/waiting.py)."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def _read_line(stream: IO[str], proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """One line from a child's stdout, failing clearly if it exits or stays silent
    (``timeout``: reference seconds, scaled)."""
    import selectors

    timeout = scaled(timeout)
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise TimeoutError(f"{what}: no output within {timeout} s")
        line = stream.readline()
    finally:
        sel.close()
    if not line:
        raise RuntimeError(f"{what}: exited with code {proc.wait(scaled(5))} before it was ready")
    return line.strip()


@dataclass
class XSession:
    """A running X server with a tray, a session bus and a notification service."""

    display: str
    bus_address: str
    notify_log: Path
    tray_window: int
    env: dict[str, str]
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    # -- notifications ----------------------------------------------------------------

    def notifications(self) -> list[dict[str, Any]]:
        """Every notification received so far: ``{"app", "summary", "body"}`` dicts."""
        if not self.notify_log.exists():
            return []
        lines = self.notify_log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def wait_for_notification(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        return _poll(  # type: ignore[no-any-return]
            lambda: next((n for n in self.notifications() if predicate(n)), None),
            timeout,
            f"a matching notification (received: {self.notifications()})",
        )

    # -- windows ----------------------------------------------------------------------

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            list(args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=scaled(30),
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def xdotool(self, *args: str) -> str:
        return self.run("xdotool", *args)

    def window_geometry(self, wid: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of a window, in root coordinates."""
        out = self.run("xwininfo", "-id", str(wid))
        values: dict[str, int] = {}
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            with contextlib.suppress(ValueError):
                values[key] = int(value.strip())
        return (
            values["Absolute upper-left X"],
            values["Absolute upper-left Y"],
            values["Width"],
            values["Height"],
        )

    def _children(self, wid: int) -> list[int]:
        out = self.run("xwininfo", "-children", "-id", str(wid), check=False)
        found: list[int] = []
        for line in out.splitlines():
            token = line.strip().split(" ", 1)[0]
            if token.startswith("0x"):
                with contextlib.suppress(ValueError):
                    found.append(int(token, 16))
        return [w for w in found if w != wid]

    def docked_icons(self) -> list[int]:
        """Windows embedded in the tray (XEmbed plugs carry ``_XEMBED_INFO``)."""
        docked: list[int] = []
        stack = self._children(self.tray_window)
        while stack:
            wid = stack.pop()
            props = self.run("xprop", "-id", str(wid), "_XEMBED_INFO", check=False)
            if "_XEMBED_INFO(_XEMBED_INFO)" in props:
                docked.append(wid)
            stack.extend(self._children(wid))
        return docked

    def wait_for_docked(self, timeout: float = 30.0) -> int:
        """The first icon docked in the tray (waits until one is, and is mapped)."""

        def mapped_icon() -> int | None:
            for wid in self.docked_icons():
                if "IsViewable" in self.run("xwininfo", "-id", str(wid), check=False):
                    return wid
            return None

        return int(_poll(mapped_icon, timeout, "an icon docked in the tray"))

    def screenshot(self, path: Path, box: tuple[int, int, int, int] | None = None) -> Path:
        """Save the screen (or ``box`` = left, top, right, bottom of it) as a PNG."""
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        full = path.with_suffix(".full.png")
        self.run("import", "-window", "root", str(full))
        with Image.open(full) as image:
            (image.crop(box) if box else image.copy()).save(path)
        full.unlink()
        return path

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(scaled(5))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(scaled(5))


def _missing_programs() -> list[str]:
    return [
        f"{prog} (apt package {pkg})" for prog, pkg in REQUIRED.items() if not shutil.which(prog)
    ]


def start_xsession(workdir: Path) -> XSession:
    """Start Xvfb, a session bus, the notification service and trayer; wait for each."""
    missing = _missing_programs()
    if missing:
        raise RuntimeError(
            "the tray tests need a real X server and tray; missing: " + ", ".join(missing)
        )
    procs: list[subprocess.Popen[Any]] = []
    session: XSession | None = None
    try:
        # -displayfd: Xvfb picks a free display itself and tells us which (no race).
        xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", "1", "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24",
             "-nolisten", "tcp"],
            stdout=subprocess.PIPE, stderr=(workdir / "xvfb.log").open("wb"), text=True,
        )  # fmt: skip
        procs.append(xvfb)
        assert xvfb.stdout is not None
        display = ":" + _read_line(xvfb.stdout, xvfb, 30, "Xvfb")

        def x_answers() -> bool:
            if xvfb.poll() is not None:
                problem = (workdir / "xvfb.log").read_text(errors="replace").strip()
                raise RuntimeError(f"Xvfb exited with code {xvfb.returncode}: {problem}")
            probe = subprocess.run(
                ["xdpyinfo", "-display", display],
                capture_output=True,
                timeout=scaled(10),
                check=False,
            )
            return probe.returncode == 0

        _poll(x_answers, 30, f"the X server on {display} to answer")
        # A calm grey desktop instead of black, so screenshots read well (cosmetic only).
        with contextlib.suppress(OSError):
            subprocess.run(
                ["xsetroot", "-solid", "#5e6a7d"], env={**os.environ, "DISPLAY": display},
                timeout=scaled(10), check=False,
            )  # fmt: skip

        bus = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        procs.append(bus)
        assert bus.stdout is not None
        bus_address = _read_line(bus.stdout, bus, 30, "dbus-daemon")

        env = {
            **os.environ,
            "DISPLAY": display,
            "DBUS_SESSION_BUS_ADDRESS": bus_address,
            "PYSTRAY_BACKEND": "gtk",
            "NO_AT_BRIDGE": "1",  # no accessibility bus: GTK would warn and wait for it
            "GDK_BACKEND": "x11",
        }
        env.pop("WAYLAND_DISPLAY", None)

        notify_log = workdir / "notifications.jsonl"
        service = subprocess.Popen(
            [sys.executable, "-m", "tests.xharness", "--notification-service",
             str(notify_log)],
            env=env, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        procs.append(service)
        assert service.stdout is not None
        ready = _read_line(service.stdout, service, 30, "the notification service")
        if ready != "ready":
            raise RuntimeError(f"the notification service said {ready!r}, not 'ready'")

        trayer = subprocess.Popen(
            ["trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
             "--height", str(TRAY_HEIGHT), "--SetDockType", "true", "--transparent", "false",
             "--tint", "0xd8dee9", "--expand", "false"],
            env=env, stdout=subprocess.DEVNULL, stderr=(workdir / "trayer.log").open("wb"),
        )  # fmt: skip
        procs.append(trayer)

        def find_tray() -> int | None:
            out = subprocess.run(
                ["xdotool", "search", "--class", "trayer"],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if trayer.poll() is not None:
                problem = (workdir / "trayer.log").read_text(errors="replace").strip()
                xvfb_state = "running" if xvfb.poll() is None else f"exited ({xvfb.returncode})"
                raise RuntimeError(
                    f"trayer exited with code {trayer.returncode}: {problem} (Xvfb {xvfb_state})"
                )
            # trayer has a hidden leader window too; the visible tray is named "panel".
            for wid in out.stdout.split():
                name = subprocess.run(
                    ["xdotool", "getwindowname", wid],
                    env=env, capture_output=True, text=True, check=False,
                ).stdout.strip()  # fmt: skip
                if name == "panel":
                    return int(wid)
            return None

        tray_window = int(_poll(find_tray, 30, "the trayer window"))
        session = XSession(display, bus_address, notify_log, tray_window, env, procs)
        return session
    finally:
        if session is None:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()


@pytest.fixture(scope="module")
def xsession(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XSession]:
    if _missing_programs():
        pytest.fail("missing programs: " + ", ".join(_missing_programs()), pytrace=False)
    problems: list[str] = []
    session: XSession | None = None
    # Two tries: a display number can be taken between Xvfb choosing it and trayer
    # connecting when other X servers start on this machine at the same moment.
    for _attempt in range(2):
        try:
            session = start_xsession(tmp_path_factory.mktemp("xsession"))
            break
        except (RuntimeError, TimeoutError, OSError) as exc:
            problems.append(str(exc))
    if session is None:
        pytest.fail("cannot start the X test session: " + " | ".join(problems), pytrace=False)
    try:
        yield session
    finally:
        session.close()


# ---------------------------------------------------------------------------------------
# The notification service (a child process; uses PyGObject, which the tray needs anyway)

_INTROSPECTION = """
<node>
  <interface name="org.freedesktop.Notifications">
    <method name="Notify">
      <arg type="s" direction="in"/><arg type="u" direction="in"/>
      <arg type="s" direction="in"/><arg type="s" direction="in"/>
      <arg type="s" direction="in"/><arg type="as" direction="in"/>
      <arg type="a{sv}" direction="in"/><arg type="i" direction="in"/>
      <arg type="u" direction="out"/>
    </method>
    <method name="CloseNotification"><arg type="u" direction="in"/></method>
    <method name="GetCapabilities"><arg type="as" direction="out"/></method>
    <method name="GetServerInformation">
      <arg type="s" direction="out"/><arg type="s" direction="out"/>
      <arg type="s" direction="out"/><arg type="s" direction="out"/>
    </method>
    <signal name="NotificationClosed"><arg type="u"/><arg type="u"/></signal>
  </interface>
</node>
"""


def serve_notifications(log_path: Path) -> None:  # pragma: no cover - runs in a child
    import gi

    gi.require_version("Gio", "2.0")
    from gi.repository import Gio, GLib

    node = Gio.DBusNodeInfo.new_for_xml(_INTROSPECTION)
    counter = [0]

    def on_call(
        _conn: Any, _sender: str, _path: str, _iface: str, method: str, params: Any, inv: Any
    ) -> None:
        if method == "Notify":
            app, _replaces, _icon, summary, body, _actions, _hints, _timeout = params.unpack()
            counter[0] += 1
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"app": app, "summary": summary, "body": body}) + "\n")
            inv.return_value(GLib.Variant("(u)", (counter[0],)))
        elif method == "CloseNotification":
            inv.return_value(None)
        elif method == "GetCapabilities":
            inv.return_value(GLib.Variant("(as)", (["body"],)))
        else:
            inv.return_value(GLib.Variant("(ssss)", ("xharness", "fedtray", "1", "1.2")))

    def on_bus(conn: Any, _name: str) -> None:
        conn.register_object(
            "/org/freedesktop/Notifications", node.interfaces[0], on_call, None, None
        )

    def on_name(_conn: Any, _name: str) -> None:
        print("ready", flush=True)

    def on_lost(_conn: Any, name: str) -> None:
        print(f"could not own {name}", flush=True)
        loop.quit()

    loop = GLib.MainLoop()
    Gio.bus_own_name(
        Gio.BusType.SESSION,
        "org.freedesktop.Notifications",
        Gio.BusNameOwnerFlags.NONE,
        on_bus,
        on_name,
        on_lost,
    )
    loop.run()


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3 and sys.argv[1] == "--notification-service":
        serve_notifications(Path(sys.argv[2]))
    else:
        print("usage: python tests/xharness.py --notification-service FILE", file=sys.stderr)
        sys.exit(2)
