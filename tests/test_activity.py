"""client/activity: the pure parsers and the plan by table; the Windows, macOS and D-Bus
probes behind their tiny OS-call seams with fakes; no display and no bus answer None."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from client.activity import ActivityProbe, CombinedProbe, UnknownProbe, default_probe, plan
from client.activity.base import LogOnce
from client.activity.choose import DEFAULT_SYSTEM_BUS, Plan
from client.activity.dbus_idle import (
    RETRY_EVERY_S,
    SOURCES,
    DBusIdleProbe,
    DBusRefusedError,
    idle_from_logind,
    idle_from_milliseconds,
)
from client.activity.macos import MacProbe, idle_from_hid_ns
from client.activity.windows import WindowsProbe, fullscreen_from_quns, idle_ms_from_ticks
from client.activity.x11 import X11Probe, is_fullscreen_state, parse_active_window, wm_present

# -- pure parsers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ([], 0), ([0], 0), ([0x400030], 0x400030), ([7, 9], 7)],
)
def test_parse_active_window(value: list[int] | None, expected: int | None) -> None:
    assert parse_active_window(value) == expected


@pytest.mark.parametrize(
    ("root_check", "child_check", "expected"),
    [
        ([0x20020B], [0x20020B], True),
        (None, None, False),  # no window manager ever ran
        ([0x20020B], None, False),  # stale: the check window lost its property
        ([0x20020B], [0x30000], False),  # stale: the id was reused by another window
        ([0], [0], False),
        ([], [], False),
    ],
)
def test_wm_present(
    root_check: list[int] | None, child_check: list[int] | None, expected: bool
) -> None:
    assert wm_present(root_check, child_check) is expected


@pytest.mark.parametrize(
    ("state", "expected"),
    [(None, False), ([], False), ([301, 302], False), ([301, 400], True), ([400], True)],
)
def test_is_fullscreen_state(state: list[int] | None, expected: bool) -> None:
    assert is_fullscreen_state(state, 400) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ((0,), 0.0),
        ((1500,), 1.5),
        ((2**40,), 2**40 / 1000),
        ((), None),
        ((1, 2), None),
        (("12",), None),
        ((True,), None),
        ((-5,), None),
        ((1.5,), None),
    ],
)
def test_idle_from_milliseconds(body: tuple[Any, ...], expected: float | None) -> None:
    assert idle_from_milliseconds(body) == expected


@pytest.mark.parametrize(
    ("hint", "since", "now_us", "expected"),
    [
        ((("b", False),), (("t", 5_000_000),), 9_000_000, 0.0),  # not idle: lower bound 0
        ((("b", True),), (("t", 5_000_000),), 9_000_000, 4.0),
        ((("b", True),), (("t", 0),), 9_000_000, 0.0),  # idle since an unknown time
        ((("b", True),), (("t", 10_000_000),), 9_000_000, 0.0),  # clock skew: never negative
        ((("u", True),), (("t", 5_000_000),), 9_000_000, None),  # wrong signature
        ((("b", True),), (("s", "x"),), 9_000_000, None),
        ((), (("t", 1),), 9_000_000, None),
        (("junk",), (("t", 1),), 9_000_000, None),
    ],
)
def test_idle_from_logind(hint: Any, since: Any, now_us: int, expected: float | None) -> None:
    assert idle_from_logind(hint, since, now_us) == expected


@pytest.mark.parametrize(
    ("tick64", "last", "expected"),
    [
        (10_000, 9_000, 1_000),
        (10_000, 10_000, 0),
        (2**32 + 500, 2**32 - 500, 1_000),  # GetTickCount64 past the 32-bit wrap
        (2**33 + 10, 5, 5),  # second wrap
        (3 * 2**32 + 100, 2**32 - 1, 101),
    ],
)
def test_idle_ms_from_ticks(tick64: int, last: int, expected: int) -> None:
    assert idle_ms_from_ticks(tick64, last) == expected


@pytest.mark.parametrize(
    ("state", "expected"),
    [(1, False), (2, True), (3, True), (4, True), (5, False), (6, False), (7, False),
     (0, None), (8, None), (-1, None)],
)  # fmt: skip
def test_fullscreen_from_quns(state: int, expected: bool | None) -> None:
    assert fullscreen_from_quns(state) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0.0), (1_500_000_000, 1.5), (-1, None), (True, None), (1.5, None), ("1", None)],
)
def test_idle_from_hid_ns(value: object, expected: float | None) -> None:
    assert idle_from_hid_ns(value) == expected


# -- the plan -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "platform", "expected"),
    [
        ({"DISPLAY": ":0"}, "win32", Plan("windows")),
        ({}, "cygwin", Plan("windows")),
        ({"DISPLAY": ":0"}, "darwin", Plan("macos")),
        (
            {"DISPLAY": ":1", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/s"},
            "linux",
            Plan("x11", ":1", "unix:path=/s", DEFAULT_SYSTEM_BUS),
        ),
        # XWayland's DISPLAY is ignored under Wayland: it sees only X clients' input.
        (
            {"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0", "XDG_RUNTIME_DIR": "/run/u"},
            "linux",
            Plan("wayland", None, "unix:path=/run/u/bus", DEFAULT_SYSTEM_BUS),
        ),
        (
            {"DISPLAY": ":0", "XDG_SESSION_TYPE": "Wayland", "DBUS_SYSTEM_BUS_ADDRESS": "x"},
            "linux",
            Plan("wayland", None, None, "x"),
        ),
        ({"DISPLAY": "  "}, "freebsd14", Plan("none", None, None, DEFAULT_SYSTEM_BUS)),
        ({"XDG_SESSION_TYPE": "x11", "DISPLAY": ":2"}, "linux",
         Plan("x11", ":2", None, DEFAULT_SYSTEM_BUS)),
    ],
)  # fmt: skip
def test_plan(environ: dict[str, str], platform: str, expected: Plan) -> None:
    assert plan(environ, platform) == expected


# -- Windows and macOS behind their OS-call seams -----------------------------------------


class FakeWin:
    def __init__(self) -> None:
        self.last, self.now, self.state = 0, 0, 5
        self.fail: set[str] = set()

    def _check(self, name: str) -> None:
        if name in self.fail:
            raise OSError(f"{name} refused")

    def last_input_tick(self) -> int:
        self._check("last")
        return self.last

    def tick_count64(self) -> int:
        self._check("now")
        return self.now

    def notification_state(self) -> int:
        self._check("state")
        return self.state


def test_windows_probe(caplog: pytest.LogCaptureFixture) -> None:
    calls = FakeWin()
    probe: ActivityProbe = WindowsProbe(calls)
    calls.last, calls.now = 2**32 - 1_000, 2**32 + 2_500  # across the 32-bit wrap
    assert probe.idle_seconds() == 3.5
    assert probe.fullscreen_active() is False
    calls.state = 3  # QUNS_RUNNING_D3D_FULL_SCREEN
    assert probe.fullscreen_active() is True
    calls.state = 99
    assert probe.fullscreen_active() is None
    calls.fail = {"last", "state"}
    with caplog.at_level(logging.WARNING, logger="client.activity"):
        assert probe.idle_seconds() is None
        assert probe.idle_seconds() is None
        assert probe.fullscreen_active() is None
    refused = [r for r in caplog.records if "GetLastInputInfo" in r.getMessage()]
    assert len(refused) == 1, caplog.text  # logged once, however often asked
    assert "GetLastInputInfo" in probe.describe()
    assert "SHQueryUserNotificationState" in probe.describe()


class FakeMac:
    def __init__(self) -> None:
        self.value: int = 0
        self.error: OSError | None = None

    def hid_idle_ns(self) -> int:
        if self.error:
            raise self.error
        return self.value


def test_mac_probe() -> None:
    calls = FakeMac()
    probe: ActivityProbe = MacProbe(calls)
    calls.value = 42_000_000_000
    assert probe.idle_seconds() == 42.0
    calls.value = -3
    assert probe.idle_seconds() is None
    calls.error = OSError("no IOHIDSystem service")
    assert probe.idle_seconds() is None
    assert probe.fullscreen_active() is None
    assert "HIDIdleTime" in probe.describe()
    assert "full-screen unknown" in probe.describe()


# -- D-Bus behind its connection seam -----------------------------------------------------


class FakeBus:
    """A bus whose services answer from ``services`` (method -> reply body or exception)."""

    def __init__(self, services: dict[str, Any]) -> None:
        self.services = services
        self.calls: list[str] = []
        self.closed = False

    def call(self, *args: Any) -> tuple[Any, ...]:
        _path, _bus_name, _interface, method, *rest = args
        body = rest[1] if len(rest) > 1 else ()
        key = f"{method}:{body[1]}" if body else method
        self.calls.append(key)
        answer = self.services.get(key)
        if answer is None:
            raise DBusRefusedError(f"{method}: org.freedesktop.DBus.Error.ServiceUnknown")
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    def close(self) -> None:
        self.closed = True


def buses(session: FakeBus | None, system: FakeBus | None) -> Any:
    def connect(address: str) -> FakeBus:
        bus = session if address == "session-addr" else system
        if bus is None:
            raise FileNotFoundError(f"no bus at {address}")
        return bus

    return connect


def test_dbus_prefers_mutter_then_keeps_it() -> None:
    session = FakeBus({"GetIdletime": (2500,), "GetSessionIdleTime": (9000,)})
    probe = DBusIdleProbe("session-addr", "system-addr", buses(session, None))
    assert probe.source == SOURCES[0].name
    assert probe.idle_seconds() == 2.5
    assert session.calls == ["GetIdletime", "GetIdletime"]  # found once, then asked alone
    assert "Mutter" in probe.describe()
    assert probe.fullscreen_active() is None


def test_dbus_falls_back_to_screensaver_then_logind() -> None:
    session = FakeBus({"GetSessionIdleTime": (9000,)})
    probe = DBusIdleProbe("session-addr", None, buses(session, None))
    assert probe.idle_seconds() == 9.0
    assert probe.source == "org.freedesktop.ScreenSaver"

    system = FakeBus(
        {"Get:IdleHint": (("b", True),), "Get:IdleSinceHintMonotonic": (("t", 1_000_000),)}
    )
    probe = DBusIdleProbe(None, "system-addr", buses(None, system), monotonic_us=lambda: 31_000_000)
    assert probe.idle_seconds() == 30.0
    assert probe.source == "logind IdleHint"
    assert "logind" in probe.describe()


def test_dbus_source_that_stops_answering_is_searched_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    session = FakeBus({"GetIdletime": (100,)})
    probe = DBusIdleProbe("session-addr", None, buses(session, None))
    session.services["GetIdletime"] = ConnectionResetError("bus went away")
    assert probe.idle_seconds() is None  # never raises, never guesses
    assert session.closed  # a broken connection is dropped, reopened next time
    assert probe.source is None
    session.services = {"GetSessionIdleTime": (700,)}
    assert probe.idle_seconds() == 0.7
    assert probe.source == "org.freedesktop.ScreenSaver"


def test_dbus_nothing_answers_and_searches_at_most_every_retry() -> None:
    session = FakeBus({})
    now = [100.0]
    probe = DBusIdleProbe("session-addr", None, buses(session, None), clock=lambda: now[0])
    assert probe.idle_seconds() is None
    assert probe.fullscreen_active() is None
    assert probe.describe().startswith("idle time unknown: no D-Bus idle monitor answered")
    asked = len(session.calls)
    session.services = {"GetIdletime": (5,)}
    now[0] += RETRY_EVERY_S - 0.5
    assert probe.idle_seconds() is None
    assert len(session.calls) == asked  # no new search before RETRY_EVERY_S
    now[0] += 1.0
    assert probe.idle_seconds() == 0.005
    assert probe.source == SOURCES[0].name


# -- no display, no bus: None, and describe() says why ----------------------------------------


def test_no_display_and_no_bus(tmp_path: Any) -> None:
    nowhere = f"unix:path={tmp_path}/no-bus"
    probe = default_probe(
        {"DBUS_SESSION_BUS_ADDRESS": nowhere, "DBUS_SYSTEM_BUS_ADDRESS": nowhere}, "linux"
    )
    assert probe.idle_seconds() is None
    assert probe.fullscreen_active() is None
    text = probe.describe()
    assert "idle time unknown: no D-Bus idle monitor answered" in text, text
    assert "full-screen unknown: no X display" in text, text


def test_unreachable_x_display(tmp_path: Any) -> None:
    nowhere = f"unix:path={tmp_path}/no-bus"
    environ = {"DISPLAY": ":4093", "DBUS_SESSION_BUS_ADDRESS": nowhere,
               "DBUS_SYSTEM_BUS_ADDRESS": nowhere}  # fmt: skip
    probe = default_probe(environ, "linux")
    assert (probe.idle_seconds(), probe.fullscreen_active()) == (None, None)
    assert "no X display ':4093' could be opened" in probe.describe(), probe.describe()


def test_x11_probe_survives_a_failing_opener() -> None:
    def opener(name: str) -> Any:
        raise ConnectionRefusedError(f"cannot reach {name}")

    probe = X11Probe(":9", opener)
    assert not probe.connected
    assert (probe.idle_seconds(), probe.fullscreen_active()) == (None, None)
    assert "not reachable" in probe.describe()


def test_windows_backend_that_cannot_load_is_unknown_not_an_error() -> None:
    # On Linux ctypes has no WinDLL: the backend fails to build and says so.
    probe = default_probe({}, "win32")
    assert isinstance(probe, UnknownProbe)
    assert (probe.idle_seconds(), probe.fullscreen_active()) == (None, None)
    assert "windows backend failed" in probe.describe()


def test_combined_and_log_once(caplog: pytest.LogCaptureFixture) -> None:
    both = CombinedProbe(UnknownProbe("idle time unknown: x"), UnknownProbe("idle time unknown: x"))
    assert both.describe() == "idle time unknown: x"
    once = LogOnce(logging.getLogger("client.activity.test"))
    with caplog.at_level(logging.WARNING, logger="client.activity.test"):
        for _ in range(3):
            once("same problem")
        for i in range(LogOnce.LIMIT + 5):
            once(f"problem {i}")
    assert caplog.text.count("same problem") == 1
    assert len(caplog.records) == LogOnce.LIMIT  # bounded


@pytest.mark.parametrize(
    ("value", "idle"),
    [("86400", 86400.0), ("0", 0.0), (" 12.5 ", 12.5), ("-1", None), ("soon", None), ("inf", None)],
)
def test_simulated_idle_replaces_the_os(value: str, idle: float | None) -> None:
    probe = default_probe({"FEDTRAY_SIMULATE_IDLE_SECONDS": value}, "linux")
    if idle is None:  # ignored: the OS is asked (here: no display, no bus -> unknown)
        assert probe.idle_seconds() is None
    else:
        assert probe.idle_seconds() == idle
        assert probe.fullscreen_active() is False
        assert "simulated" in probe.describe()
