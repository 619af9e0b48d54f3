"""client/activity over a real D-Bus: a private session bus (dbus-daemon) and a stand-in
``org.freedesktop.ScreenSaver`` service served by jeepney in a child process. A Wayland
session's probe finds it after Mutter's IdleMonitor does not answer, reads the live value,
and answers None (never raises) once the service has gone.

``python -m tests.test_activity_dbus ADDRESS FILE`` runs only the service: it owns the
name on the bus at ADDRESS, answers ``GetSessionIdleTime`` with the number in FILE
(milliseconds) and prints ``ready`` once the name is owned.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.activity import default_probe
from tests.waiting import poll, scaled
from tests.xharness import _read_line

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NAME = "org.freedesktop.ScreenSaver"


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(scaled(5))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(scaled(5))


@pytest.fixture
def bus() -> Iterator[str]:
    if not shutil.which("dbus-daemon"):
        pytest.fail("missing program: dbus-daemon (apt package dbus)", pytrace=False)
    daemon = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert daemon.stdout is not None
        yield _read_line(daemon.stdout, daemon, 30, "dbus-daemon")
    finally:
        stop(daemon)


def start_service(address: str, value_file: Path) -> subprocess.Popen[str]:
    service = subprocess.Popen(
        [sys.executable, "-m", "tests.test_activity_dbus", address, str(value_file)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert service.stdout is not None
    said = _read_line(service.stdout, service, 30, "the ScreenSaver service")
    assert said == "ready", said
    return service


def test_screensaver_idle_time_over_a_real_bus(bus: str, tmp_path: Path) -> None:
    value = tmp_path / "idle-ms"
    value.write_text("4242")
    service = start_service(bus, value)
    try:
        environ = {"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0",  # XWayland: ignored
                   "DBUS_SESSION_BUS_ADDRESS": bus,
                   "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-system-bus"}  # fmt: skip
        probe = default_probe(environ, "linux")
        assert probe.idle_seconds() == 4.242
        text = probe.describe()
        assert "idle time from org.freedesktop.ScreenSaver (D-Bus)" in text, text
        assert "full-screen unknown: Wayland" in text, text
        assert probe.fullscreen_active() is None
        value.write_text("15")  # the live value, asked again each time
        assert probe.idle_seconds() == 0.015
    finally:
        stop(service)
    # The service has gone: None, no exception, and describe() says nothing answers.
    poll(probe.idle_seconds, lambda v: v is None, 5, "no answer once the service is gone")
    assert probe.idle_seconds() is None
    assert "idle time unknown: no D-Bus idle monitor answered" in probe.describe()


def serve(address: str, value_file: Path) -> None:  # pragma: no cover - runs in a child
    from jeepney import HeaderFields, MessageType, new_error, new_method_return
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    conn = open_dbus_connection(bus=address)
    owned = conn.send_and_get_reply(message_bus.RequestName(NAME), timeout=10)
    if owned.body != (1,):  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
        print(f"could not own {NAME}: {owned.body}", flush=True)
        return
    print("ready", flush=True)
    while True:
        msg = conn.receive()
        if msg.header.message_type != MessageType.method_call:
            continue
        if msg.header.fields.get(HeaderFields.member) == "GetSessionIdleTime":
            conn.send(new_method_return(msg, "u", (int(value_file.read_text()),)))
        else:
            conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod"))


if __name__ == "__main__":  # pragma: no cover
    serve(sys.argv[1], Path(sys.argv[2]))
