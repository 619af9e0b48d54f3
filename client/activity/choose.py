"""Which activity backend this machine gets: a pure plan from the environment, then the probe.

Contract:

* :func:`plan` is pure (environment and ``sys.platform`` in, :class:`Plan` out) and
  table-tested: Windows and macOS get their own backend; elsewhere a Wayland session
  (``WAYLAND_DISPLAY`` set or ``XDG_SESSION_TYPE=wayland``) asks D-Bus for idle time and
  never X11 (XWayland sees only X clients' input: it would say "idle" while the user
  types), and an X11 session (``DISPLAY``) asks the X server, falling back to D-Bus for
  idle time when the server lacks the screensaver extension.
* :func:`default_probe` builds the planned probe. It never raises: whatever cannot be
  opened becomes an answer of ``None`` whose reason ``describe()`` gives. Building it may
  take a few round trips (opening the display, finding a D-Bus source, each bounded), so
  build it once, in the polling thread or before it starts.
* ``FEDTRAY_SIMULATE_IDLE_SECONDS`` (:data:`SIMULATE_IDLE_ENV`, seconds ≥ 0) replaces the
  OS with a fixed idle time and no full-screen window, like ``FEDTRAY_SIMULATE_BATTERY``:
  for demos and tests on machines without a desktop (a large value: idle, full budget;
  0: in use). A value that is not a number ≥ 0 is logged and ignored.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from client.activity.base import ActivityProbe, CombinedProbe, SimulatedProbe, UnknownProbe

__all__ = ["DEFAULT_SYSTEM_BUS", "SIMULATE_IDLE_ENV", "Plan", "default_probe", "plan"]

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_BUS: Final = "unix:path=/var/run/dbus/system_bus_socket"
SIMULATE_IDLE_ENV: Final = "FEDTRAY_SIMULATE_IDLE_SECONDS"
WAYLAND_FULLSCREEN: Final = "full-screen unknown: Wayland does not tell other apps"
NO_X_FULLSCREEN: Final = "full-screen unknown: no X display"

Kind = Literal["windows", "macos", "x11", "wayland", "none"]


@dataclass(frozen=True)
class Plan:
    """What to ask: the backend kind, the X display, the D-Bus addresses."""

    kind: Kind
    display: str | None = None
    session_bus: str | None = None
    system_bus: str | None = None


def _session_bus(environ: Mapping[str, str]) -> str | None:
    given = environ.get("DBUS_SESSION_BUS_ADDRESS", "").strip()
    if given:
        return given
    runtime = environ.get("XDG_RUNTIME_DIR", "").strip()
    return f"unix:path={runtime}/bus" if runtime else None


def plan(environ: Mapping[str, str], platform: str) -> Plan:
    """The backend for this environment and ``sys.platform`` value (pure)."""
    if platform.startswith(("win32", "cygwin")):
        return Plan("windows")
    if platform == "darwin":
        return Plan("macos")
    session = _session_bus(environ)
    system = environ.get("DBUS_SYSTEM_BUS_ADDRESS", "").strip() or DEFAULT_SYSTEM_BUS
    wayland = bool(environ.get("WAYLAND_DISPLAY", "").strip()) or (
        environ.get("XDG_SESSION_TYPE", "").strip().lower() == "wayland"
    )
    if wayland:
        return Plan("wayland", None, session, system)
    display = environ.get("DISPLAY", "").strip()
    if display:
        return Plan("x11", display, session, system)
    return Plan("none", None, session, system)


def _dbus(p: Plan) -> ActivityProbe:
    from client.activity.dbus_idle import DBusIdleProbe

    return DBusIdleProbe(p.session_bus, p.system_bus)


def default_probe(
    environ: Mapping[str, str] = os.environ, platform: str = sys.platform
) -> ActivityProbe:
    """The probe for this OS and session (see :func:`plan`); never raises."""
    simulated = _simulated(environ.get(SIMULATE_IDLE_ENV))
    if simulated is not None:
        return simulated
    p = plan(environ, platform)
    try:
        return _build(p)
    except Exception as exc:  # an OS library that will not load: say so, answer None
        log.warning("activity detection unavailable (%s backend): %s", p.kind, exc)
        return UnknownProbe(f"idle time and full-screen unknown: {p.kind} backend failed: {exc}")


def _simulated(text: str | None) -> ActivityProbe | None:
    if text is None or not text.strip():
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        log.warning("ignoring %s=%r: not a number of seconds >= 0", SIMULATE_IDLE_ENV, text)
        return None
    return SimulatedProbe(seconds)


def _build(p: Plan) -> ActivityProbe:
    if p.kind == "windows":
        from client.activity.windows import Win32Calls, WindowsProbe

        return WindowsProbe(Win32Calls())
    if p.kind == "macos":
        from client.activity.macos import IOKitCalls, MacProbe

        return MacProbe(IOKitCalls())
    if p.kind == "wayland":
        return CombinedProbe(_dbus(p), UnknownProbe(WAYLAND_FULLSCREEN))
    if p.kind == "x11" and p.display:
        from client.activity.x11 import open_x11

        x11, why = open_x11(p.display)
        if x11 is None:
            return CombinedProbe(_dbus(p), UnknownProbe(f"full-screen unknown: {why}"))
        if x11.has_screensaver:
            return x11
        return CombinedProbe(_dbus(p), x11)
    return CombinedProbe(_dbus(p), UnknownProbe(NO_X_FULLSCREEN))
