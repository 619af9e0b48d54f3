"""Linux/BSD X11: idle time from the MIT-SCREEN-SAVER extension, full-screen from EWMH.

Contract (on top of :mod:`client.activity.base`):

* :func:`open_x11` connects to an X display through python-xlib (pure Python: no libX11,
  whose default I/O error handler would ``exit()`` the whole client when the X server
  goes away) and returns an :class:`X11Probe`, or ``None`` and the reason in words.
* ``idle_seconds()``: ``XScreenSaverQueryInfo(root).idle`` (milliseconds since the last
  input the X server saw) / 1000; ``None`` without the extension (``describe()`` says so).
  Under Wayland this is never used: XWayland sees only X clients' input, so it would
  report "idle" while the user types into Wayland windows (:mod:`client.activity.choose`).
* ``fullscreen_active()``: ``None`` unless an EWMH window manager runs (the root's
  ``_NET_SUPPORTING_WM_CHECK`` names a live window that names itself); then the root's
  ``_NET_ACTIVE_WINDOW`` and that window's ``_NET_WM_STATE``: True when it holds
  ``_NET_WM_STATE_FULLSCREEN``; False when no window is active or the active one is not
  full-screen (or vanished between the queries). Up to four round trips to the X server.
* A lost connection answers ``None`` (logged once); the probe reconnects at most every
  :data:`RECONNECT_EVERY_S` seconds. Pure parts (:func:`parse_active_window`,
  :func:`wm_present`, :func:`is_fullscreen_state`) are table-tested.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from client.activity.base import LogOnce

__all__ = [
    "RECONNECT_EVERY_S",
    "X11Probe",
    "is_fullscreen_state",
    "open_x11",
    "parse_active_window",
]

log = logging.getLogger(__name__)

RECONNECT_EVERY_S: Final = 5.0
SCREENSAVER_EXTENSION: Final = "MIT-SCREEN-SAVER"
FROM_WM: Final = "full-screen from the window manager (EWMH _NET_WM_STATE)"
NO_WM: Final = "full-screen unknown: no EWMH window manager (_NET_SUPPORTING_WM_CHECK)"


def parse_active_window(value: Sequence[int] | None) -> int | None:
    """The active window from ``_NET_ACTIVE_WINDOW``'s value: its id, 0 when none is
    active, ``None`` when the property is absent (no EWMH window manager)."""
    if value is None:
        return None
    return int(value[0]) if len(value) > 0 else 0


def wm_present(root_check: Sequence[int] | None, child_check: Sequence[int] | None) -> bool:
    """Whether an EWMH window manager runs: the root's ``_NET_SUPPORTING_WM_CHECK`` names
    a window whose own ``_NET_SUPPORTING_WM_CHECK`` names itself (else it is stale)."""
    if not root_check or not child_check:
        return False
    return int(root_check[0]) != 0 and int(root_check[0]) == int(child_check[0])


def is_fullscreen_state(state: Sequence[int] | None, fullscreen_atom: int) -> bool:
    """Whether ``_NET_WM_STATE`` (a list of atoms, or absent) says full-screen."""
    return state is not None and fullscreen_atom in state


def _open_display(name: str) -> Any:
    from Xlib import display

    return display.Display(name)


class X11Probe:
    """One X display's idle time and active window (see the module contract)."""

    def __init__(self, name: str, opener: Callable[[str], Any] = _open_display) -> None:
        self._name = name
        self._opener = opener
        self._lock = threading.Lock()
        self._problem = LogOnce(log)
        self._display: Any = None
        self._retry_at = 0.0
        self._has_screensaver = False
        self._fullscreen_note = NO_WM
        self._connect()

    # -- connection -------------------------------------------------------------------

    def _connect(self) -> bool:
        try:
            self._display = self._opener(self._name)
            self._has_screensaver = bool(self._display.has_extension(SCREENSAVER_EXTENSION))
            root = self._display.screen().root
            self._root = root
            self._atom_check = self._display.intern_atom("_NET_SUPPORTING_WM_CHECK")
            self._atom_active = self._display.intern_atom("_NET_ACTIVE_WINDOW")
            self._atom_state = self._display.intern_atom("_NET_WM_STATE")
            self._atom_fullscreen = self._display.intern_atom("_NET_WM_STATE_FULLSCREEN")
            self._fullscreen()  # so describe() can tell at once whether a WM answers
        except Exception as exc:  # never raise for OS trouble: no display is an answer
            display, self._display = self._display, None
            if display is not None:
                with contextlib.suppress(Exception):  # half-opened: do not leak the socket
                    display.close()
            self._retry_at = time.monotonic() + RECONNECT_EVERY_S
            self._problem(f"cannot connect to X display {self._name!r}: {exc}")
            return False
        return self._display is not None

    @property
    def connected(self) -> bool:
        return self._display is not None

    def _lost(self, exc: BaseException) -> None:
        self._problem(f"lost X display {self._name!r}: {exc!r}")
        display, self._display = self._display, None
        self._retry_at = time.monotonic() + RECONNECT_EVERY_S
        if display is not None:
            with contextlib.suppress(Exception):  # closing a dead connection
                display.close()

    def _ready(self) -> bool:
        if self._display is not None:
            return True
        return time.monotonic() >= self._retry_at and self._connect()

    # -- the probe --------------------------------------------------------------------

    def idle_seconds(self) -> float | None:
        from Xlib import error as xerror

        with self._lock:
            if not self._ready() or not self._has_screensaver:
                return None
            try:
                info = self._root.screensaver_query_info()
            except xerror.XError as exc:
                self._problem(f"MIT-SCREEN-SAVER query failed: {exc}")
                return None
            except Exception as exc:  # a lost connection (ConnectionClosedError, OSError)
                self._lost(exc)
                return None
            return max(0.0, int(info.idle) / 1000.0)

    def fullscreen_active(self) -> bool | None:
        with self._lock:
            if not self._ready():
                return None
            return self._fullscreen()

    def _wm_present(self) -> bool:
        from Xlib import Xatom, error as xerror

        prop = self._root.get_full_property(self._atom_check, Xatom.WINDOW)
        root_check = None if prop is None else [int(v) for v in prop.value]
        if not root_check:
            return False
        try:
            window = self._display.create_resource_object("window", root_check[0])
            child = window.get_full_property(self._atom_check, Xatom.WINDOW)
        except (xerror.BadWindow, xerror.BadDrawable):
            return False  # a stale check window: the window manager has gone
        return wm_present(root_check, None if child is None else [int(v) for v in child.value])

    def _fullscreen(self) -> bool | None:
        """The answer, and the note ``describe()`` gives; caller holds the lock."""
        from Xlib import Xatom, error as xerror

        try:
            if not self._wm_present():
                self._fullscreen_note = NO_WM
                return None
            self._fullscreen_note = FROM_WM
            prop = self._root.get_full_property(self._atom_active, Xatom.WINDOW)
            active = parse_active_window(None if prop is None else list(prop.value))
            if not active:  # absent or 0: the window manager has no active window
                return False
            window = self._display.create_resource_object("window", active)
            try:
                state = window.get_full_property(self._atom_state, Xatom.ATOM)
            except (xerror.BadWindow, xerror.BadDrawable):
                return False  # the active window closed between the two queries
            values = None if state is None else [int(v) for v in state.value]
            return is_fullscreen_state(values, self._atom_fullscreen)
        except xerror.XError as exc:
            self._problem(f"reading the active window failed: {exc}")
            return None
        except Exception as exc:  # a lost connection (ConnectionClosedError, OSError)
            self._lost(exc)
            return None

    def describe(self) -> str:
        with self._lock:
            if self._display is None:
                return f"idle time and full-screen unknown: X display {self._name} not reachable"
            idle = (
                f"idle time from the X11 screensaver extension on {self._name}"
                if self._has_screensaver
                else f"idle time unknown: X display {self._name} lacks {SCREENSAVER_EXTENSION}"
            )
            return f"{idle}; {self._fullscreen_note}"

    @property
    def has_screensaver(self) -> bool:
        return self._has_screensaver

    def close(self) -> None:
        with self._lock:
            display, self._display = self._display, None
            self._retry_at = float("inf")
        if display is not None:
            display.close()


def open_x11(
    name: str, opener: Callable[[str], Any] = _open_display
) -> tuple[X11Probe | None, str]:
    """An :class:`X11Probe` on display ``name``, or ``(None, why not)``."""
    probe = X11Probe(name, opener)
    if not probe.connected:
        return None, f"no X display {name!r} could be opened"
    return probe, ""
